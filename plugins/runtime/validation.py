"""Input rules every backend applies identically, so the same bad request gets the same
INVALID_ARGUMENT (naming the field) whichever backend serves it."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf.duration_pb2 import Duration

from plugins.runtime.errors import InvalidArgument

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 4 * 1024 * 1024
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_BATCH = 1000
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600


def key(value: str, field: str = "key") -> str:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidArgument(field, f"longer than {MAX_KEY_BYTES} bytes")
    return value


def value(data: bytes, field: str = "value") -> bytes:
    if len(data) > MAX_VALUE_BYTES:
        raise InvalidArgument(field, f"larger than {MAX_VALUE_BYTES} bytes")
    return data


def keys(values: Iterable[str], field: str = "keys") -> list[str]:
    result = list(values)
    if not result:
        raise InvalidArgument(field, "must not be empty")
    if len(result) > MAX_BATCH:
        raise InvalidArgument(field, f"more than {MAX_BATCH} entries")
    for i, k in enumerate(result):
        key(k, f"{field}[{i}]")
    return result


def batch_entries(entries: Sequence[Any], field: str = "entries") -> list[tuple[str, bytes]]:
    """(key, value) of every entry of a BatchSet, 1 to MAX_BATCH of them."""
    if not entries:
        raise InvalidArgument(field, "must not be empty")
    if len(entries) > MAX_BATCH:
        raise InvalidArgument(field, f"more than {MAX_BATCH} entries")
    return [
        (key(e.key, f"{field}[{i}].key"), value(e.value, f"{field}[{i}].value"))
        for i, e in enumerate(entries)
    ]


def page_size(size: int, field: str = "page_size") -> int:
    """0 → default; above the maximum → the maximum (AIP-158); negative → INVALID_ARGUMENT."""
    if size < 0:
        raise InvalidArgument(field, "must not be negative")
    if size == 0:
        return DEFAULT_PAGE_SIZE
    return min(size, MAX_PAGE_SIZE)


def ttl_seconds(ttl: Duration, present: bool, field: str = "ttl") -> float:
    if not present:
        raise InvalidArgument(field, "is required")
    seconds = ttl.seconds + ttl.nanos / 1e9
    if seconds <= 0:
        raise InvalidArgument(field, "must be positive")
    if seconds > MAX_TTL_SECONDS:
        raise InvalidArgument(field, "must be at most 10 years")
    return seconds


def encode_page_token(kind: str, scope: str, position: Any) -> str:
    """An opaque token that remembers which listing it belongs to (`kind` + `scope`, e.g. the
    scan prefix) and where to resume (`position`, e.g. the last key returned)."""
    raw = json.dumps({"k": kind, "s": scope, "p": position}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode("utf-8")).decode("ascii").rstrip("=")


def decode_page_token(token: str, kind: str, scope: str, field: str = "page_token") -> Any:
    """The position stored in `token`, or None for the first page. A token from another listing
    (different kind or scope) or not made by encode_page_token is INVALID_ARGUMENT."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError) as exc:
        raise InvalidArgument(field, "malformed page token") from exc
    if not isinstance(data, dict) or data.get("k") != kind or "p" not in data:
        raise InvalidArgument(field, "malformed page token")
    if data.get("s") != scope:
        raise InvalidArgument(field, "page token belongs to a different request")
    return data["p"]


def scan_after(token: str, kind: str, prefix: str, field: str = "page_token") -> str | None:
    """The last key (or name) the listing returned before `token` (None: first page)."""
    after = decode_page_token(token, kind, prefix, field)
    if after is not None and not isinstance(after, str):
        raise InvalidArgument(field, "malformed page token")
    return after


# Documents (proto/prism/interfaces/document/v1/document_basic.proto states these rules) -------
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
MAX_DOCUMENT_DEPTH = 100
_COLLECTION_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")


def collection(name: str, field: str = "collection") -> str:
    if not _COLLECTION_RE.fullmatch(name):
        raise InvalidArgument(field, "must match ^[a-z][a-z0-9_-]{0,62}$")
    return name


def document_id(value: str, field: str = "id") -> str:
    """A required document id (same limits as a key)."""
    return key(value, field)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _checked_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    for name, _ in pairs:
        if not name:
            raise ValueError("member names must not be empty")
        if name.startswith("$"):
            raise ValueError(f"member name {name!r} must not start with '$'")
        if "." in name:
            raise ValueError(f"member name {name!r} must not contain '.'")
    return dict(pairs)  # a repeated name keeps its last value


def _depth(value: Any) -> int:
    """Nesting depth of containers (a flat object is 1), computed without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        deepest = max(deepest, level)
        stack.extend((c, level + 1) for c in children if isinstance(c, dict | list))
    return deepest


def document_json(text: str, field: str = "json") -> dict[str, Any]:
    """Parse a document body: a JSON object within the size, depth and member-name rules."""
    if len(text.encode("utf-8")) > MAX_DOCUMENT_BYTES:
        raise InvalidArgument(field, f"larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        body = json.loads(text, object_pairs_hook=_checked_object, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise InvalidArgument(field, f"nests deeper than {MAX_DOCUMENT_DEPTH} levels") from exc
    except ValueError as exc:
        raise InvalidArgument(field, f"not a valid JSON document: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidArgument(field, "must be a JSON object")
    if _depth(body) > MAX_DOCUMENT_DEPTH:
        raise InvalidArgument(field, f"nests deeper than {MAX_DOCUMENT_DEPTH} levels")
    return body


# Queues ------------------------------------------------------------------------------------
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 4096
MAX_DEQUEUE = 100
MAX_WAIT_SECONDS = 20.0
MAX_VISIBILITY_SECONDS = 12 * 3600.0


def queue_name(name: str, field: str = "queue") -> str:
    """Queue names follow the collection rule: ^[a-z][a-z0-9_-]{0,62}$."""
    return collection(name, field)


def attributes(values: Mapping[str, str], field: str = "attributes") -> dict[str, str]:
    if len(values) > MAX_ATTRIBUTES:
        raise InvalidArgument(field, f"more than {MAX_ATTRIBUTES} entries")
    for name, text in values.items():
        if not name:
            raise InvalidArgument(field, "keys must not be empty")
        if len(name.encode("utf-8")) > MAX_ATTRIBUTE_KEY_BYTES:
            raise InvalidArgument(field, f"key {name[:32]!r} longer than 256 bytes")
        if len(text.encode("utf-8")) > MAX_ATTRIBUTE_VALUE_BYTES:
            raise InvalidArgument(field, f"value of {name[:32]!r} longer than 4096 bytes")
    return dict(values)


def max_messages(count: int, field: str = "max_messages") -> int:
    """0 → 1; otherwise 1 to 100."""
    if count == 0:
        return 1
    if not 1 <= count <= MAX_DEQUEUE:
        raise InvalidArgument(field, f"must be 0 to {MAX_DEQUEUE}")
    return count


def _seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def wait_time(duration: Duration, present: bool, field: str = "wait_time") -> float:
    """Long-poll time in seconds: unset or 0 → 0 (do not wait); at most 20 s."""
    seconds = _seconds(duration) if present else 0.0
    if seconds < 0:
        raise InvalidArgument(field, "must not be negative")
    if seconds > MAX_WAIT_SECONDS:
        raise InvalidArgument(field, "must be at most 20 seconds")
    return seconds


def visibility_timeout(
    duration: Duration, present: bool, field: str = "visibility_timeout"
) -> float:
    """A lease length in seconds: required, above 0, at most 12 hours."""
    if not present:
        raise InvalidArgument(field, "is required")
    seconds = _seconds(duration)
    if seconds <= 0:
        raise InvalidArgument(field, "must be positive")
    if seconds > MAX_VISIBILITY_SECONDS:
        raise InvalidArgument(field, "must be at most 12 hours")
    return seconds


def dequeue(request: Any) -> tuple[str, int, float]:
    """Queue, message count and long-poll time of a Dequeue or DequeueWithTimeout request."""
    return (
        queue_name(request.queue),
        max_messages(request.max_messages),
        wait_time(request.wait_time, request.HasField("wait_time")),
    )


def lease(request: Any) -> float:
    """The visibility timeout a DequeueWithTimeout or ExtendVisibility request asks for."""
    return visibility_timeout(request.visibility_timeout, request.HasField("visibility_timeout"))


def receipt_handle(handle: str, field: str = "receipt_handle") -> str:
    if not handle:
        raise InvalidArgument(field, "must not be empty")
    return handle


MAX_PRIORITY = 1000
MAX_DELAY_SECONDS = 7 * 24 * 3600.0
MAX_DELIVERIES = 1000
DEFAULT_REDRIVE = 100
MAX_REDRIVE = 1000


def priority(value: int, field: str = "priority") -> int:
    if not -MAX_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidArgument(field, f"must be -{MAX_PRIORITY} to {MAX_PRIORITY}")
    return value


def deliver_at(request: Any, now: float) -> float:
    """The due time (unix seconds) of an EnqueueDelayedRequest: `delay` 0 to 7 days after
    `now`, or `deliver_time` (a past one means now) at most 7 days ahead; one is required."""
    schedule = request.WhichOneof("schedule")
    if schedule == "delay":
        delay = _seconds(request.delay)
        if not 0 <= delay <= MAX_DELAY_SECONDS:
            raise InvalidArgument("delay", "must be 0 to 7 days")
        return now + delay
    if schedule == "deliver_time":
        due = max(now, float(request.deliver_time.seconds + request.deliver_time.nanos / 1e9))
        if due > now + MAX_DELAY_SECONDS:
            raise InvalidArgument("deliver_time", "must be at most 7 days ahead")
        return due
    raise InvalidArgument("delay", "delay or deliver_time is required")


def dead_letter(queue: str, dead_letter_queue: str, deliveries: int) -> tuple[str, int] | None:
    """A ConfigureDeadLetter request's (DLQ, max_deliveries), or None to remove the config."""
    if not dead_letter_queue:
        return None
    dlq = queue_name(dead_letter_queue, "dead_letter_queue")
    if dlq == queue:
        raise InvalidArgument("dead_letter_queue", "must differ from queue")
    if not 1 <= deliveries <= MAX_DELIVERIES:
        raise InvalidArgument("max_deliveries", f"must be 1 to {MAX_DELIVERIES}")
    return dlq, deliveries


def redrive_count(count: int, field: str = "max_messages") -> int:
    """0 → 100; otherwise 1 to 1000."""
    limit = count or DEFAULT_REDRIVE
    if not 1 <= limit <= MAX_REDRIVE:
        raise InvalidArgument(field, f"must be 0 to {MAX_REDRIVE}")
    return limit


# PubSub topics and patterns (proto/prism/interfaces/pubsub/v1: NATS subject semantics) --------
MAX_TOPIC_BYTES = 255
MAX_TOPIC_TOKENS = 16
_TOPIC_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")


def _tokens(text: str, field: str, what: str) -> list[str]:
    if not text:
        raise InvalidArgument(field, "must not be empty")
    if len(text.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise InvalidArgument(field, f"longer than {MAX_TOPIC_BYTES} bytes")
    tokens = text.split(".")
    if len(tokens) > MAX_TOPIC_TOKENS:
        raise InvalidArgument(field, f"more than {MAX_TOPIC_TOKENS} tokens")
    for i, token in enumerate(tokens):
        if what == "pattern" and (token == "*" or (token == ">" and i == len(tokens) - 1)):
            continue
        if not _TOPIC_TOKEN_RE.fullmatch(token):
            raise InvalidArgument(field, f"token {i + 1} ({token!r}) is not a valid {what} token")
    return tokens


def topic(text: str, field: str = "topic") -> str:
    """1 to 16 tokens of [A-Za-z0-9_-] joined by '.', at most 255 bytes."""
    _tokens(text, field, "topic")
    return text


def topic_pattern(text: str, field: str = "pattern") -> list[str]:
    """A topic whose tokens may also be `*`, or `>` as the last token; returns the tokens."""
    return _tokens(text, field, "pattern")


MAX_ORDERING_KEY_BYTES = 256


def ordering_key(value: str, field: str = "ordering_key") -> str:
    """PubSubOrderingService's key: non-empty, at most 256 bytes of UTF-8."""
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value.encode("utf-8")) > MAX_ORDERING_KEY_BYTES:
        raise InvalidArgument(field, f"longer than {MAX_ORDERING_KEY_BYTES} bytes")
    return value


def topic_matches(pattern: list[str], topic_tokens: list[str]) -> bool:
    """NATS matching: `*` is exactly one token, a final `>` one or more trailing tokens."""
    for i, token in enumerate(pattern):
        if token == ">":
            return len(topic_tokens) > i
        if i >= len(topic_tokens) or (token != "*" and token != topic_tokens[i]):
            return False
    return len(topic_tokens) == len(pattern)


# Streams (proto/prism/interfaces/stream/v1) ----------------------------------------------------
DEFAULT_ACK_TIMEOUT_SECONDS = 30.0
MIN_ACK_TIMEOUT_SECONDS = 1.0
MAX_ACK_TIMEOUT_SECONDS = 12 * 3600.0
DEFAULT_MAX_IN_FLIGHT = 100
MAX_IN_FLIGHT = 1000
MAX_ACK_OFFSETS = 1000


def stream_name(name: str, field: str = "stream") -> str:
    """Stream, group and consumer names follow the collection rule."""
    return collection(name, field)


def record_key(value: str, field: str = "key") -> str:
    """An optional record key: empty allowed, at most 1024 bytes."""
    if len(value.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidArgument(field, f"longer than {MAX_KEY_BYTES} bytes")
    return value


def non_negative(count: int, field: str) -> int:
    if count < 0:
        raise InvalidArgument(field, "must not be negative")
    return count


def ack_timeout(duration: Duration, present: bool, field: str = "ack_timeout") -> float:
    """A consumer group's ack timeout in seconds: unset or 0 → 30 s; otherwise 1 s to 12 h."""
    seconds = _seconds(duration) if present else 0.0
    if seconds == 0:
        return DEFAULT_ACK_TIMEOUT_SECONDS
    if not MIN_ACK_TIMEOUT_SECONDS <= seconds <= MAX_ACK_TIMEOUT_SECONDS:
        raise InvalidArgument(field, "must be 1 second to 12 hours")
    return seconds


def max_in_flight(count: int, field: str = "max_in_flight") -> int:
    """0 → 100; otherwise 1 to 1000."""
    if count == 0:
        return DEFAULT_MAX_IN_FLIGHT
    if not 1 <= count <= MAX_IN_FLIGHT:
        raise InvalidArgument(field, f"must be 0 to {MAX_IN_FLIGHT}")
    return count


def ack_offsets(offsets: Iterable[int], field: str = "offsets") -> list[int]:
    result = list(offsets)
    if not 1 <= len(result) <= MAX_ACK_OFFSETS:
        raise InvalidArgument(field, f"must hold 1 to {MAX_ACK_OFFSETS} offsets")
    return result


def replay_range(start: int, end: int) -> tuple[int, int]:
    if start <= 0:
        raise InvalidArgument("start_offset", "must be positive")
    if end < start:
        raise InvalidArgument("end_offset", "must be at least start_offset")
    return start, end


def max_age(duration: Duration, present: bool, field: str = "max_age") -> float:
    """A retention age in seconds: unset or 0 → 0 (no limit); otherwise positive, ≤ 10 years."""
    seconds = _seconds(duration) if present else 0.0
    if seconds < 0:
        raise InvalidArgument(field, "must be positive")
    if seconds > MAX_TTL_SECONDS:
        raise InvalidArgument(field, "must be at most 10 years")
    return seconds
