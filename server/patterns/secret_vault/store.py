"""Secret records in the `store` slot, through KeyValueBasic/Scan (+ TTL and CAS when bound).

One KV entry per secret (`secret/<name>`): a JSON record of metadata and the retained versions,
each value an encrypted envelope (base64). One entry means every write is atomic: a secret is
never half-written. With keyvalue_cas every write is conditional on the revision that was read,
so concurrent writers (and the re-encryption task) never overwrite each other; without it,
writes are last-writer-wins and a write racing with another can be lost (see `guarantees`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.duration_pb2 import Duration
from prism.contracts.keyvalue import KeyValueBasic, KeyValueCAS, KeyValueScan, KeyValueTTL
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv_pb
from prism.interfaces.keyvalue.v1 import keyvalue_cas_pb2 as cas_pb
from prism.interfaces.keyvalue.v1 import keyvalue_scan_pb2 as scan_pb
from prism.interfaces.keyvalue.v1 import keyvalue_ttl_pb2 as ttl_pb

from plugins.runtime.context import CallContext
from plugins.runtime.errors import Aborted, AlreadyExists, DataLoss

KEY_PREFIX = "secret/"


class WriteConflict(Exception):
    """The entry changed (or appeared) since it was read; re-read and decide again."""


@dataclass
class Stored:
    """A record as read, with the revision a conditional write must match."""

    record: dict[str, Any]
    revision: int

    @property
    def expired(self) -> bool:
        expire = self.record.get("expire_time")
        return expire is not None and expire <= time.time()


#: the record's fields and the types they must have (a record that is not like this is corrupt)
FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "type": str,
    "scopes": list,
    "description": str,
    "create_time": (int, float),
    "update_time": (int, float),
    "expire_time": (int, float, type(None)),
    "versions": list,
}
VERSION_FIELDS: dict[str, type | tuple[type, ...]] = {
    "version": int,
    "create_time": (int, float),
    "value": str,
}


def _shaped(data: Any, fields: dict[str, type | tuple[type, ...]]) -> bool:
    return isinstance(data, dict) and all(
        isinstance(data.get(k, ...), t) for k, t in fields.items()
    )


def _decode(key: str, value: bytes) -> dict[str, Any]:
    try:
        record = json.loads(value)
    except ValueError:
        record = None
    if not (
        _shaped(record, FIELDS)
        and record["versions"]
        and all(_shaped(v, VERSION_FIELDS) for v in record["versions"])
    ):
        raise DataLoss(
            f"stored secret record {key!r} is not readable (DeleteSecret removes it)",
            reason="RECORD_CORRUPT",
            key=key,
        )
    return record  # type: ignore[no-any-return]


class SecretStore:
    def __init__(
        self,
        basic: KeyValueBasic,
        scan: KeyValueScan,
        ttl: KeyValueTTL | None,
        cas: KeyValueCAS | None,
    ) -> None:
        self.basic = basic
        self.scanner = scan
        self.ttl = ttl
        self.cas = cas

    @property
    def guarantees(self) -> str:
        return "conditional writes (CAS)" if self.cas else "last-writer-wins (no keyvalue_cas)"

    async def get(self, name: str, ctx: CallContext) -> Stored | None:
        key = KEY_PREFIX + name
        response = await self.basic.get(kv_pb.GetRequest(key=key), ctx)
        if not response.found:
            return None
        return Stored(_decode(key, response.value), response.revision)

    async def write(
        self, name: str, record: dict[str, Any], expected: int | None, ctx: CallContext
    ) -> int:
        """Write `record` if the entry is still at revision `expected` (0: absent; None: no
        condition). Raises WriteConflict when it moved on."""
        key = KEY_PREFIX + name
        value = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
        if self.cas is not None and expected is not None:
            try:
                revision = (
                    await self.cas.compare_and_swap(
                        cas_pb.CompareAndSwapRequest(
                            key=key, value=value, expected_revision=expected
                        ),
                        ctx,
                    )
                ).revision
            except (AlreadyExists, Aborted):
                raise WriteConflict(name) from None
        else:
            if expected is not None:
                # no CAS: a check right before the write narrows, but cannot close, the race
                current = await self.basic.get(kv_pb.GetRequest(key=key), ctx)
                if (current.revision if current.found else 0) != expected:
                    raise WriteConflict(name)
            revision = (await self.basic.set(kv_pb.SetRequest(key=key, value=value), ctx)).revision
        await self._apply_expiry(key, record.get("expire_time"), ctx)
        return revision

    async def _apply_expiry(self, key: str, expire: float | None, ctx: CallContext) -> None:
        """With keyvalue_ttl an expiring secret also vanishes from the store; the pattern's own
        expiry check stays authoritative either way."""
        if self.ttl is None or expire is None:
            return
        remaining = max(expire - time.time(), 0.001)
        ttl = Duration()
        ttl.FromNanoseconds(int(remaining * 1e9))
        await self.ttl.expire(ttl_pb.ExpireRequest(key=key, ttl=ttl), ctx)

    async def delete(self, name: str, ctx: CallContext) -> bool:
        response = await self.basic.delete(kv_pb.DeleteRequest(key=KEY_PREFIX + name), ctx)
        return response.deleted

    async def scan(
        self, prefix: str, page_size: int, page_token: str, ctx: CallContext
    ) -> tuple[Sequence[tuple[str, Stored | DataLoss]], str]:
        """One page of records whose names start with `prefix`, in name order. An unreadable
        record comes back as its error, so one bad record does not hide the others."""
        response = await self.scanner.scan(
            scan_pb.ScanRequest(
                prefix=KEY_PREFIX + prefix, page_size=page_size, page_token=page_token
            ),
            ctx,
        )
        page: list[tuple[str, Stored | DataLoss]] = []
        for entry in response.entries:
            name = entry.key.removeprefix(KEY_PREFIX)
            try:
                page.append((name, Stored(_decode(entry.key, entry.value), entry.revision)))
            except DataLoss as exc:
                page.append((name, exc))
        return page, response.next_page_token
