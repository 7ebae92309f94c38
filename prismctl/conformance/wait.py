"""Polling for time-based behaviour (TTL expiry, redelivery, delayed delivery): checking
repeatedly until a deadline is both faster and less flaky than sleeping a guessed amount."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def eventually(
    predicate: Callable[[], Awaitable[Any]] | Callable[[], Any],
    timeout: float = 5.0,  # noqa: ASYNC109  (a polling budget, not a cancellation scope)
    interval: float = 0.05,
    message: str = "condition not met",
) -> Any:
    """Call `predicate` (sync or async) until it returns a truthy value and return that value;
    raise TimeoutError with `message` and the last falsy result when `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} within {timeout}s (last result: {result!r})")
        await asyncio.sleep(interval)
