"""PubSub persistent: a JetStream log per namespace, durables remembered in a JetStream KV.

LOG. Every namespace has one JetStream stream `<stream prefix>_<ns>_pp` capturing
`<root>.pp.>`; PublishPersistent stores the message on `<root>.pp.<topic>` and its JetStream
sequence is the message's sequence: strictly increasing per topic (the namespace's topics share
the counter, so per topic it is not consecutive, as the contract allows). Once stored, the
message (sequence included) is also published on the live subject, so it reaches live
Subscribe/SubscribePattern streams like a plain Publish. Retention is the stream's max_age
(config `persistent_max_age_seconds`, default 7 days) and `persistent_max_messages`.

DURABLES. A durable's acknowledged sequence is the value of key `<ns>.<topic>.<durable>` in the
slot's KV bucket `<stream prefix>_durables` (the durable name has no '.', so the key is
unambiguous); AckDurable raises it with compare-and-set, so concurrent acks never lower it.
A durable stream is an ephemeral no-ack JetStream consumer filtered on the topic's subject,
starting at the requested sequence: each logged message is delivered once per stream, in
sequence order, and whatever is not acknowledged is delivered again by the next stream that
starts from the last acknowledgement. The reader fetches from the log only as the client reads,
so catching up on a long log never trips the slow-subscriber limit. (JetStream's own durable
consumers would redeliver within a live stream and cannot move their start; the contract wants
neither.) One live stream per durable is enforced within this plugin instance.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats.js.errors
from nats.js import api
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as basic_pb
from prism.interfaces.pubsub.v1 import pubsub_persistent_pb2 as persistent_pb

from plugins.nats.connection import Names, NatsConnection, namespace_token
from plugins.nats.pubsub import NatsPubSub
from plugins.nats.stream import BATCH, JetStreams
from plugins.nats.subscriptions import Subscription, Subscriptions
from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from plugins.runtime.pubsub import new_message

KIND = "pp"
DEFAULT_MAX_AGE_SECONDS = 7 * 24 * 3600.0
DURABLES = "durables"


class NatsPersistent:
    """pubsub_persistent."""

    def __init__(
        self,
        conn: NatsConnection,
        live: NatsPubSub,
        subscriptions: Subscriptions,
        max_age: float = DEFAULT_MAX_AGE_SECONDS,
        max_messages: int = -1,
    ) -> None:
        self.conn = conn
        self.live = live
        self.subscriptions = subscriptions
        self.max_age = max_age
        self.max_messages = max_messages
        self.jetstreams = JetStreams(conn, KIND)
        self.in_use: set[tuple[str, str, str]] = set()

    def _log(self, ctx: CallContext, topic: str) -> tuple[str, str]:
        """(JetStream stream of the namespace's log, subject of `topic`)."""
        names = Names.of(self.conn.settings, ctx)
        return names.stream(KIND), names.subject(KIND, topic)

    def _log_config(self, ctx: CallContext) -> dict[str, Any]:
        """How the namespace's log stream is created: every persistent topic, our limits."""
        capture = Names.of(self.conn.settings, ctx).subject(KIND, ">")
        return {"capture": capture, "max_msgs": self.max_messages, "max_age": self.max_age}

    @staticmethod
    def _key(ctx: CallContext, topic: str, durable: str) -> str:
        return f"{namespace_token(ctx.namespace)}.{topic}.{durable}"

    async def publish_persistent(
        self, request: persistent_pb.PublishPersistentRequest, ctx: CallContext
    ) -> persistent_pb.PublishPersistentResponse:
        message = new_message(request.topic, request.payload, request.attributes)
        stream, subject = self._log(ctx, message.topic)
        sequence = await self.jetstreams.publish(
            ctx, stream, subject, message.SerializeToString(), **self._log_config(ctx)
        )
        message.sequence = sequence
        await self.live.publish_live(ctx, message)
        return persistent_pb.PublishPersistentResponse(
            message_id=message.message_id, sequence=sequence
        )

    async def _last(self, ctx: CallContext, topic: str) -> basic_pb.Message | None:
        """The topic's newest logged message (None when there is none)."""
        stream, subject = self._log(ctx, topic)
        try:
            raw = await self.conn.run(ctx, lambda: self.conn.js.get_last_msg(stream, subject))
        except nats.js.errors.NotFoundError:
            return None
        message = basic_pb.Message.FromString(raw.data or b"")
        message.sequence = raw.seq or 0
        return message

    async def get_last_message_id(
        self, request: persistent_pb.GetLastMessageIDRequest, ctx: CallContext
    ) -> persistent_pb.GetLastMessageIDResponse:
        last = await self._last(ctx, validation.topic(request.topic))
        if last is None:
            return persistent_pb.GetLastMessageIDResponse()
        return persistent_pb.GetLastMessageIDResponse(
            sequence=last.sequence, message_id=last.message_id
        )

    async def ack_durable(
        self, request: persistent_pb.AckDurableRequest, ctx: CallContext
    ) -> persistent_pb.AckDurableResponse:
        topic = validation.topic(request.topic)
        durable = validation.collection(request.durable_name, "durable_name")
        key = self._key(ctx, topic, durable)
        last = await self._last(ctx, topic)
        if request.sequence > (0 if last is None else last.sequence):
            raise InvalidArgument("sequence", "is above the topic's last sequence")

        async def raise_to() -> int | None:
            kv = await self.conn.bucket(DURABLES)
            while True:
                try:
                    entry = await kv.get(key)
                except nats.js.errors.KeyNotFoundError:
                    return None
                acked = int(entry.value or b"0")
                if request.sequence <= acked:
                    return acked
                try:
                    await kv.update(key, b"%d" % request.sequence, last=entry.revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # a concurrent ack moved it: look again
                return request.sequence

        acked = await self.conn.run(ctx, raise_to)
        if acked is None:
            raise NotFound(
                f"durable {durable!r} of topic {topic!r} does not exist",
                reason="DURABLE_NOT_FOUND",
                topic=topic,
                durable_name=durable,
            )
        return persistent_pb.AckDurableResponse(acked_sequence=acked)

    def subscribe_durable(
        self, request: persistent_pb.SubscribeDurableRequest, ctx: CallContext
    ) -> AsyncIterator[persistent_pb.SubscribeDurableResponse]:
        topic = validation.topic(request.topic)
        durable = validation.collection(request.durable_name, "durable_name")
        if request.start == persistent_pb.START_POSITION_SEQUENCE and request.start_sequence <= 0:
            raise InvalidArgument("start_sequence", "must be positive")
        return self._durable_stream(ctx, topic, durable, request)

    async def _acked(self, ctx: CallContext, topic: str, durable: str) -> int:
        """The durable's acknowledged sequence, creating the durable (at 0) if new."""
        key = self._key(ctx, topic, durable)

        async def read_or_create() -> int:
            kv = await self.conn.bucket(DURABLES)
            try:
                return int((await kv.get(key)).value or b"0")
            except nats.js.errors.KeyNotFoundError:
                pass
            try:
                await kv.create(key, b"0")
            except nats.js.errors.KeyWrongLastSequenceError:  # created meanwhile
                return int((await kv.get(key)).value or b"0")
            return 0

        return await self.conn.run(ctx, read_or_create)

    async def _durable_stream(
        self,
        ctx: CallContext,
        topic: str,
        durable: str,
        request: persistent_pb.SubscribeDurableRequest,
    ) -> AsyncIterator[persistent_pb.SubscribeDurableResponse]:
        owner = (namespace_token(ctx.namespace), topic, durable)
        if owner in self.in_use:
            raise FailedPrecondition(
                f"durable {durable!r} of topic {topic!r} already has a live stream",
                reason="DURABLE_IN_USE",
                topic=topic,
                durable_name=durable,
            )
        self.in_use.add(owner)
        sub = self.subscriptions.open(ctx.namespace)
        reader: asyncio.Task[None] | None = None
        try:
            acked = await self._acked(ctx, topic, durable)
            if request.start == persistent_pb.START_POSITION_BEGINNING:
                position: dict[str, object] = {"deliver_policy": api.DeliverPolicy.ALL}
            else:
                start = (
                    request.start_sequence
                    if request.start == persistent_pb.START_POSITION_SEQUENCE
                    else acked + 1
                )
                position = {
                    "deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE,
                    "opt_start_seq": start,
                }
            stream, subject = self._log(ctx, topic)
            config = self._log_config(ctx)
            await self.conn.run(ctx, lambda: self.jetstreams.create(stream, **config))
            opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            reader = asyncio.create_task(self._read(ctx, stream, subject, position, sub, opened))
            await opened  # the consumer exists: later publishes reach this stream
            async for event in Subscriptions.relay(
                sub,
                lambda s: persistent_pb.SubscribeDurableResponse(started=s),
                lambda m: persistent_pb.SubscribeDurableResponse(message=m),
            ):
                yield event
        finally:
            self.in_use.discard(owner)
            self.subscriptions.discard(sub)
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _read(
        self,
        ctx: CallContext,
        stream: str,
        subject: str,
        position: dict[str, object],
        sub: Subscription,
        opened: asyncio.Future[None],
    ) -> None:
        """Move the topic's logged messages into `sub` until cancelled."""
        try:
            async with self.jetstreams.reader(ctx, stream, filter_subject=subject, **position) as (
                pull,
                _,
            ):
                opened.set_result(None)
                while not sub.ended:
                    # the log keeps what the client has not read yet: fetch only as it reads
                    await sub.room(BATCH)
                    for msg in await self.jetstreams.fetch(pull, BATCH):
                        message = basic_pb.Message.FromString(msg.data)
                        message.sequence = msg.metadata.sequence.stream
                        sub.offer(message)
        except Exception as exc:  # the stream reports it rather than hanging
            if not opened.done():
                opened.set_exception(exc)
            sub.end(exc)
