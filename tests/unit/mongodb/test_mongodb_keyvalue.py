"""KeyValue internals on a real MongoDB-wire server: scans in UTF-8 byte order across planes,
namespaces that could collide in a naive composite key, expiry hidden before the TTL reaper
runs, and revisions that never repeat across plugin instances sharing the counter."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic_pb
from prism.interfaces.keyvalue.v1 import keyvalue_scan_pb2 as scan_pb

from plugins.mongodb import MongodbPlugin
from plugins.runtime.context import CallContext
from tests.support.servers import ThrowawayServer


@pytest.fixture
def database() -> str:
    return f"kv{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def plugin(
    mongo_server: ThrowawayServer, database: str, tmp_path: Path
) -> AsyncIterator[MongodbPlugin]:
    p = MongodbPlugin({"connection": mongo_server.url, "database": database}, data_dir=tmp_path)
    await p.start()
    yield p
    await p.close()


async def keys(p: MongodbPlugin, ns: str, prefix: str = "", page_size: int = 2) -> list[str]:
    ctx = CallContext(ns)
    found: list[str] = []
    token = ""
    while True:
        page = await p.keyvalue.scan_keys(
            scan_pb.ScanKeysRequest(prefix=prefix, page_size=page_size, page_token=token), ctx
        )
        found += page.keys
        token = page.next_page_token
        if not token:
            return found


async def test_scan_is_utf8_byte_order_across_planes(plugin: MongodbPlugin) -> None:
    names = ["\U0001f600", "\uffff", "z", "é", "a\x00b", "a", "\U0010ffff", "日本"]
    for name in names:
        await plugin.keyvalue.set(basic_pb.SetRequest(key=name, value=b"v"), CallContext("ns"))
    assert await keys(plugin, "ns") == sorted(names, key=lambda k: k.encode("utf-8"))
    assert await keys(plugin, "ns", prefix="a") == ["a", "a\x00b"]


async def test_namespaces_never_share_keys(plugin: MongodbPlugin) -> None:
    # "1:" + "a" + "b:c" and "3:" + "a:b" + ... would collide without the length prefix
    pairs = [("a", "bc"), ("ab", "c"), ("a:b", "c"), ("", "x"), ("1:a", "b")]
    for ns, key in pairs:
        await plugin.keyvalue.set(basic_pb.SetRequest(key=key, value=ns.encode()), CallContext(ns))
    for ns, key in pairs:
        assert await keys(plugin, ns) == [key], ns
        got = await plugin.keyvalue.get(basic_pb.GetRequest(key=key), CallContext(ns))
        assert got.value == ns.encode()


async def test_expired_entries_are_hidden_before_the_reaper_runs(plugin: MongodbPlugin) -> None:
    ctx = CallContext("ns")
    await plugin.keyvalue.set(basic_pb.SetRequest(key="old", value=b"v"), ctx)
    await plugin.keyvalue.set(basic_pb.SetRequest(key="new", value=b"v"), ctx)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    await plugin.keyvalue.kv.update_one({"k": "old"}, {"$set": {"x": past}})
    assert not (await plugin.keyvalue.get(basic_pb.GetRequest(key="old"), ctx)).found
    assert await keys(plugin, "ns") == ["new"]
    count = await plugin.keyvalue.count(scan_pb.CountRequest(prefix=""), ctx)
    assert count.count == 1
    deleted = await plugin.keyvalue.delete(basic_pb.DeleteRequest(key="old"), ctx)
    assert deleted.deleted is False


async def test_revisions_never_repeat_across_instances(
    plugin: MongodbPlugin, mongo_server: ThrowawayServer, database: str, tmp_path: Path
) -> None:
    other = MongodbPlugin({"connection": mongo_server.url, "database": database}, data_dir=tmp_path)
    await other.start()
    seen: list[int] = []
    try:
        for i in range(5):
            for p in (plugin, other):
                reply = await p.keyvalue.set(
                    basic_pb.SetRequest(key="k", value=b"%d" % i), CallContext("ns")
                )
                seen.append(reply.revision)
                await p.keyvalue.delete(basic_pb.DeleteRequest(key="k"), CallContext("ns"))
    finally:
        await other.close()
    assert len(set(seen)) == len(seen) and 0 not in seen
