"""API keys and the authentication interceptor.

A key is `prism_<key id>_<secret>`: the id (16 hex characters) finds the record, the secret is
checked against a salted scrypt hash of it. Only the hash is stored (in the `security` store
slot: keyvalue_basic + keyvalue_scan), so the full key is shown once, at creation.

Hot path: scrypt costs tens of milliseconds on purpose, so a secret that verified once is
remembered in process (as a SHA-256 of the secret, compared in constant time) and later calls
cost one dictionary lookup. The record itself (revoked, expiry, roles) is re-read from the store
at most every `refresh` seconds (default 2), so a revocation on any replica takes effect
everywhere within that time; on the replica that revoked it, at once.

Guessing: after `lockout_failures` (5) scrypt checks of one key id in a row that did not verify,
within `lockout_window` seconds (60) of the first, further secrets for that id are refused as
INVALID_KEY without hashing (the same answer as a wrong secret: the lockout is not revealed)
until the window has passed. A secret this replica already verified keeps working meanwhile,
so a lockout never locks out the key's holder once it was in use; a correct secret first seen
during a lockout is refused like any other. The count is per replica. At most
`MAX_CONCURRENT_SCRYPT` checks run at once, and callers presenting the same unverified secret
share one check, so a flood of guesses cannot exhaust the worker threads.

The interceptor runs after the request-id one and before rate limits: it puts the caller's
identity in `current_identity` (what rate limits count against and the audit log records), and
records every mutating or denied call in the audit log (server/audit.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from base64 import urlsafe_b64decode, urlsafe_b64encode
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from prism.admin.v1 import key_admin_pb2 as pb
from prism.contracts.keyvalue import KeyValueBasic, KeyValueScan
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv_pb
from prism.interfaces.keyvalue.v1 import keyvalue_scan_pb2 as scan_pb

from plugins.runtime import errors
from plugins.runtime.context import CallContext
from plugins.runtime.grpc_adapter import (
    abort,
    call_headers,
    current_request_id,
    routed_namespace,
)
from plugins.runtime.interceptors import Context, HookedInterceptor
from server.audit import AuditLog, AuditRecord
from server.authz import (
    ADMIN_API_SCOPE,
    LEVEL_NAMES,
    SCOPE,
    Level,
    Principal,
    current_principal,
    principal_for,
    scope_level,
)
from server.patterns.artifact_registry.model import check_organization

log = logging.getLogger("prism.auth")


#: the namespace key records live in, inside the security store slot
NAMESPACE = "prism-security"
KEY_PATTERN = re.compile(r"prism_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
#: probes and tooling stay open (and are not audited)
OPEN_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
#: RPC names starting with one of these only read; every other RPC is a mutation and audited
READ_ONLY_PREFIXES = (
    "Get", "List", "Find", "Count", "Search", "Scan", "Exists", "Peek", "Read", "Describe",
    "Aggregate", "Subscribe", "Watch", "Query", "Resolve", "Export", "Replay", "BatchGet",
)  # fmt: skip
#: denied calls (by status code name) are audited even when the RPC only reads
DENIED = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"})
#: request fields naming the resource a call acts on, first present wins
RESOURCE_FIELDS = ("key", "id", "name", "slug", "collection", "queue", "topic", "stream")
SCRYPT = {"n": 2**14, "r": 8, "p": 1}
STORE_TIMEOUT = 5.0
LAST_USED_EVERY = 60.0
#: unverified checks of one key id in a row before it is locked out, and the window (seconds)
LOCKOUT_FAILURES = 5
LOCKOUT_WINDOW = 60.0
#: key ids whose failures are remembered at most; beyond, the oldest entries are forgotten
MAX_FAILURE_ENTRIES = 10_000
#: scrypt checks running at once (each holds a worker thread for ~50 ms of CPU)
MAX_CONCURRENT_SCRYPT = 4
ROLE_NAMES = {v.number: v.name.removeprefix("ROLE_").lower() for v in pb.Role.DESCRIPTOR.values}


@dataclass(frozen=True)
class Identity:
    """Who an authenticated call comes from."""

    key_id: str
    owner: str
    organization: str
    roles: tuple[str, ...]
    scopes: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"key:{self.key_id}"

    @property
    def server_admin(self) -> bool:
        """Admin of no organization (the bootstrap key is one): admin everywhere, unless its
        scopes say otherwise."""
        return not self.organization and "admin" in self.roles

    def principal(self, grant: Level) -> Principal:
        """This key as authorization sees it in a namespace granting its organization `grant`."""
        return principal_for(self.key_id, self.organization, self.owner, self.roles, grant)


#: the caller of the call being handled; None when unauthenticated (auth off, or denied)
current_identity: ContextVar[Identity | None] = ContextVar("prism_identity", default=None)
#: the audit identity of a call refused with a genuine but revoked or expired key
_refused_key: ContextVar[str] = ContextVar("prism_refused_key", default="")


@dataclass(frozen=True)
class KeyRecord:
    """What the store holds for a key: metadata plus the salted hash of its secret."""

    id: str
    name: str
    owner: str
    organization: str
    roles: list[str]
    scopes: list[str]
    created: float
    expires: float | None
    revoked: float | None
    salt: str
    hash: str
    kdf: dict[str, int] = field(default_factory=lambda: dict(SCRYPT))

    def identity(self) -> Identity:
        return Identity(
            self.id, self.owner, self.organization, tuple(self.roles), tuple(self.scopes)
        )

    def to_proto(self, last_used: float | None) -> pb.ApiKey:
        key = pb.ApiKey(
            id=self.id,
            name=self.name,
            owner=self.owner,
            organization=self.organization,
            roles=[pb.Role.Value("ROLE_" + r.upper()) for r in self.roles],
            scopes=self.scopes,
            create_time=_timestamp(self.created),
        )
        for name, value in (
            ("expire_time", self.expires),
            ("revoke_time", self.revoked),
            ("last_used_time", last_used),
        ):
            if value is not None:
                getattr(key, name).CopyFrom(_timestamp(value))
        return key


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(round(seconds * 1e9))
    return ts


def hash_secret(secret: str, salt: bytes, kdf: dict[str, int]) -> bytes:
    """scrypt: memory-hard, so a leaked store does not give keys away to brute force."""
    return hashlib.scrypt(
        secret.encode(), salt=salt, n=kdf["n"], r=kdf["r"], p=kdf["p"], maxmem=64 * 1024 * 1024
    )


def _unauthenticated(reason: str, message: str, key_id: str | None = None) -> errors.PrismError:
    """`key_id` only for a key whose secret verified (revoked, expired): the audit log then
    names it; an unproven claim stays anonymous."""
    return errors.Unauthenticated(message, reason=reason, key_id=key_id)


def _token(scan_token: str, after: str) -> str:
    return urlsafe_b64encode(json.dumps([scan_token, after]).encode()).decode()


def _cursor(token: str) -> tuple[str, str]:
    """(scan page token, last key id returned) of a ListKeys page token."""
    if not token:
        return "", ""
    try:
        decoded = json.loads(urlsafe_b64decode(token.encode()))
    except ValueError:
        decoded = None
    if not (
        isinstance(decoded, list)
        and len(decoded) == 2
        and all(isinstance(part, str) for part in decoded)
    ):
        raise errors.InvalidArgument("page_token", "not a token ListKeys returned")
    return decoded[0], decoded[1]


class KeyStore:
    """Key records in a KV slot: `key/<id>` holds the record (JSON), `used/<id>` the last-used
    time, apart so that recording use never overwrites a revocation."""

    def __init__(
        self,
        basic: KeyValueBasic,
        scan: KeyValueScan,
        refresh: float = 2.0,
        lockout_failures: int = LOCKOUT_FAILURES,
        lockout_window: float = LOCKOUT_WINDOW,
    ) -> None:
        self.basic = basic
        self.scan = scan
        self.refresh = refresh
        self.lockout_failures = lockout_failures
        self.lockout_window = lockout_window
        #: key id → (checks since its last verified secret, monotonic start of their window)
        self._failures: dict[str, tuple[int, float]] = {}
        #: (key id, SHA-256 of a secret) → its scrypt check in flight, shared by every caller
        self._checking: dict[tuple[str, bytes], asyncio.Future[bool]] = {}
        self._scrypt_slots = asyncio.Semaphore(MAX_CONCURRENT_SCRYPT)
        #: key id → (record or None for unknown, monotonic time read)
        self._records: dict[str, tuple[KeyRecord | None, float]] = {}
        #: key id → SHA-256 of the secret that verified against the stored hash
        self._verified: dict[str, bytes] = {}
        self._used_written: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def _ctx() -> CallContext:
        return CallContext.with_timeout(NAMESPACE, STORE_TIMEOUT)

    async def get(self, key_id: str) -> KeyRecord | None:
        got = await self.basic.get(kv_pb.GetRequest(key=f"key/{key_id}"), self._ctx())
        return KeyRecord(**json.loads(got.value)) if got.found else None

    async def put(self, record: KeyRecord) -> None:
        value = json.dumps(asdict(record)).encode()
        await self.basic.set(kv_pb.SetRequest(key=f"key/{record.id}", value=value), self._ctx())
        self._records[record.id] = (record, time.monotonic())

    async def last_used(self, key_id: str) -> float | None:
        got = await self.basic.get(kv_pb.GetRequest(key=f"used/{key_id}"), self._ctx())
        return float(got.value) if got.found else None

    async def page(
        self, size: int, token: str, keep: Callable[[KeyRecord], bool]
    ) -> tuple[list[KeyRecord], str]:
        """Up to `size` records `keep` accepts, in id order, and the next page's token: "" when
        no accepted record is left. Scan pages are read until the page is full and one more
        accepted record is seen, so a filter never ends a listing early nor leaves an empty last
        page; the token is (scan page to resume, last id returned), as a page may end in the
        middle of a scan page."""
        scan_token, after = _cursor(token)
        found: list[KeyRecord] = []
        while True:
            request = scan_pb.ScanRequest(prefix="key/", page_size=size, page_token=scan_token)
            got = await self.scan.scan(request, self._ctx())
            for entry in got.entries:
                record = KeyRecord(**json.loads(entry.value))
                if record.id <= after or not keep(record):
                    continue
                if len(found) == size:  # there is a next page, starting on this scan page
                    return found, _token(scan_token, found[-1].id)
                found.append(record)
            if not got.next_page_token:
                return found, ""
            scan_token = got.next_page_token

    async def all(self) -> AsyncIterator[KeyRecord]:
        token = ""
        while True:
            records, token = await self.page(500, token, lambda _: True)
            for record in records:
                yield record
            if not token:
                return

    async def create(
        self,
        name: str,
        owner: str,
        organization: str,
        roles: list[str],
        scopes: list[str],
        expires: float | None,
    ) -> tuple[KeyRecord, str]:
        """A new key: (its record, the full key — never stored, shown once)."""
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        digest = await asyncio.to_thread(hash_secret, secret, salt, SCRYPT)
        record = KeyRecord(
            id=key_id,
            name=name,
            owner=owner,
            organization=organization,
            roles=roles,
            scopes=scopes,
            created=time.time(),
            expires=expires,
            revoked=None,
            salt=salt.hex(),
            hash=digest.hex(),
        )
        await self.put(record)
        return record, f"prism_{key_id}_{secret}"

    async def revoke(self, key_id: str, member_of: Callable[[str], bool]) -> KeyRecord:
        """Revoke a key of an organization `member_of` accepts; any other is NOT_FOUND, exactly
        as an unknown id."""
        record = await self.get(key_id)
        if record is None or not member_of(record.organization):
            raise errors.NotFound(f"no API key '{key_id}'", reason="API_KEY_NOT_FOUND", id=key_id)
        if record.revoked is None:
            record = replace(record, revoked=time.time())
            await self.put(record)
        self._verified.pop(key_id, None)
        return record

    async def _cached(self, key_id: str) -> KeyRecord | None:
        now = time.monotonic()
        hit = self._records.get(key_id)
        if hit is not None and now - hit[1] < self.refresh:
            return hit[0]
        record = await self.get(key_id)
        if len(self._records) >= 10_000:
            self._records.clear()
        self._records[key_id] = (record, now)
        return record

    async def verify(self, header: str) -> Identity:
        """The identity behind an `authorization` header value, or Unauthenticated."""
        scheme, _, token = header.strip().partition(" ")
        match = KEY_PATTERN.fullmatch(token.strip()) if scheme.lower() == "bearer" else None
        if match is None:
            raise _unauthenticated(
                "MALFORMED_CREDENTIALS",
                "the authorization metadata must be 'Bearer prism_<key id>_<secret>'",
            )
        key_id, secret = match.groups()
        record = await self._cached(key_id)
        if record is None:
            raise _unauthenticated("INVALID_KEY", "unknown or wrong API key")
        fingerprint = hashlib.sha256(secret.encode()).digest()
        known = self._verified.get(key_id)
        if known is None or not hmac.compare_digest(known, fingerprint):
            if not await self._secret_matches(record, secret, fingerprint):
                raise _unauthenticated("INVALID_KEY", "unknown or wrong API key")
            self._verified[key_id] = fingerprint
        if record.revoked is not None:
            raise _unauthenticated("KEY_REVOKED", f"API key {key_id} has been revoked", key_id)
        if record.expires is not None and record.expires <= time.time():
            raise _unauthenticated("KEY_EXPIRED", f"API key {key_id} has expired", key_id)
        self._note_use(key_id)
        return record.identity()

    async def _secret_matches(self, record: KeyRecord, secret: str, fingerprint: bytes) -> bool:
        """The scrypt check of a secret not verified before: False at once while the key id is
        locked out; callers presenting the same secret meanwhile share one check."""
        checking = (record.id, fingerprint)
        pending = self._checking.get(checking)
        if pending is None:
            if not self._count_check(record.id):
                return False
            pending = asyncio.ensure_future(self._scrypt(record, secret))
            self._checking[checking] = pending
            pending.add_done_callback(lambda _: self._checking.pop(checking, None))
        return await asyncio.shield(pending)

    def _count_check(self, key_id: str) -> bool:
        """Count one more check of `key_id` (a success clears the count); False when the
        window's checks are spent. Counting before hashing bounds the scrypt runs per window
        also under concurrent guesses."""
        now = time.monotonic()
        count, start = self._failures.get(key_id, (0, now))
        if now - start >= self.lockout_window:
            count, start = 0, now
        if count >= self.lockout_failures:
            return False
        if key_id not in self._failures and len(self._failures) >= MAX_FAILURE_ENTRIES:
            self._forget_failures(now)
        self._failures[key_id] = (count + 1, start)
        return True

    def _forget_failures(self, now: float) -> None:
        """Bound the failure table: drop passed windows, then the oldest entries."""
        window = self.lockout_window
        self._failures = {k: v for k, v in self._failures.items() if now - v[1] < window}
        excess = len(self._failures) - MAX_FAILURE_ENTRIES + 1
        for key_id in list(self._failures)[: max(excess, 0)]:
            del self._failures[key_id]

    async def _scrypt(self, record: KeyRecord, secret: str) -> bool:
        async with self._scrypt_slots:
            salt = bytes.fromhex(record.salt)
            digest = await asyncio.to_thread(hash_secret, secret, salt, record.kdf)
        matches = hmac.compare_digest(digest, bytes.fromhex(record.hash))
        if matches:
            self._failures.pop(record.id, None)
        return matches

    def _note_use(self, key_id: str) -> None:
        """Last-used time, written off the call's path and at most once a minute per key."""
        now = time.monotonic()
        if now - self._used_written.get(key_id, -LAST_USED_EVERY) < LAST_USED_EVERY:
            return
        self._used_written[key_id] = now
        request = kv_pb.SetRequest(key=f"used/{key_id}", value=repr(time.time()).encode())
        task = asyncio.create_task(self._write_quietly(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_quietly(self, request: kv_pb.SetRequest) -> None:
        try:
            await self.basic.set(request, self._ctx())
        except Exception as exc:  # only the last-used time is late
            log.debug("recording key use failed: %r", exc)

    async def has_admin(self) -> bool:
        async for record in self.all():
            usable = record.expires is None or record.expires > time.time()
            if "admin" in record.roles and record.revoked is None and usable:
                return True
        return False

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)


def is_mutation(method: str) -> bool:
    return not method.rpartition("/")[2].startswith(READ_ONLY_PREFIXES)


def resource_of(request: object, depth: int = 1) -> str:
    """The key, id, name... the request acts on, when it has an obvious one: a field of the
    request, else of a message it carries (CreateArtifact's `artifact`, ...)."""
    if not isinstance(request, Message):
        return ""
    fields = request.DESCRIPTOR.fields_by_name
    for name in RESOURCE_FIELDS:
        value = getattr(request, name) if name in fields else None
        if isinstance(value, str) and value:
            return value[:256]
    if depth:
        for field in request.DESCRIPTOR.fields:
            if field.message_type is not None and not field.is_repeated:
                found = resource_of(getattr(request, field.name), depth - 1)
                if found:
                    return found
    return ""


def _outcome(context: Context, failed: BaseException | None) -> tuple[str, str]:
    """(status code name, ErrorInfo reason) the call ended with."""
    if failed is None:
        return "OK", ""
    code = context.code()
    if not isinstance(code, grpc.StatusCode):
        cancelled = isinstance(failed, asyncio.CancelledError)
        return ("CANCELLED" if cancelled else "INTERNAL"), ""
    reason = ""
    trailing: Any = context.trailing_metadata() or ()
    for key, value in trailing:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
    return code.name, reason


#: (peer, namespace header) of a call
Origin = tuple[str, str]


class AuthInterceptor(HookedInterceptor[Origin]):
    """Authenticates (when `keys` is given; None: auth off, every caller anonymous) and audits.

    Placed right after the request-id interceptor, so a denial carries the request id and the
    rate limiter placed after it sees the identity."""

    def __init__(self, keys: KeyStore | None, audit: AuditLog) -> None:
        super().__init__()
        self.keys = keys
        self.audit = audit

    def applies(self, method: str) -> bool:
        return not method.startswith(OPEN_PREFIXES)

    def start(self, method: str, request: Any, context: Context, streaming: bool) -> Origin:
        """(peer, namespace) of the call, read while it is alive: a server stream may end after
        the call is gone, and asking a finished call for its peer crashes grpc."""
        return context.peer() or "", call_headers(context).namespace

    async def admit(self, method: str, context: Context, state: Origin) -> None:
        await self.authenticate(context)

    async def authenticate(self, context: Context) -> None:
        if self.keys is None:
            return
        header = call_headers(context).authorization
        try:
            if header is None:
                raise _unauthenticated(
                    "MISSING_CREDENTIALS",
                    "this server requires an API key: send 'authorization: Bearer <key>'",
                )
            identity = await self.keys.verify(header)
            current_identity.set(identity)
            # the key API's view; a routed call's namespace replaces it (server/router.py)
            current_principal.set(identity.principal(scope_level(identity.scopes, ADMIN_API_SCOPE)))
        except errors.PrismError as exc:
            if "key_id" in exc.metadata:
                _refused_key.set(f"key:{exc.metadata['key_id']}")
            await abort(context, exc, current_request_id.get(), {})
        except Exception as exc:  # the key store cannot be read: fail closed, retryable
            log.warning("authentication failed: key store error: %r", exc)
            denied = errors.Unavailable(f"cannot verify the API key: {exc}")
            await abort(context, denied, current_request_id.get(), {})

    def finish(
        self,
        method: str,
        request: Any,
        context: Context,
        state: Origin,
        failed: BaseException | None,
    ) -> None:
        """The audit entry of a mutating or denied call."""
        outcome, reason = _outcome(context, failed)
        if not is_mutation(method) and outcome not in DENIED:
            return
        identity = current_identity.get()
        self.audit.record(
            AuditRecord(
                identity=identity.name if identity else _refused_key.get() or "anonymous",
                peer=state[0],
                method=method,
                namespace=routed_namespace(context) or state[1],
                resource=resource_of(request),
                outcome=outcome,
                reason=reason,
                request_id=current_request_id.get(),
            )
        )


MAX_PAGE = 1000


def _page_size(size: int) -> int:
    if size < 0 or size > MAX_PAGE:
        raise errors.InvalidArgument("page_size", f"must be 0 (default 100) to {MAX_PAGE}")
    return size or 100


def _check_scopes(scopes: list[str], creator: Identity | None) -> None:
    """Scopes are `<namespace>` or `<namespace>:<read|write|admin>` (`prism-admin` for the key
    API). A scoped key mints only keys scoped within its own scopes: key administration must
    not be a way out of them."""
    for i, scope in enumerate(scopes):
        match = SCOPE.fullmatch(scope)
        if match is None:
            raise errors.InvalidArgument(
                f"scopes[{i}]",
                "must be a namespace name, optionally with ':read', ':write' or ':admin' "
                f"(or '{ADMIN_API_SCOPE}' for key administration)",
            )
        if creator is None or not creator.scopes:
            continue
        wanted = LEVEL_NAMES[match["level"] or "admin"]
        if scope_level(creator.scopes, match["name"]) < wanted:
            raise errors.PermissionDenied(
                f"scope '{scope}' exceeds this API key's own scopes", reason="SCOPE_EXCEEDED"
            )
    if creator is not None and creator.scopes and not scopes:
        raise errors.PermissionDenied(
            "a scoped API key can only create scoped keys (give --scope)", reason="SCOPE_EXCEEDED"
        )


class KeyAdmin:
    """KeyAdminService (proto/prism/admin/v1/key_admin.proto), scoped by organization: a server
    admin (admin role, no organization) manages every key and reads the audit log; an
    organization admin manages its organization's keys only, and other organizations' keys do
    not exist for it. With auth off (`enforced` False) the caller is the system: everything."""

    def __init__(self, keys: KeyStore, audit: AuditLog, enforced: bool) -> None:
        self.keys = keys
        self.audit = audit
        self.enforced = enforced

    def _caller(self) -> Principal:
        """The caller; with auth on, a call no key authenticated is refused (fail closed, were
        the auth interceptor ever missing: the principal would default to the system)."""
        if self.enforced and current_identity.get() is None:
            raise _admin_required()
        return current_principal.get()

    def _key_admin(self) -> Principal:
        principal = self._caller()
        if principal.level < Level.ADMIN:
            raise _admin_required()
        return principal

    async def create_key(
        self, request: pb.CreateKeyRequest, ctx: CallContext
    ) -> pb.CreateKeyResponse:
        principal = self._key_admin()
        organization = request.organization
        if not principal.member_of(organization):  # checked first: it reveals nothing
            target = f"organization '{organization}'" if organization else "no organization"
            raise errors.PermissionDenied(
                f"this API key administers organization '{principal.organization}' only; a key "
                f"of {target} needs a server admin key",
                reason="NOT_ORGANIZATION_MEMBER",
                organization=organization,
            )
        if organization:
            check_organization(organization, "organization")
        if not 1 <= len(request.name) <= 100:
            raise errors.InvalidArgument("name", "must be 1-100 characters")
        if not request.roles or pb.ROLE_UNSPECIFIED in request.roles:
            raise errors.InvalidArgument("roles", "give at least one of admin, editor, viewer")
        _check_scopes(list(request.scopes), current_identity.get())
        expires = None
        if request.HasField("expire_time"):
            expires = request.expire_time.ToNanoseconds() / 1e9
            if expires <= time.time():
                raise errors.InvalidArgument("expire_time", "must be in the future")
        record, key = await self.keys.create(
            request.name,
            request.owner,
            organization,
            sorted({ROLE_NAMES[r] for r in request.roles}),
            list(request.scopes),
            expires,
        )
        return pb.CreateKeyResponse(key=record.to_proto(None), secret_key=key)

    async def list_keys(self, request: pb.ListKeysRequest, ctx: CallContext) -> pb.ListKeysResponse:
        principal = self._key_admin()

        def shown(record: KeyRecord) -> bool:
            live = request.include_revoked or record.revoked is None
            return live and principal.member_of(record.organization)

        records, token = await self.keys.page(
            _page_size(request.page_size), request.page_token, shown
        )
        used = await asyncio.gather(*(self.keys.last_used(r.id) for r in records))
        return pb.ListKeysResponse(
            keys=[r.to_proto(u) for r, u in zip(records, used, strict=True)],
            next_page_token=token,
        )

    async def revoke_key(
        self, request: pb.RevokeKeyRequest, ctx: CallContext
    ) -> pb.RevokeKeyResponse:
        principal = self._key_admin()
        if not request.id:
            raise errors.InvalidArgument("id", "must name a key id")
        record = await self.keys.revoke(request.id, principal.member_of)
        return pb.RevokeKeyResponse(key=record.to_proto(await self.keys.last_used(record.id)))

    async def query_audit(
        self, request: pb.QueryAuditRequest, ctx: CallContext
    ) -> pb.QueryAuditResponse:
        if not self._caller().sees_everything:
            raise errors.PermissionDenied(
                "the audit log covers every organization: reading it needs a server admin key "
                "(admin role, no organization)",
                reason="SERVER_ADMIN_REQUIRED",
            )
        _page_size(request.page_size)
        outcome = request.outcome.upper()
        if outcome and outcome not in grpc.StatusCode.__members__:
            raise errors.InvalidArgument("outcome", f"'{request.outcome}' is no status code name")
        return await self.audit.query(request)


def _admin_required() -> errors.PrismError:
    return errors.PermissionDenied(
        "this RPC needs an API key with the admin role", reason="ADMIN_REQUIRED"
    )


async def bootstrap_key(keys: KeyStore) -> str | None:
    """The first start of a secured server: with no usable admin key in the store, make one
    (returned once for printing; only its hash is stored)."""
    if await keys.has_admin():
        return None
    _, key = await keys.create("bootstrap", "bootstrap", "", ["admin"], [], None)
    return key
