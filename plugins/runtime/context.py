"""Per-call context handed to every contract method, in-process or across a sidecar hop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who is calling on whose behalf, and by when the answer is needed.

    `namespace` scopes all data: a plugin must keep the data of different namespaces apart even
    when one plugin instance serves several. `deadline` is a `time.monotonic()` instant or None;
    backends pass `time_remaining()` down to driver calls so a slow database cannot hold a call
    past the client's deadline.
    """

    namespace: str
    request_id: str = ""
    deadline: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def with_timeout(
        cls, namespace: str, timeout: float | None, request_id: str = ""
    ) -> CallContext:
        deadline = None if timeout is None else time.monotonic() + timeout
        return cls(namespace, request_id, deadline)

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or None when there is none."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def timeout(self, default: float) -> float:
        """The remaining time, capped by `default`; what to hand a driver call as its timeout."""
        remaining = self.time_remaining()
        return default if remaining is None else min(default, remaining)
