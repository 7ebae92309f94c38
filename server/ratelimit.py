"""Rate limits: a token bucket per caller identity and method, kept in a KV slot so every server
replica sharing that slot draws from the same bucket.

A bucket is one KV entry (tokens left, time of that count). Taking a token reads it (Get, with
its revision), refills it for the time elapsed, and writes it back with CompareAndSwap on that
revision; a lost race re-reads, so concurrent callers on any replica never spend a token twice.
A missing entry is a full bucket, so an idle bucket may expire (keyvalue_ttl) once it would have
refilled anyway. A denied call writes nothing, and its retry delay is remembered locally: the
bucket cannot refill before then (tokens only come from time), so until that moment this
replica denies without asking the store.

When the store fails (down, timing out), `rate_limits.on_store_error` decides: `deny` (the
default) refuses the call with UNAVAILABLE, reason RATE_LIMIT_STORE_UNAVAILABLE (retryable), so
a limiter outage cannot be used to lift the limits; `allow` lets calls through unlimited, for
deployments that prefer availability. Either way a warning is logged (at most every 10 s).

Configured by the top-level `rate_limits:` of the namespace config (see README); without it
the server installs no interceptor.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import math
import struct
import time
from typing import Any

from google.protobuf import duration_pb2
from prism.contracts.keyvalue import KeyValueBasic, KeyValueCAS, KeyValueTTL
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv_pb
from prism.interfaces.keyvalue.v1 import keyvalue_cas_pb2 as cas_pb
from prism.interfaces.keyvalue.v1 import keyvalue_ttl_pb2 as ttl_pb

from plugins.runtime.context import CallContext
from plugins.runtime.errors import Aborted, AlreadyExists, ResourceExhausted, Unavailable
from plugins.runtime.grpc_adapter import abort, current_request_id
from plugins.runtime.interceptors import Context, HookedInterceptor
from prismctl.config import RateRule
from server.auth import current_identity

log = logging.getLogger("prism.ratelimit")


#: the namespace bucket entries live in, inside the store slot
NAMESPACE = "prism-rate-limits"
#: services never limited: load balancers' probes and tooling must keep working
EXEMPT_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
#: a store call taking longer than this counts as the store being unavailable
STORE_TIMEOUT = 2.0
#: CAS attempts per call; each lost race means another caller took a token, so this is only
#: reached under extreme contention on one bucket, and then the call is denied (never over-admitted)
MAX_ATTEMPTS = 64
#: idle buckets expire this long after they would be full again
TTL_MARGIN = 1.0
_STATE = struct.Struct("<dd")  # tokens, unix time of that count


def identity(context: Context) -> str:
    """Who a call is counted against: its API key (set by the auth interceptor, which runs
    first), else the client certificate's subject under mTLS, else the peer's host (all
    connections of one client host share a bucket)."""
    key = current_identity.get()
    if key is not None:
        return key.name
    auth = context.auth_context()
    subject = list(auth.get("x509_subject") or auth.get("x509_common_name") or ())
    if subject:
        return "cert:" + subject[0].decode("utf-8", "replace")
    peer: str = context.peer() or ""
    host = peer.rpartition(":")[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
    return "peer:" + host


def bucket_key(who: str, method: str) -> str:
    """The bucket's KV key, readable while short (keys are capped at 1024 bytes: a long
    certificate subject is hashed)."""
    if len(who.encode()) > 256:
        who = "sha256:" + hashlib.sha256(who.encode()).hexdigest()
    return f"{method}|{who}"


class TokenBuckets:
    """The buckets in the store slot (keyvalue_basic + keyvalue_cas, keyvalue_ttl optional)."""

    def __init__(self, basic: KeyValueBasic, cas: KeyValueCAS, ttl: KeyValueTTL | None) -> None:
        self.basic = basic
        self.cas = cas
        self.ttl = ttl
        #: key → unix time before which the bucket cannot hold a whole token (local pre-check)
        self._empty_until: dict[str, float] = {}
        #: key → "written again since the pending Expire started" (one Expire task per key)
        self._expiring: dict[str, bool] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def take(self, key: str, rate: float, burst: int) -> float:
        """Take one token: 0.0 when admitted, else the seconds until one will be there."""
        now = time.time()
        until = self._empty_until.get(key, 0.0)
        if now < until:
            return until - now
        ctx = CallContext.with_timeout(NAMESPACE, STORE_TIMEOUT)
        for _ in range(MAX_ATTEMPTS):
            got = await self.basic.get(kv_pb.GetRequest(key=key), ctx)
            now = time.time()
            tokens, stamp = refill(got, now, rate, burst)
            if tokens < 1.0:
                delay = (1.0 - tokens) / rate
                self._remember_empty(key, now + delay)
                return delay
            state = _STATE.pack(tokens - 1.0, stamp)
            request = cas_pb.CompareAndSwapRequest(
                key=key, value=state, expected_revision=got.revision if got.found else 0
            )
            try:
                await self.cas.compare_and_swap(request, ctx)
            except (Aborted, AlreadyExists):
                continue  # another caller took a token first: count again
            self._expire_later(key, burst / rate + TTL_MARGIN)
            return 0.0
        return 1.0 / rate

    def _remember_empty(self, key: str, until: float) -> None:
        if len(self._empty_until) >= 4096:
            now = time.time()
            self._empty_until = {k: t for k, t in self._empty_until.items() if t > now}
        self._empty_until[key] = until

    def _expire_later(self, key: str, seconds: float) -> None:
        """Give the bucket its idle expiry off the call's path: writes may clear a key's TTL,
        so every write is followed by an Expire; writes during one just ask for another."""
        if self.ttl is None:
            return
        if key in self._expiring:
            self._expiring[key] = True
            return
        self._expiring[key] = False
        task = asyncio.create_task(self._expire(key, seconds, self.ttl))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expire(self, key: str, seconds: float, ttl: KeyValueTTL) -> None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(math.ceil(seconds * 1e9))
        try:
            while True:
                ctx = CallContext.with_timeout(NAMESPACE, STORE_TIMEOUT)
                await ttl.expire(ttl_pb.ExpireRequest(key=key, ttl=delay), ctx)
                if not self._expiring[key]:
                    return
                self._expiring[key] = False
        except Exception as exc:  # the entry just lingers; the next write tries again
            log.debug("rate-limit bucket %s: expire failed: %r", key, exc)
        finally:
            del self._expiring[key]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def refill(got: kv_pb.GetResponse, now: float, rate: float, burst: int) -> tuple[float, float]:
    """(tokens now, time to store with them). A missing or unreadable entry is a full bucket;
    a stamp ahead of our clock (another replica's) is kept, so skew never adds tokens."""
    if not got.found or len(got.value) != _STATE.size:
        return float(burst), now
    tokens, stamp = _STATE.unpack(got.value)
    if now <= stamp:
        return tokens, stamp
    return min(float(burst), tokens + (now - stamp) * rate), now


class RateLimitInterceptor(HookedInterceptor[RateRule]):
    """Placed after the request-id interceptor: a denied call is RESOURCE_EXHAUSTED (reason
    RATE_LIMITED, RetryInfo) carrying the call's request id. A store that cannot be reached
    denies (UNAVAILABLE) or admits the call as the rule's `on_store_error` says."""

    def __init__(self, rules: list[RateRule], buckets: TokenBuckets) -> None:
        super().__init__()
        self.rules = rules
        self.buckets = buckets
        #: method → its rule, for the methods a rule covers (settled when first wrapped)
        self._rule_of: dict[str, RateRule] = {}
        self._warned_at = 0.0

    def rule_for(self, method: str) -> RateRule | None:
        if method.startswith(EXEMPT_PREFIXES):
            return None
        name = method.lstrip("/")
        return next((r for r in self.rules if fnmatch.fnmatchcase(name, r.method)), None)

    def applies(self, method: str) -> bool:
        rule = self.rule_for(method)
        if rule is not None:
            self._rule_of[method] = rule
        return rule is not None

    def start(self, method: str, request: Any, context: Context, streaming: bool) -> RateRule:
        return self._rule_of[method]

    async def admit(self, method: str, context: Context, rule: RateRule) -> None:
        """Return when the call may proceed; abort it with RESOURCE_EXHAUSTED otherwise."""
        try:
            delay = await self.buckets.take(
                bucket_key(identity(context), method), rule.rate, rule.burst
            )
        except Exception as exc:
            allow = rule.on_store_error == "allow"
            now = time.monotonic()
            if now - self._warned_at > 10.0:
                self._warned_at = now
                effect = "not enforced" if allow else "refusing calls"
                log.warning("rate limits %s: bucket store failed: %r", effect, exc)
            if allow:
                return
            refused = Unavailable(
                "rate limits cannot be checked right now (their store failed); retry later",
                reason="RATE_LIMIT_STORE_UNAVAILABLE",
                method=method.lstrip("/"),
            )
            await abort(context, refused, current_request_id.get(), {})
            return
        if delay > 0.0:
            denied = ResourceExhausted(
                f"rate limit exceeded for {method.lstrip('/')} ({rule.rate:g}/s, burst "
                f"{rule.burst}); retry in {delay:.3f}s",
                retry_delay=delay,
                reason="RATE_LIMITED",
                method=method.lstrip("/"),
                rule=rule.method,
            )
            await abort(context, denied, current_request_id.get(), {})
