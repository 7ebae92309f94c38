"""Redis plugin internals the black-box conformance suite cannot see: the keyspace layout
(namespace segments never collide), the key index forgetting expired keys, the blocking pool,
Lua scripts surviving a flushed script cache, the slot's default TTL, fail-fast start, pattern
subscriptions confined to their namespace and ending loudly when not read, queue messages
leaving no keys behind, and stream offsets as Redis IDs 0-N."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from google.protobuf.duration_pb2 import Duration
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as basic
from prism.interfaces.keyvalue.v1 import keyvalue_scan_pb2 as scan
from prism.interfaces.keyvalue.v1 import keyvalue_ttl_pb2 as ttl
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as pubsub
from prism.interfaces.pubsub.v1 import pubsub_wildcards_pb2 as wildcards
from prism.interfaces.queue.v1 import queue_basic_pb2 as queue
from prism.interfaces.queue.v1 import queue_dead_letter_pb2 as dead_letter
from prism.interfaces.queue.v1 import queue_visibility_pb2 as visibility
from prism.interfaces.stream.v1 import stream_basic_pb2 as stream
from prism.interfaces.stream.v1 import stream_retention_pb2 as retention

from plugins.redis import RedisPlugin
from plugins.redis import pubsub as redis_pubsub
from plugins.redis.keys import Keyspace, lex_range
from plugins.redis.pubsub import channel_glob, glob_escape
from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import InvalidArgument, ResourceExhausted, Unavailable
from tests.support.servers import ThrowawayServer, free_port
from tests.support.wait import eventually

TRICKY = ["a", "a:", "a:k", "1:a", "k:", ":", "", "é", "a:b", "b"]


def test_namespace_segments_never_collide() -> None:
    """Every (namespace, key) pair maps to its own Redis key, and no data key equals another
    namespace's index or expiry key, whatever separators the names contain."""
    seen: dict[bytes, tuple[str, str]] = {}
    for ns, key in itertools.product(TRICKY, [k for k in TRICKY if k] + ["i", "x", "1:a:k:a"]):
        ks = Keyspace(b"p:", ns)
        for redis_key, what in ((ks.data(key), key), (ks.index, "<index>"), (ks.expiring, "<x>")):
            owner = (ns, what)
            assert seen.setdefault(redis_key, owner) == owner, (redis_key, owner)


def test_lex_range_is_literal() -> None:
    assert lex_range("", None) == (b"-", b"+")
    assert lex_range("a%_*", None) == (b"[a%_*", b"(a%_*\xff")
    assert lex_range("a", "ab") == (b"(ab", b"(a\xff")


async def test_namespaces_with_separators_stay_apart(plugin: RedisPlugin) -> None:
    kv = plugin.keyvalue
    one, two = CallContext(namespace="a"), CallContext(namespace="a:k:b")
    await kv.set(basic.SetRequest(key="b:c", value=b"one"), one)
    await kv.set(basic.SetRequest(key="c", value=b"two"), two)
    assert (await kv.get(basic.GetRequest(key="b:c"), one)).value == b"one"
    assert not (await kv.get(basic.GetRequest(key="b:c"), two)).found
    assert (await kv.count(scan.CountRequest(), one)).count == 1
    assert (await kv.count(scan.CountRequest(), two)).count == 1


async def test_expired_keys_leave_the_index(
    plugin: RedisPlugin, redis_server: ThrowawayServer, ctx: CallContext
) -> None:
    kv = plugin.keyvalue
    for i in range(20):
        await kv.set_with_ttl(
            ttl.SetWithTTLRequest(key=f"t{i}", value=b"v", ttl=Duration(nanos=50_000_000)), ctx
        )
    await kv.set(basic.SetRequest(key="keep", value=b"v"), ctx)
    ks = kv.space(ctx)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await raw.zcard(ks.index) == 21
        assert await raw.zcard(ks.expiring) == 20

        async def only_keep_counted() -> bool:
            return (await kv.count(scan.CountRequest(), ctx)).count == 1

        await eventually(only_keep_counted, message="expired keys still counted")
        assert await raw.zrange(ks.index, 0, -1) == [b"keep"]
        assert await raw.zcard(ks.expiring) == 0
    finally:
        await raw.aclose()


async def test_set_after_ttl_drops_the_key_from_the_expiry_index(
    plugin: RedisPlugin, redis_server: ThrowawayServer, ctx: CallContext
) -> None:
    kv = plugin.keyvalue
    await kv.set_with_ttl(ttl.SetWithTTLRequest(key="k", value=b"v", ttl=Duration(seconds=60)), ctx)
    await kv.set(basic.SetRequest(key="k", value=b"w"), ctx)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await raw.zcard(kv.space(ctx).expiring) == 0
        assert await raw.pttl(kv.space(ctx).data("k")) == -1
    finally:
        await raw.aclose()


async def test_forged_page_token_outside_the_prefix_is_rejected(
    plugin: RedisPlugin, ctx: CallContext
) -> None:
    token = validation.encode_page_token("redis.scan", "b", "a")
    with pytest.raises(InvalidArgument) as err:
        await plugin.keyvalue.scan(scan.ScanRequest(prefix="b", page_token=token), ctx)
    assert err.value.field == "page_token"


async def test_small_pool_queues_callers_instead_of_failing(
    redis_server: ThrowawayServer, tmp_path: Path, ctx: CallContext
) -> None:
    p = RedisPlugin(
        {"connection": redis_server.url, "key_prefix": "pool:", "pool_max_size": 2},
        data_dir=tmp_path,
    )
    await p.start()
    try:
        writes = [
            p.keyvalue.set(basic.SetRequest(key=f"k{i}", value=b"v"), ctx) for i in range(100)
        ]
        revisions = {r.revision for r in await asyncio.gather(*writes)}
        assert len(revisions) == 100
    finally:
        await p.close()


async def test_scripts_reload_after_the_script_cache_is_flushed(
    plugin: RedisPlugin, redis_server: ThrowawayServer, ctx: CallContext
) -> None:
    """A restarted server has no scripts cached; EVALSHA's NOSCRIPT must be handled."""
    await plugin.keyvalue.set(basic.SetRequest(key="k", value=b"1"), ctx)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await raw.script_flush()
    finally:
        await raw.aclose()
    await plugin.keyvalue.set(basic.SetRequest(key="k", value=b"2"), ctx)
    assert (await plugin.keyvalue.get(basic.GetRequest(key="k"), ctx)).value == b"2"


async def test_slot_ttl_applies_to_plain_writes(
    redis_server: ThrowawayServer, tmp_path: Path, ctx: CallContext
) -> None:
    p = RedisPlugin(
        {"connection": redis_server.url, "key_prefix": "cache:", "ttl_seconds": 60},
        data_dir=tmp_path,
    )
    await p.start()
    try:
        await p.keyvalue.set(basic.SetRequest(key="k", value=b"v"), ctx)
        got = await p.keyvalue.get_ttl(ttl.GetTTLRequest(key="k"), ctx)
        assert got.state == ttl.TTL_STATE_EXPIRING
        assert 59 <= got.ttl.ToTimedelta().total_seconds() <= 60
    finally:
        await p.close()


async def test_start_against_nothing_is_unavailable_fast(tmp_path: Path) -> None:
    p = RedisPlugin({"connection": f"redis://127.0.0.1:{free_port()}/0"}, data_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await p.start()
    assert time.monotonic() - started < 2.0
    assert not await p.check_health()
    await p.close()


def test_bad_connection_url_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as err:
        RedisPlugin({"connection": "http://localhost"}, data_dir=tmp_path)
    assert err.value.field == "connection"


def test_glob_escape_makes_every_metacharacter_literal() -> None:
    assert glob_escape(b"p:3:a*[?]^\\:") == b"p:3:a\\*\\[\\?\\]\\^\\\\:"
    assert channel_glob(b"x*:", ["orders", "*", ">"]) == b"x\\*:orders.*.*"


async def test_pattern_subscriptions_stay_in_their_namespace(plugin: RedisPlugin) -> None:
    """A namespace full of glob metacharacters must not see a neighbour's messages, and a
    glob `*` that crosses dots must not widen a NATS `*`."""
    globby, other = CallContext(namespace="a*"), CallContext(namespace="ab")
    stream = plugin.pubsub.subscribe_pattern(
        wildcards.SubscribePatternRequest(pattern="orders.*"), globby
    )
    assert (await anext(stream)).HasField("started")
    for ctx, topic in ((other, "orders.eu"), (globby, "orders.eu.late"), (globby, "orders.us")):
        await plugin.pubsub.publish(pubsub.PublishRequest(topic=topic, payload=b"x"), ctx)
    event = await asyncio.wait_for(anext(stream), 5)
    assert event.message.topic == "orders.us"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(stream), 0.3)
    await stream.aclose()  # type: ignore[attr-defined]


async def test_acked_and_dead_lettered_messages_leave_no_keys_behind(
    plugin: RedisPlugin, redis_server: ThrowawayServer, ctx: CallContext
) -> None:
    q = plugin.queue
    await q.configure_dead_letter(
        dead_letter.ConfigureDeadLetterRequest(
            queue="q", dead_letter_queue="dlq", max_deliveries=1
        ),
        ctx,
    )
    for payload in (b"ok", b"bad"):
        await q.enqueue(queue.EnqueueRequest(queue="q", payload=payload), ctx)
    ok, bad = (await q.dequeue(queue.DequeueRequest(queue="q", max_messages=2), ctx)).messages
    await q.ack(queue.AckRequest(queue="q", receipt_handle=ok.receipt_handle), ctx)
    await q.release(visibility.ReleaseRequest(queue="q", receipt_handle=bad.receipt_handle), ctx)
    assert (
        await q.redrive_dead_letters(dead_letter.RedriveDeadLettersRequest(queue="q"), ctx)
    ).moved
    again = (await q.dequeue(queue.DequeueRequest(queue="q"), ctx)).messages[0]
    assert (again.message_id, again.delivery_count) == (bad.message_id, 1)
    await q.ack(queue.AckRequest(queue="q", receipt_handle=again.receipt_handle), ctx)
    ks = Keyspace(plugin.key_prefix.encode(), ctx.namespace)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        left = sorted(await raw.keys(glob_escape(ks.segment) + b"*"))
    finally:
        await raw.aclose()
    # only the arrival counters and the dead-letter configuration remain
    assert left == [ks.queue_key("dlq", "seq"), ks.queue_key("q", "c"), ks.queue_key("q", "seq")]


async def test_stream_offsets_are_redis_ids_0_n_and_survive_trimming(
    plugin: RedisPlugin, redis_server: ThrowawayServer, ctx: CallContext
) -> None:
    s = plugin.stream
    for _ in range(3):
        await s.append(stream.AppendRequest(stream="s", payload=b"x"), ctx)
    await s.trim(retention.TrimRequest(stream="s", before_offset=4), ctx)
    appended = await s.append(stream.AppendRequest(stream="s", payload=b"y"), ctx)
    assert appended.offset == 4
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        entries = await raw.xrange(s._prefix(ctx, "s") + b"log")
    finally:
        await raw.aclose()
    assert entries is not None
    assert [ident for ident, _ in entries] == [b"0-4"]


async def test_a_subscriber_that_does_not_read_ends_with_slow_subscriber(
    plugin: RedisPlugin, ctx: CallContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the backlog limit the stream ends with RESOURCE_EXHAUSTED after delivering what it
    buffered: messages are never dropped silently."""
    monkeypatch.setattr(redis_pubsub, "MAX_BACKLOG", 5)
    stream = plugin.pubsub.subscribe(pubsub.SubscribeRequest(topic="t"), ctx)
    assert (await anext(stream)).HasField("started")
    for i in range(8):
        await plugin.pubsub.publish(pubsub.PublishRequest(topic="t", payload=b"%d" % i), ctx)
    received = []
    with pytest.raises(ResourceExhausted) as err:
        async for event in stream:
            received.append(event.message.payload)
    assert err.value.reason == "SLOW_SUBSCRIBER"
    assert received == [b"0", b"1", b"2", b"3", b"4"]
