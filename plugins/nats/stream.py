"""Stream basic/replay/retention on JetStream: one JetStream stream per contract stream.

Mapping: contract stream S of a namespace is the JetStream stream `<stream prefix>_<ns>_st_S`
capturing the single subject `<root>.st.S`, created lazily by the first Append (or SetRetention,
or a following Read). Its JetStream sequences therefore ARE the contract offsets: 1, 2, 3, ...
per contract stream, assigned by the server one append at a time, and never reused (a purge keeps
the sequence counter; we never delete a stream). append_time is the server's own nanosecond
timestamp of the stored message (read back after the append, and from each delivery's ack
subject), so it never decreases as offsets grow. A stored message is the serialized `Record`
(key, payload, attributes); offset and time come from JetStream.

Reads use an ephemeral pull consumer with no acks (deleted afterwards, and reaped by the server
after INACTIVE_SECONDS if we die). Retention is the stream's own max_msgs / max_age (removal is
oldest first, as the contract requires); Trim is a purge up to a sequence.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from prism.interfaces.stream.v1 import stream_basic_pb2 as basic_pb
from prism.interfaces.stream.v1 import stream_replay_pb2 as replay_pb
from prism.interfaces.stream.v1 import stream_retention_pb2 as retention_pb

from plugins.nats.connection import CONNECTION_ERRORS, Names, NatsConnection
from plugins.runtime import validation
from plugins.runtime.context import CallContext
from plugins.runtime.errors import InvalidArgument, Unavailable

KIND = "st"
BATCH = 256
FETCH_WAIT = 1.0
INACTIVE_SECONDS = 60.0
STREAM_NAME_IN_USE = 10058
DEFAULT_DUPLICATE_WINDOW = 120.0
T = TypeVar("T")


def duplicate_window(max_age: float) -> float:
    """JetStream's de-duplication window (unused: we set no Nats-Msg-Id) may not exceed the
    stream's max_age; its default is 2 minutes."""
    return min(max_age, DEFAULT_DUPLICATE_WINDOW) if max_age else DEFAULT_DUPLICATE_WINDOW


def _nanos_from_iso(text: str) -> int:
    """RFC 3339 with up to 9 fractional digits (JetStream's message time) → ns since epoch."""
    whole, _, rest = text.rstrip("Z").partition(".")
    seconds = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.UTC).timestamp()
    return int(seconds) * 1_000_000_000 + int((rest or "0").ljust(9, "0")[:9])


def _nanos_of_delivery(msg: Msg) -> int:
    """The stored message's timestamp, from the ack subject of its delivery."""
    tokens = (msg.reply or "").split(".")
    return int(tokens[7] if len(tokens) == 9 else tokens[Msg.Ack.Timestamp])


def record_of(msg: Msg) -> basic_pb.Record:
    record = basic_pb.Record.FromString(msg.data)
    record.offset = msg.metadata.sequence.stream
    record.append_time.FromNanoseconds(_nanos_of_delivery(msg))
    return record


class JetStreams:
    """Creating, describing and reading the JetStream streams behind one kind of contract
    object (stream.py's streams; queues and durables reuse it)."""

    def __init__(self, conn: NatsConnection, kind: str) -> None:
        self.conn = conn
        self.kind = kind

    def names(self, ctx: CallContext, name: str) -> tuple[str, str]:
        """(JetStream stream name, subject) of contract object `name`."""
        names = Names.of(self.conn.settings, ctx)
        return names.stream(self.kind, name), names.subject(self.kind, name)

    @property
    def js(self) -> JetStreamContext:
        return self.conn.js

    async def info(self, ctx: CallContext, stream: str) -> api.StreamInfo | None:
        """The stream's info, or None when it does not exist (yet)."""
        try:
            return await self.conn.run(ctx, lambda: self.js.stream_info(stream))
        except nats.js.errors.NotFoundError:
            return None

    async def create(
        self, stream: str, capture: str, max_msgs: int = -1, max_age: float = 0
    ) -> None:
        """Create the stream capturing subject `capture` if missing (an existing one, whatever
        its limits, is kept)."""
        config = api.StreamConfig(
            name=stream,
            subjects=[capture],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
            max_msgs=max_msgs,
            max_age=max_age,
            duplicate_window=duplicate_window(max_age),
            num_replicas=self.conn.settings.stream_replicas,
        )
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise

    async def publish(
        self,
        ctx: CallContext,
        stream: str,
        subject: str,
        body: bytes,
        capture: str | None = None,
        max_msgs: int = -1,
        max_age: float = 0,
        headers: dict[str, str] | None = None,
    ) -> int:
        """Store `body` on `subject`, creating the stream on first use (capturing `capture`,
        by default just `subject`); its sequence."""

        async def publish() -> int:
            try:
                ack = await self.js.publish(subject, body, stream=stream, headers=headers)
            except nats.js.errors.NoStreamResponseError:
                await self.create(stream, capture or subject, max_msgs, max_age)
                ack = await self.js.publish(subject, body, stream=stream, headers=headers)
            return int(ack.seq)

        return await self.conn.run(ctx, publish)

    async def stored_nanos(self, ctx: CallContext, stream: str, seq: int) -> int:
        """The server timestamp of stored message `seq`, in full nanoseconds."""
        request = json.dumps({"seq": seq}).encode()
        subject = f"$JS.API.STREAM.MSG.GET.{stream}"

        async def get() -> Any:
            reply = await self.conn.client.request(subject, request)
            return json.loads(reply.data)

        answer = await self.conn.run(ctx, get)
        if "message" not in answer:
            raise Unavailable(f"JetStream did not return message {seq} of {stream}: {answer}")
        return _nanos_from_iso(answer["message"]["time"])

    async def purge(self, ctx: CallContext, stream: str, **what: object) -> int:
        """Purge (`seq`: every message below it, must be > 0; `filter`: one subject); how many
        messages went."""
        request = json.dumps(what).encode()
        subject = f"$JS.API.STREAM.PURGE.{stream}"

        async def purge() -> Any:
            reply = await self.conn.client.request(subject, request)
            return json.loads(reply.data)

        answer = await self.conn.run(ctx, purge)
        if not answer.get("success"):
            raise Unavailable(f"JetStream refused to purge {stream}: {answer}")
        return int(answer.get("purged", 0))

    @contextlib.asynccontextmanager
    async def reader(
        self, ctx: CallContext, stream: str, **position: Any
    ) -> AsyncIterator[tuple[JetStreamContext.PullSubscription, api.ConsumerInfo]]:
        """An ephemeral no-ack pull consumer at `position` (deliver_policy and its option)."""
        name = secrets.token_hex(11)
        config = api.ConsumerConfig(
            name=name,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=INACTIVE_SECONDS,
            mem_storage=True,
            **position,
        )
        info = await self.conn.run(ctx, lambda: self.js.add_consumer(stream, config))
        try:
            sub = await self.conn.run(
                ctx, lambda: self.js.pull_subscribe_bind(consumer=name, stream=stream)
            )
            try:
                yield sub, info
            finally:
                await self.conn.unsubscribe(sub)
        finally:
            if self.conn.client.is_connected:
                with contextlib.suppress(*CONNECTION_ERRORS, nats.errors.Error, Unavailable):
                    await self.conn.run(ctx, lambda: self.js.delete_consumer(stream, name))

    async def fetch(self, sub: JetStreamContext.PullSubscription, batch: int) -> list[Msg]:
        """Up to `batch` messages, or [] when none came within FETCH_WAIT."""
        self.conn.ensure_connected()
        try:
            return await sub.fetch(batch, timeout=FETCH_WAIT)
        except nats.errors.TimeoutError:
            self.conn.ensure_connected()
            return []
        except CONNECTION_ERRORS as exc:
            raise Unavailable(f"NATS read failed: {exc!r}") from exc


class NatsStreams:
    """stream_basic, stream_replay and stream_retention."""

    def __init__(self, conn: NatsConnection) -> None:
        self.conn = conn
        self.jetstreams = JetStreams(conn, KIND)

    # stream_basic -----------------------------------------------------------------------------

    async def append(
        self, request: basic_pb.AppendRequest, ctx: CallContext
    ) -> basic_pb.AppendResponse:
        name = validation.stream_name(request.stream)
        record = basic_pb.Record(
            key=validation.record_key(request.key),
            payload=validation.value(request.payload, "payload"),
            attributes=validation.attributes(request.attributes),
        )
        stream, subject = self.jetstreams.names(ctx, name)
        offset = await self.jetstreams.publish(ctx, stream, subject, record.SerializeToString())
        response = basic_pb.AppendResponse(offset=offset)
        nanos = await self.jetstreams.stored_nanos(ctx, stream, offset)
        response.append_time.FromNanoseconds(nanos)
        return response

    def read(
        self, request: basic_pb.ReadRequest, ctx: CallContext
    ) -> AsyncIterator[basic_pb.ReadResponse]:
        name = validation.stream_name(request.stream)
        limit = validation.non_negative(request.max_records, "max_records")
        start = max(request.start_offset, 1)
        target = self.jetstreams.names(ctx, name)
        records = self.records(ctx, target, start, None, limit, follow=request.follow)
        return wrap(records, lambda r: basic_pb.ReadResponse(record=r))

    async def get_latest_offset(
        self, request: basic_pb.GetLatestOffsetRequest, ctx: CallContext
    ) -> basic_pb.GetLatestOffsetResponse:
        name = validation.stream_name(request.stream)
        info = await self.jetstreams.info(ctx, self.jetstreams.names(ctx, name)[0])
        if info is None:
            return basic_pb.GetLatestOffsetResponse()
        state = info.state
        return basic_pb.GetLatestOffsetResponse(
            offset=state.last_seq, first_offset=state.first_seq if state.messages else 0
        )

    async def records(
        self,
        ctx: CallContext,
        target: tuple[str, str],
        start: int,
        end: int | None,
        limit: int,
        follow: bool,
    ) -> AsyncGenerator[basic_pb.Record, None]:
        """Records of the JetStream stream `target` (name, subject) from `start` in offset
        order: up to `end` (or the latest offset when the call began) unless following; at most
        `limit` (0: no limit)."""
        stream, subject = target
        info = await self.jetstreams.info(ctx, stream)
        last: int | None = None
        if follow:
            if info is None:
                await self.conn.run(ctx, lambda: self.jetstreams.create(stream, subject))
        else:
            if info is None:
                return
            last = info.state.last_seq if end is None else min(end, info.state.last_seq)
            if start > last:
                return
        position = {"deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": start}
        sent = 0
        async with self.jetstreams.reader(ctx, stream, **position) as (sub, _):
            while True:
                batch = BATCH if limit == 0 else min(BATCH, limit - sent)
                msgs = await self.jetstreams.fetch(sub, batch)
                for msg in msgs:
                    record = record_of(msg)
                    if last is not None and record.offset > last:
                        return
                    yield record
                    sent += 1
                    if sent == limit or record.offset == last:
                        return
                if not msgs and last is not None and await self._drained(ctx, sub):
                    return

    async def _drained(self, ctx: CallContext, sub: JetStreamContext.PullSubscription) -> bool:
        """Nothing left for this reader (the rest was removed while we read)."""
        info = await self.conn.run(ctx, sub.consumer_info)
        return not info.num_pending

    # stream_replay ----------------------------------------------------------------------------

    def replay_range(
        self, request: replay_pb.ReplayRangeRequest, ctx: CallContext
    ) -> AsyncIterator[replay_pb.ReplayRangeResponse]:
        name = validation.stream_name(request.stream)
        start, end = validation.replay_range(request.start_offset, request.end_offset)
        records = self.records(ctx, self.jetstreams.names(ctx, name), start, end, 0, False)
        return wrap(records, lambda r: replay_pb.ReplayRangeResponse(record=r))

    async def get_offset_for_timestamp(
        self, request: replay_pb.GetOffsetForTimestampRequest, ctx: CallContext
    ) -> replay_pb.GetOffsetForTimestampResponse:
        name = validation.stream_name(request.stream)
        if not request.HasField("time"):
            raise InvalidArgument("time", "is required")
        wanted = request.time.ToNanoseconds()
        stream, _ = self.jetstreams.names(ctx, name)
        if await self.jetstreams.info(ctx, stream) is None:
            return replay_pb.GetOffsetForTimestampResponse()
        # JetStream takes a start time in microseconds: start at or before `wanted`, then skip
        # the (at most a microsecond's worth of) records older than it.
        since = datetime.datetime.fromtimestamp(wanted // 1000 / 1e6, tz=datetime.UTC)
        position = {"deliver_policy": api.DeliverPolicy.BY_START_TIME, "opt_start_time": since}
        async with self.jetstreams.reader(ctx, stream, **position) as (sub, info):
            pending = info.num_pending or 0
            while pending > 0:
                msgs = await self.jetstreams.fetch(sub, min(BATCH, pending))
                for msg in msgs:
                    if _nanos_of_delivery(msg) >= wanted:
                        return replay_pb.GetOffsetForTimestampResponse(
                            found=True, offset=msg.metadata.sequence.stream
                        )
                pending -= len(msgs)
                if not msgs and await self._drained(ctx, sub):
                    break
        return replay_pb.GetOffsetForTimestampResponse()

    # stream_retention -------------------------------------------------------------------------

    async def set_retention(
        self, request: retention_pb.SetRetentionRequest, ctx: CallContext
    ) -> retention_pb.SetRetentionResponse:
        name = validation.stream_name(request.stream)
        max_records = validation.non_negative(request.max_records, "max_records")
        max_age = validation.max_age(request.max_age, request.HasField("max_age"))
        max_msgs = max_records or -1
        stream, subject = self.jetstreams.names(ctx, name)

        async def apply() -> None:
            await self.jetstreams.create(stream, subject, max_msgs=max_msgs, max_age=max_age)
            info = await self.jetstreams.js.stream_info(stream)
            if info.config.max_msgs != max_msgs or (info.config.max_age or 0) != max_age:
                config = info.config.evolve(
                    max_msgs=max_msgs, max_age=max_age, duplicate_window=duplicate_window(max_age)
                )
                await self.jetstreams.js.update_stream(config)

        await self.conn.run(ctx, apply)
        return retention_pb.SetRetentionResponse()

    async def get_retention(
        self, request: retention_pb.GetRetentionRequest, ctx: CallContext
    ) -> retention_pb.GetRetentionResponse:
        name = validation.stream_name(request.stream)
        info = await self.jetstreams.info(ctx, self.jetstreams.names(ctx, name)[0])
        response = retention_pb.GetRetentionResponse()
        if info is None:
            return response
        response.max_records = max(info.config.max_msgs or 0, 0)
        if info.config.max_age:
            response.max_age.FromNanoseconds(round(info.config.max_age * 1e9))
        return response

    async def trim(
        self, request: retention_pb.TrimRequest, ctx: CallContext
    ) -> retention_pb.TrimResponse:
        name = validation.stream_name(request.stream)
        stream, _ = self.jetstreams.names(ctx, name)
        info = await self.jetstreams.info(ctx, stream)
        latest = 0 if info is None else info.state.last_seq
        if request.before_offset > latest + 1:
            raise InvalidArgument(
                "before_offset", f"must be at most the latest offset + 1 ({latest + 1})"
            )
        if info is None or request.before_offset <= max(info.state.first_seq, 1):
            return retention_pb.TrimResponse()
        trimmed = await self.jetstreams.purge(ctx, stream, seq=request.before_offset)
        return retention_pb.TrimResponse(trimmed=trimmed)


async def wrap(
    records: AsyncGenerator[basic_pb.Record, None], event: Callable[[basic_pb.Record], T]
) -> AsyncIterator[T]:
    async with contextlib.aclosing(records):  # the reader's consumer is deleted at once
        async for record in records:
            yield event(record)
