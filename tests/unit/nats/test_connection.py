"""Connection settings, names and the unreachable-server path."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as pubsub
from prism.interfaces.queue.v1 import queue_basic_pb2 as queue
from prism.interfaces.stream.v1 import stream_basic_pb2 as stream

from plugins.nats import NatsPlugin
from plugins.nats.connection import namespace_token
from plugins.runtime.context import CallContext
from plugins.runtime.errors import InvalidArgument, ResourceExhausted, Unavailable
from tests.support.servers import throwaway


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_server_is_unavailable_fast(tmp_path: Path) -> None:
    config = {"connection": f"nats://127.0.0.1:{_closed_port()}", "connect_timeout_seconds": 0.5}
    plugin = NatsPlugin(config, data_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await plugin.start()
    assert time.monotonic() - started < 2
    assert not await plugin.check_health()
    await plugin.close()


def test_namespace_tokens_are_safe_and_distinct() -> None:
    names = ["a.b", "a_b", "A.b", "x-y", "0"]
    tokens = [namespace_token(n) for n in names]
    assert len(set(tokens)) == len(names)
    for token in tokens:
        assert token and all(c in "abcdefghijklmnopqrstuvwxyz234567" for c in token)


@pytest.mark.parametrize("prefix", ["a.*", "a..b", "has space", "a.>", ""])
def test_bad_subject_prefix(prefix: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as bad:
        NatsPlugin({"connection": "nats://h:1", "subject_prefix": prefix}, data_dir=tmp_path)
    assert bad.value.field == "subject_prefix"


def test_memo006_prefix_and_distinct_stream_prefixes(tmp_path: Path) -> None:
    iot = NatsPlugin(
        {"connection": "nats://h:1", "subject_prefix": "iot.devices."}, data_dir=tmp_path
    )
    assert iot.settings.subject_prefix == "iot.devices"
    default = NatsPlugin({"connection": "nats://h:1"}, data_dir=tmp_path)
    assert iot.settings.stream_prefix != default.settings.stream_prefix


async def test_payload_over_server_max_is_resource_exhausted(tmp_path: Path) -> None:
    """A server left at nats-server's default max_payload (1 MiB) refuses a larger but
    contract-valid payload: the plugin says RESOURCE_EXHAUSTED, never INTERNAL."""
    with throwaway("nats", max_payload="1MB") as server:
        plugin = NatsPlugin({"connection": server.url}, data_dir=tmp_path)
        await plugin.start()
        try:
            ctx = CallContext.with_timeout("big", 5.0)
            big = b"x" * (plugin.conn.client.max_payload + 1)
            calls = [
                plugin.pubsub.publish(pubsub.PublishRequest(topic="t", payload=big), ctx),
                plugin.queue.enqueue(queue.EnqueueRequest(queue="q", payload=big), ctx),
                plugin.streams.append(stream.AppendRequest(stream="s", payload=big), ctx),
            ]
            for call in calls:
                with pytest.raises(ResourceExhausted) as refused:
                    await call
                assert refused.value.reason == "MESSAGE_TOO_LARGE"
        finally:
            await plugin.close()
