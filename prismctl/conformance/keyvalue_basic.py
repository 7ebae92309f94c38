"""keyvalue_basic: Set/Get/Delete/Exists semantics and input validation."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as pb
from prism.interfaces.keyvalue.v1.keyvalue_basic_pb2_grpc import KeyValueBasicServiceStub

from prismctl.conformance.core import Target, case, check, equal, expect_invalid

if TYPE_CHECKING:
    from prism.interfaces.keyvalue.v1.keyvalue_basic_pb2_grpc import KeyValueBasicServiceAsyncStub

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 4 * 1024 * 1024


def stub(t: Target) -> KeyValueBasicServiceAsyncStub:
    return KeyValueBasicServiceStub(t.channel)


async def get(t: Target, key: str) -> pb.GetResponse:
    response: pb.GetResponse = await stub(t).Get(pb.GetRequest(key=key))
    return response


@case("keyvalue_basic")
async def set_get_overwrite(t: Target) -> None:
    """A Set is read back by Get; a second Set replaces the value."""
    kv = stub(t)
    k = t.key("k")
    await kv.Set(pb.SetRequest(key=k, value=b"one"))
    first = await get(t, k)
    check(first.found, "Get after Set: found=false")
    equal(first.value, b"one", "value after first Set")
    await kv.Set(pb.SetRequest(key=k, value=b"two"))
    second = await get(t, k)
    equal((second.found, second.value), (True, b"two"), "value after overwrite")


@case("keyvalue_basic")
async def binary_and_empty_values(t: Target) -> None:
    """Values are opaque bytes: every byte value round-trips, and an empty value is a present
    key, not a missing one."""
    kv = stub(t)
    binary = bytes(range(256)) * 4
    await kv.Set(pb.SetRequest(key=t.key("bin"), value=binary))
    await kv.Set(pb.SetRequest(key=t.key("empty"), value=b""))
    got = await get(t, t.key("bin"))
    equal(got.value, binary, "binary value")
    empty = await get(t, t.key("empty"))
    equal((empty.found, empty.value), (True, b""), "empty value (found, value)")
    exists: pb.ExistsResponse = await kv.Exists(pb.ExistsRequest(key=t.key("empty")))
    check(exists.exists, "Exists of a key holding an empty value: false")


@case("keyvalue_basic")
async def large_value_1mib(t: Target) -> None:
    """A 1 MiB value is stored and read back intact."""
    value = bytes((i * 7 + 3) % 256 for i in range(1024 * 1024))
    await stub(t).Set(pb.SetRequest(key=t.key("big"), value=value))
    got = await get(t, t.key("big"))
    check(got.found, "1 MiB value not found")
    equal(len(got.value), len(value), "length of the 1 MiB value")
    check(got.value == value, "1 MiB value read back differs from what was written")


@case("keyvalue_basic")
async def unicode_keys_and_limits(t: Target) -> None:
    """Keys are UTF-8 and the 1024-byte limit counts bytes, not characters."""
    kv = stub(t)
    key = t.key("ключ-🔑")
    await kv.Set(pb.SetRequest(key=key, value=b"u"))
    equal((await get(t, key)).value, b"u", "value under a non-ASCII key")
    pad = MAX_KEY_BYTES - len(t.key().encode())
    longest = t.key("x" * pad)
    await kv.Set(pb.SetRequest(key=longest, value=b"max"))
    equal((await get(t, longest)).value, b"max", "value under a key of exactly 1024 bytes")
    multibyte = t.key("é" * (pad // 2 + 1))  # fewer than 1024 characters, more than 1024 bytes
    await expect_invalid(
        kv.Set(pb.SetRequest(key=multibyte, value=b"x")), "key", "Set with a key over 1024 bytes"
    )


@case("keyvalue_basic")
async def missing_key_is_not_an_error(t: Target) -> None:
    """Get, Delete and Exists of a missing key answer found/deleted/exists=false, not NOT_FOUND."""
    kv = stub(t)
    k = t.key("never-written")
    got = await get(t, k)
    equal((got.found, got.value), (False, b""), "Get of a missing key (found, value)")
    deleted: pb.DeleteResponse = await kv.Delete(pb.DeleteRequest(key=k))
    equal(deleted.deleted, False, "Delete of a missing key: deleted")
    exists: pb.ExistsResponse = await kv.Exists(pb.ExistsRequest(key=k))
    equal(exists.exists, False, "Exists of a missing key")


@case("keyvalue_basic")
async def delete_and_exists(t: Target) -> None:
    """Exists follows Set and Delete; Delete reports whether it removed something."""
    kv = stub(t)
    k = t.key("d")
    await kv.Set(pb.SetRequest(key=k, value=b"v"))
    exists: pb.ExistsResponse = await kv.Exists(pb.ExistsRequest(key=k))
    equal(exists.exists, True, "Exists after Set")
    first: pb.DeleteResponse = await kv.Delete(pb.DeleteRequest(key=k))
    equal(first.deleted, True, "first Delete: deleted")
    second: pb.DeleteResponse = await kv.Delete(pb.DeleteRequest(key=k))
    equal(second.deleted, False, "second Delete: deleted")
    gone: pb.ExistsResponse = await kv.Exists(pb.ExistsRequest(key=k))
    equal(gone.exists, False, "Exists after Delete")
    equal((await get(t, k)).found, False, "Get after Delete: found")


@case("keyvalue_basic")
async def invalid_keys_and_values(t: Target) -> None:
    """Empty keys, keys over 1024 bytes and values over 4 MiB are INVALID_ARGUMENT naming the
    field, on every RPC, and nothing is written."""
    kv = stub(t)
    long_key = t.key("k" * MAX_KEY_BYTES)
    for bad, label in (("", "an empty key"), (long_key, "a key over 1024 bytes")):
        await expect_invalid(kv.Set(pb.SetRequest(key=bad, value=b"v")), "key", f"Set {label}")
        await expect_invalid(kv.Get(pb.GetRequest(key=bad)), "key", f"Get {label}")
        await expect_invalid(kv.Delete(pb.DeleteRequest(key=bad)), "key", f"Delete {label}")
        await expect_invalid(kv.Exists(pb.ExistsRequest(key=bad)), "key", f"Exists {label}")
    k = t.key("oversize")
    await expect_invalid(
        kv.Set(pb.SetRequest(key=k, value=b"\0" * (MAX_VALUE_BYTES + 1))),
        "value",
        "Set with a value over 4 MiB",
    )
    equal((await get(t, k)).found, False, "key after a rejected oversize Set: found")


async def put(t: Target, key: str, value: bytes = b"v") -> int:
    """Set `key` and return the revision (the helper other KeyValue cases write with)."""
    response: pb.SetResponse = await stub(t).Set(pb.SetRequest(key=key, value=value))
    return response.revision


async def put_many(t: Target, keys: list[str], value: bytes = b"v", parallel: int = 64) -> None:
    """Set many keys with bounded concurrency (fixtures for scan and paging cases)."""
    for start in range(0, len(keys), parallel):
        await asyncio.gather(*(put(t, k, value) for k in keys[start : start + parallel]))


async def remove(t: Target, key: str) -> bool:
    response: pb.DeleteResponse = await stub(t).Delete(pb.DeleteRequest(key=key))
    return response.deleted


async def exists(t: Target, key: str) -> bool:
    response: pb.ExistsResponse = await stub(t).Exists(pb.ExistsRequest(key=key))
    return response.exists
