"""Live pub/sub internals: a subscriber the NATS client had to drop messages for is ended
(SLOW_SUBSCRIBER), never silently thinned."""

from __future__ import annotations

import asyncio

import pytest
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as basic

from plugins.nats import NatsPlugin
from plugins.runtime.context import CallContext
from plugins.runtime.errors import ResourceExhausted


async def test_client_side_drops_end_the_stream(
    plugin: NatsPlugin, ctx: CallContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nats-py may hold 2 * MAX_BACKLOG messages per subscription before it drops some
    monkeypatch.setattr("plugins.nats.pubsub.MAX_BACKLOG", 5)
    events = aiter(plugin.pubsub.subscribe(basic.SubscribeRequest(topic="t"), ctx))
    assert (await anext(events)).WhichOneof("event") == "started"
    sent = 2000
    await asyncio.gather(
        *(
            plugin.pubsub.publish(basic.PublishRequest(topic="t", payload=b"%d" % i), ctx)
            for i in range(sent)
        )
    )
    received: list[int] = []
    with pytest.raises(ResourceExhausted) as ended:
        while True:
            event = await asyncio.wait_for(anext(events), 5)
            received.append(int(event.message.payload))
    assert ended.value.reason == "SLOW_SUBSCRIBER"
    assert len(received) < sent
    assert received == sorted(received)
