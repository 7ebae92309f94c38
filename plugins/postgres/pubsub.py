"""PubSub basic and wildcards on PostgreSQL LISTEN/NOTIFY: live fan-out, at most once.

Every Publish is one `pg_notify` on the single channel `prism_pubsub`; its payload names the
namespace and carries the serialized `Message`. A NOTIFY payload must stay under 8000 bytes, so a
larger message (payloads go up to 4 MiB) is written to `prism_pubsub_spill` in the same
transaction and the notification carries only its row id; NOTIFY is delivered at commit, so the
row is always there when a listener reads it, and the sweeper deletes rows after SPILL_SECONDS.

Each plugin instance holds one listener connection (outside the pool), LISTENing before any
subscription is reported `started`; PostgreSQL delivers notifications in commit order, and one
reader task hands them, in that order, to every matching subscription's bounded buffer (topic
matching is the shared NATS rule, so wildcard patterns cost nothing extra). A new subscription
sends a barrier notification and is armed when the reader meets it: it receives exactly the
messages committed after the barrier, so everything published after `started` and nothing
published before the subscription existed (no stale backlog of the shared listener). When the
listener connection dies every live stream ends with UNAVAILABLE rather than silently missing
messages; the next Subscribe connects again. A subscriber with more than MAX_BACKLOG unread
messages ends with RESOURCE_EXHAUSTED (SLOW_SUBSCRIBER).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import psycopg
from google.protobuf.message import DecodeError
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as basic_pb

from plugins.postgres.db import Conn, Database, unavailable
from plugins.runtime.context import CallContext
from plugins.runtime.errors import PrismError, ResourceExhausted
from plugins.runtime.pubsub import MatchingSubscriptions, new_message, subscription_not_found

log = logging.getLogger(__name__)

CHANNEL = "prism_pubsub"
#: NOTIFY payloads must be shorter than 8000 bytes; leave room for the envelope
MAX_INLINE = 7000
MAX_BACKLOG = 10_000
SPILL_SECONDS = 300.0


@dataclass(eq=False)
class _Subscription:
    id: str
    namespace: str
    matches: Callable[[list[str]], bool]
    buffer: asyncio.Queue[basic_pb.Message | PrismError | None] = field(
        default_factory=lambda: asyncio.Queue(MAX_BACKLOG + 1)
    )
    live: bool = True
    #: set by the reader at this subscription's barrier; only then do messages reach it
    armed: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, message: basic_pb.Message) -> None:
        if not self.live or not self.armed.is_set():
            return
        if self.buffer.qsize() >= MAX_BACKLOG:
            self.end(
                ResourceExhausted(
                    f"more than {MAX_BACKLOG} messages waited unread; subscription ended",
                    reason="SLOW_SUBSCRIBER",
                    subscription_id=self.id,
                )
            )
        else:
            self.buffer.put_nowait(message)

    def end(self, outcome: PrismError | None) -> None:
        """None ends the stream with OK, an error with its status (room for it is reserved)."""
        if self.live:
            self.live = False
            with contextlib.suppress(asyncio.QueueFull):
                self.buffer.put_nowait(outcome)
            self.armed.set()  # wake a subscriber still waiting for its barrier


class PostgresPubSub(MatchingSubscriptions):
    """pubsub_basic and pubsub_wildcards."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.subscriptions: dict[str, _Subscription] = {}
        self._listener: Conn | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()

    # -- the listener ----------------------------------------------------------------------------

    async def _listen(self, ctx: CallContext) -> None:
        """Make sure the listener connection is LISTENing (connecting if needed)."""
        async with self._connecting:
            if self._reader is not None and not self._reader.done():
                return
            limit = ctx.timeout(self.db.op_timeout)
            conn = await self.db.connect(limit)
            try:
                async with asyncio.timeout(limit):
                    await conn.execute(f"LISTEN {CHANNEL}")
            except (psycopg.Error, TimeoutError) as exc:
                await conn.close()
                raise unavailable(exc) from exc
            self._listener = conn
            self._reader = asyncio.create_task(self._read(conn), name="postgres-pubsub-listener")

    async def _read(self, conn: Conn) -> None:
        try:
            async for note in conn.notifies():
                try:
                    envelope = json.loads(note.payload)
                    ns = str(envelope.get("ns", ""))
                    if "barrier" in envelope:
                        armed = self.subscriptions.get(envelope["barrier"])
                        if armed is not None:
                            armed.armed.set()
                        continue
                    raw = (
                        base64.b64decode(envelope["m"])
                        if "m" in envelope
                        else await self._spilled(int(envelope["ref"]))
                    )
                    message = None if raw is None else basic_pb.Message.FromString(raw)
                except (ValueError, KeyError, TypeError, AttributeError, DecodeError) as exc:
                    # not ours (someone else NOTIFYing on the channel): nothing to deliver
                    log.warning("postgres pubsub: ignoring malformed notification: %r", exc)
                    continue
                if message is None:
                    continue
                tokens = message.topic.split(".")
                for sub in list(self.subscriptions.values()):
                    if sub.namespace == ns and sub.matches(tokens):
                        sub.offer(message)
        except psycopg.Error as exc:
            log.warning("postgres pubsub listener lost: %s", exc)
            self._end_all(unavailable(exc))
        except PrismError as exc:  # reading a spilled message failed
            log.warning("postgres pubsub listener stopped: %s", exc)
            self._end_all(exc)
        finally:
            # whatever stopped the reader, no stream may wait for messages that cannot come
            self._end_all(unavailable(RuntimeError("pub/sub listener stopped")))
            self._listener = None
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    async def _spilled(self, row_id: int) -> bytes | None:
        async with self.db.connection(CallContext(namespace="")) as conn:
            cur = await conn.execute("SELECT body FROM prism_pubsub_spill WHERE id = %s", (row_id,))
            row = await cur.fetchone()
        if row is None:  # swept: the listener lagged SPILL_SECONDS behind
            log.error("postgres pubsub: spilled message %d is gone", row_id)
            self._end_all(unavailable(RuntimeError("listener fell behind; messages lost")))
            return None
        return bytes(row[0])

    def _end_all(self, outcome: PrismError) -> None:
        for sub in list(self.subscriptions.values()):
            sub.end(outcome)
        self.subscriptions.clear()

    async def close(self) -> None:
        self._end_all(unavailable(RuntimeError("plugin closed")))
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def sweep(self, conn: Conn) -> None:
        await conn.execute(
            "DELETE FROM prism_pubsub_spill "
            "WHERE created < statement_timestamp() - make_interval(secs => %s)",
            (SPILL_SECONDS,),
        )

    # -- the interfaces --------------------------------------------------------------------------

    async def publish(
        self, request: basic_pb.PublishRequest, ctx: CallContext
    ) -> basic_pb.PublishResponse:
        message = new_message(request.topic, request.payload, request.attributes)
        raw = message.SerializeToString()
        inline = json.dumps({"ns": ctx.namespace, "m": base64.b64encode(raw).decode("ascii")})
        async with self.db.connection(ctx) as conn:
            if len(inline.encode("utf-8")) <= MAX_INLINE:
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, inline))
            else:
                async with conn.transaction():
                    cur = await conn.execute(
                        "INSERT INTO prism_pubsub_spill (body) VALUES (%s) RETURNING id", (raw,)
                    )
                    row = await cur.fetchone()
                    assert row is not None  # INSERT ... RETURNING always returns the row
                    ref = json.dumps({"ns": ctx.namespace, "ref": int(row[0])})
                    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, ref))
        return basic_pb.PublishResponse(message_id=message.message_id)

    async def _stream(
        self, ctx: CallContext, matches: Callable[[list[str]], bool]
    ) -> AsyncGenerator[tuple[str, basic_pb.Message | None], None]:
        """Yield (id, None) once the subscription is live, then (id, message) per message."""
        await self._listen(ctx)
        sub = _Subscription(secrets.token_urlsafe(16), ctx.namespace, matches)
        self.subscriptions[sub.id] = sub
        try:
            limit = ctx.timeout(self.db.op_timeout)
            async with self.db.connection(ctx) as conn:
                barrier = json.dumps({"barrier": sub.id})
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, barrier))
            try:
                async with asyncio.timeout(limit):
                    await sub.armed.wait()
            except TimeoutError as exc:
                raise unavailable(exc) from exc
            if not sub.live:  # the listener died before the barrier came through
                outcome = sub.buffer.get_nowait()
                if isinstance(outcome, PrismError):
                    raise outcome
                raise unavailable(RuntimeError("subscription ended before it started"))
            yield sub.id, None
            while True:
                item = await sub.buffer.get()
                if item is None:
                    return
                if isinstance(item, PrismError):
                    raise item
                yield sub.id, item
        finally:
            sub.live = False
            self.subscriptions.pop(sub.id, None)

    async def unsubscribe(
        self, request: basic_pb.UnsubscribeRequest, ctx: CallContext
    ) -> basic_pb.UnsubscribeResponse:
        sub = self.subscriptions.get(request.subscription_id)
        if sub is None or sub.namespace != ctx.namespace or not sub.live:
            raise subscription_not_found(request.subscription_id)
        sub.end(None)
        self.subscriptions.pop(sub.id, None)
        return basic_pb.UnsubscribeResponse()
