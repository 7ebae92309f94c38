"""keyvalue_ttl: expiry visible to every read, GetTTL states, Persist, Set clearing expiry,
SetWithTTL atomicity."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from google.protobuf.duration_pb2 import Duration
from prism.interfaces.keyvalue.v1 import keyvalue_ttl_pb2 as pb
from prism.interfaces.keyvalue.v1.keyvalue_ttl_pb2_grpc import KeyValueTTLServiceStub

from prismctl.conformance.core import Target, case, check, equal, expect_invalid
from prismctl.conformance.keyvalue_basic import exists, get, put
from prismctl.conformance.keyvalue_batch import batch_get
from prismctl.conformance.keyvalue_scan import count, scan_page
from prismctl.conformance.wait import eventually

if TYPE_CHECKING:
    from prism.interfaces.keyvalue.v1.keyvalue_ttl_pb2_grpc import KeyValueTTLServiceAsyncStub

REQUIRES = ("keyvalue_basic",)
SHORT = Duration(seconds=1)
LONG = Duration(seconds=3600)


def stub(t: Target) -> KeyValueTTLServiceAsyncStub:
    return KeyValueTTLServiceStub(t.channel)


async def ttl_of(t: Target, key: str) -> pb.GetTTLResponse:
    response: pb.GetTTLResponse = await stub(t).GetTTL(pb.GetTTLRequest(key=key))
    return response


async def visible_anywhere(t: Target, key: str) -> bool:
    """Whether any read the target offers still shows `key` (expired keys must vanish from all)."""
    seen = (await get(t, key)).found or await exists(t, key)
    if "keyvalue_scan" in t.interfaces:
        seen = seen or any(e.key == key for e in (await scan_page(t, key)).entries)
        seen = seen or await count(t, key) > 0
    if "keyvalue_batch" in t.interfaces:
        seen = seen or (await batch_get(t, [key]))[0].found
    return seen


async def expect_expiry(t: Target, key: str) -> None:
    async def gone() -> bool:
        return not await visible_anywhere(t, key)

    await eventually(gone, timeout=5.0, interval=0.05, message=f"{key!r} still visible")
    state = await ttl_of(t, key)
    equal(state.state, pb.TTL_STATE_KEY_MISSING, "GetTTL state of an expired key")


@case("keyvalue_ttl", requires=REQUIRES)
async def set_with_ttl_expires(t: Target) -> None:
    """SetWithTTL makes a key that is readable, reports a TTL within bounds, and disappears from
    every read once the TTL passes."""
    k = t.key("short")
    resp: pb.SetWithTTLResponse = await stub(t).SetWithTTL(
        pb.SetWithTTLRequest(key=k, value=b"v", ttl=SHORT)
    )
    got = await get(t, k)
    # The key may already be gone on a very slow target; what it must never show is a wrong value.
    if got.found:
        equal(got.value, b"v", "value written by SetWithTTL")
        if "keyvalue_cas" in t.interfaces:
            equal(got.revision, resp.revision, "Get revision vs SetWithTTL revision")
        state = await ttl_of(t, k)
        if state.state == pb.TTL_STATE_EXPIRING:
            remaining = state.ttl.ToTimedelta().total_seconds()
            check(0 < remaining <= 1.0, f"GetTTL remaining {remaining}s outside (0, 1]")
        else:
            equal(state.state, pb.TTL_STATE_KEY_MISSING, "GetTTL state right after SetWithTTL")
    await expect_expiry(t, k)


@case("keyvalue_ttl", requires=REQUIRES)
async def expire_existing_and_missing(t: Target) -> None:
    """Expire applies to an existing key (which then expires) and reports applied=false for a
    missing one, without creating it."""
    k = t.key("exp")
    await put(t, k)
    applied: pb.ExpireResponse = await stub(t).Expire(pb.ExpireRequest(key=k, ttl=SHORT))
    equal(applied.applied, True, "Expire of an existing key: applied")
    await expect_expiry(t, k)
    missing = t.key("missing")
    not_applied: pb.ExpireResponse = await stub(t).Expire(pb.ExpireRequest(key=missing, ttl=LONG))
    equal(not_applied.applied, False, "Expire of a missing key: applied")
    equal((await get(t, missing)).found, False, "Expire created a missing key")


@case("keyvalue_ttl", requires=REQUIRES)
async def get_ttl_states(t: Target) -> None:
    """GetTTL tells a missing key, a persistent key and an expiring key apart."""
    missing = await ttl_of(t, t.key("none"))
    equal(missing.state, pb.TTL_STATE_KEY_MISSING, "GetTTL state of a missing key")
    check(not missing.HasField("ttl"), "GetTTL of a missing key carries a ttl")
    await put(t, t.key("plain"))
    plain = await ttl_of(t, t.key("plain"))
    equal(plain.state, pb.TTL_STATE_PERSISTENT, "GetTTL state of a key without expiry")
    check(not plain.HasField("ttl"), "GetTTL of a persistent key carries a ttl")
    await stub(t).SetWithTTL(pb.SetWithTTLRequest(key=t.key("long"), value=b"v", ttl=LONG))
    expiring = await ttl_of(t, t.key("long"))
    equal(expiring.state, pb.TTL_STATE_EXPIRING, "GetTTL state after SetWithTTL(1h)")
    remaining = expiring.ttl.ToTimedelta().total_seconds()
    check(3000 < remaining <= 3600, f"GetTTL remaining {remaining}s for a 1h TTL")


@case("keyvalue_ttl", requires=REQUIRES)
async def persist_removes_expiry(t: Target) -> None:
    """Persist removes an expiry (persisted=true once), the key then outlives its old TTL;
    Persist of a persistent or missing key is persisted=false."""
    k = t.key("p")
    await stub(t).SetWithTTL(pb.SetWithTTLRequest(key=k, value=b"v", ttl=SHORT))
    first: pb.PersistResponse = await stub(t).Persist(pb.PersistRequest(key=k))
    equal(first.persisted, True, "Persist of an expiring key: persisted")
    equal((await ttl_of(t, k)).state, pb.TTL_STATE_PERSISTENT, "GetTTL state after Persist")
    second: pb.PersistResponse = await stub(t).Persist(pb.PersistRequest(key=k))
    equal(second.persisted, False, "second Persist: persisted")
    missing: pb.PersistResponse = await stub(t).Persist(pb.PersistRequest(key=t.key("none")))
    equal(missing.persisted, False, "Persist of a missing key: persisted")
    # Outlive the old deadline: a control key with the same TTL must expire first.
    control = t.key("control")
    await stub(t).SetWithTTL(pb.SetWithTTLRequest(key=control, value=b"v", ttl=SHORT))
    await expect_expiry(t, control)
    equal((await get(t, k)).found, True, "persisted key after its old TTL passed: found")


@case("keyvalue_ttl", requires=REQUIRES)
async def plain_set_clears_ttl(t: Target) -> None:
    """A plain Set over an expiring key makes it persistent (Redis SET semantics)."""
    k = t.key("reset")
    await stub(t).SetWithTTL(pb.SetWithTTLRequest(key=k, value=b"old", ttl=SHORT))
    await put(t, k, b"new")
    equal((await ttl_of(t, k)).state, pb.TTL_STATE_PERSISTENT, "GetTTL state after plain Set")
    control = t.key("control")
    await stub(t).SetWithTTL(pb.SetWithTTLRequest(key=control, value=b"v", ttl=SHORT))
    await expect_expiry(t, control)
    got = await get(t, k)
    equal((got.found, got.value), (True, b"new"), "re-Set key after the old TTL passed")


@case("keyvalue_ttl", requires=REQUIRES)
async def set_with_ttl_is_atomic(t: Target) -> None:
    """No reader ever sees a value written by SetWithTTL without its expiry."""
    keys = [t.key(f"atomic{i:03d}") for i in range(30)]
    done = asyncio.Event()
    persistent: list[str] = []

    async def reader() -> None:
        while not done.is_set():
            for state in await asyncio.gather(*(ttl_of(t, k) for k in keys[::3])):
                if state.state == pb.TTL_STATE_PERSISTENT:
                    persistent.append("seen")

    async def writer() -> None:
        try:
            for k in keys:
                await stub(t).SetWithTTL(pb.SetWithTTLRequest(key=k, value=b"v", ttl=LONG))
        finally:
            done.set()

    await asyncio.gather(writer(), reader(), reader())
    equal(persistent, [], "GetTTL observations of a SetWithTTL key without its expiry")
    for k in keys[:3]:
        equal((await ttl_of(t, k)).state, pb.TTL_STATE_EXPIRING, f"GetTTL state of {k!r}")


@case("keyvalue_ttl", requires=REQUIRES)
async def invalid_ttl(t: Target) -> None:
    """A missing, zero, negative or over-10-years TTL is INVALID_ARGUMENT naming ttl and writes
    nothing; an empty key is INVALID_ARGUMENT naming key."""
    k = t.key("bad")
    ten_years_plus = Duration(seconds=10 * 365 * 24 * 3600 + 86400)
    for ttl, label in (
        (None, "no ttl"),
        (Duration(seconds=0), "ttl=0"),
        (Duration(seconds=-5), "ttl=-5s"),
        (ten_years_plus, "ttl over 10 years"),
    ):
        await expect_invalid(
            stub(t).SetWithTTL(pb.SetWithTTLRequest(key=k, value=b"v", ttl=ttl)),
            "ttl",
            f"SetWithTTL with {label}",
        )
        await put(t, t.key("present"))
        await expect_invalid(
            stub(t).Expire(pb.ExpireRequest(key=t.key("present"), ttl=ttl)),
            "ttl",
            f"Expire with {label}",
        )
    equal((await get(t, k)).found, False, "key after rejected SetWithTTL calls: found")
    equal(
        (await ttl_of(t, t.key("present"))).state,
        pb.TTL_STATE_PERSISTENT,
        "GetTTL state after rejected Expire calls",
    )
    await expect_invalid(
        stub(t).SetWithTTL(pb.SetWithTTLRequest(key="", value=b"v", ttl=LONG)),
        "key",
        "SetWithTTL with an empty key",
    )
    await expect_invalid(stub(t).GetTTL(pb.GetTTLRequest(key="")), "key", "GetTTL empty key")
    await expect_invalid(stub(t).Persist(pb.PersistRequest(key="")), "key", "Persist empty key")
