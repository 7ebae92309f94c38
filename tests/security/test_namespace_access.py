"""Namespace access control (docs/authorization.md, "Namespaces"): on a secured server each RPC of
a thin-interface service needs read, write or admin in its namespace; a namespace's `access:`
map caps each organization's level, and an organization it does not grant cannot tell the
namespace from one that does not exist. Server admins ignore `access:`; `--no-auth` is unaffected.

Real servers (memstore namespaces, and the embedded default on SQLite), keys made through
KeyAdminService, real gRPC calls."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from prism.admin.v1 import key_admin_pb2 as pb
from prism.admin.v1 import key_admin_pb2_grpc as pb_grpc
from prism.interfaces.document.v1 import document_basic_pb2 as doc
from prism.interfaces.document.v1 import document_basic_pb2_grpc as doc_grpc
from prism.interfaces.document.v1 import document_indexing_pb2 as idx
from prism.interfaces.document.v1 import document_indexing_pb2_grpc as idx_grpc
from prism.interfaces.document.v1 import document_query_pb2 as query
from prism.interfaces.document.v1 import document_query_pb2_grpc as query_grpc
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc
from prism.interfaces.keyvalue.v1 import keyvalue_scan_pb2 as scan
from prism.interfaces.keyvalue.v1 import keyvalue_scan_pb2_grpc as scan_grpc
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2 as pubsub
from prism.interfaces.pubsub.v1 import pubsub_basic_pb2_grpc as pubsub_grpc
from prism.interfaces.queue.v1 import queue_basic_pb2 as queue
from prism.interfaces.queue.v1 import queue_basic_pb2_grpc as queue_grpc

from plugins.runtime.grpc_adapter import NAMESPACE_HEADER
from server.app import PrismServer
from tests.support.harness import error_details, running_server

Metadata = tuple[tuple[str, str], ...]
#: one RPC with a valid request, given a channel and the call's metadata
Call = Callable[[grpc.aio.Channel, Metadata], Awaitable[Any]]


def memstore(name: str, pattern: str, slot: str, access: Mapping[str, str] | None = None) -> Any:
    ns: dict[str, Any] = {
        "name": name,
        "pattern": pattern,
        "slots": {slot: {"backend": "memstore"}},
    }
    if access is not None:
        ns["access"] = dict(access)
    return ns


CONFIG = {
    "namespaces": [
        memstore("kv", "keyvalue", "store"),
        memstore("docs", "direct", "document"),
        memstore("capped", "keyvalue", "store", {"acme": "read", "globex": "write"}),
        memstore("shared", "keyvalue", "store", {"*": "read", "globex": "admin"}),
        # the only namespace serving the queue services, granted to globex alone
        memstore("jobs", "direct", "queue", {"globex": "write"}),
        memstore("events", "direct", "pubsub", {"globex": "read"}),
    ]
}

#: key name → (organization, role); "server" is the bootstrap key (admin, no organization)
KEYS = {
    "acme-viewer": ("acme", pb.ROLE_VIEWER),
    "acme-editor": ("acme", pb.ROLE_EDITOR),
    "acme-admin": ("acme", pb.ROLE_ADMIN),
    "globex-editor": ("globex", pb.ROLE_EDITOR),
    "no-org-editor": ("", pb.ROLE_EDITOR),
}


@dataclass(frozen=True)
class Secured:
    server: PrismServer
    keys: dict[str, str]

    def md(self, key: str, namespace: str | None) -> Metadata:
        auth = (("authorization", f"Bearer {self.keys[key]}"),)
        return auth if namespace is None else ((NAMESPACE_HEADER, namespace), *auth)


async def started(config: Any, data_dir: Path) -> AsyncIterator[Secured]:
    async with running_server(config, data_dir, auth=True) as server:
        assert server.bootstrap_key is not None
        keys = {"server": server.bootstrap_key}
        async with grpc.aio.insecure_channel(server.address) as channel:
            admin = pb_grpc.KeyAdminServiceStub(channel)
            auth = (("authorization", f"Bearer {server.bootstrap_key}"),)
            for name, (organization, role) in KEYS.items():
                request = pb.CreateKeyRequest(name=name, organization=organization, roles=[role])
                keys[name] = (await admin.CreateKey(request, metadata=auth)).secret_key
        yield Secured(server, keys)


@pytest.fixture(scope="module")
async def secured(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secured]:
    async for value in started(CONFIG, tmp_path_factory.mktemp("access")):
        yield value


@pytest.fixture(scope="module")
async def secured_sqlite(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secured]:
    """The embedded default: namespace `default` with keyvalue, document and queue on SQLite."""
    async for value in started(None, tmp_path_factory.mktemp("access-sqlite")):
        yield value


async def outcome(call: Awaitable[Any]) -> str:
    """OK, or the status code and ErrorInfo reason the call failed with."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        info, _ = error_details(exc)
        return f"{exc.code().name} {info.reason if info else ''}"
    return "OK"


async def refusal(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """(code, message, ErrorInfo reason and metadata) of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    info, _ = error_details(caught.value)
    assert info is not None
    return (
        caught.value.code(),
        caught.value.details() or "",
        {"reason": info.reason, **info.metadata},
    )


KV: dict[str, Call] = {
    "Get": lambda ch, md: kv_grpc.KeyValueBasicServiceStub(ch).Get(
        kv.GetRequest(key="k"), metadata=md
    ),
    "Scan": lambda ch, md: scan_grpc.KeyValueScanServiceStub(ch).Scan(
        scan.ScanRequest(prefix="k"), metadata=md
    ),
    "Set": lambda ch, md: kv_grpc.KeyValueBasicServiceStub(ch).Set(
        kv.SetRequest(key="k", value=b"v"), metadata=md
    ),
}
INDEX = idx.Index(name="by_n", fields=[idx.IndexField(path="n")])
DOCS: dict[str, Call] = {
    "Find": lambda ch, md: query_grpc.DocumentQueryServiceStub(ch).Find(
        query.FindRequest(collection="c"), metadata=md
    ),
    "Count": lambda ch, md: query_grpc.DocumentQueryServiceStub(ch).Count(
        query.CountRequest(collection="c"), metadata=md
    ),
    "Insert": lambda ch, md: doc_grpc.DocumentBasicServiceStub(ch).Insert(
        doc.InsertRequest(collection="c", json='{"n": 1}'), metadata=md
    ),
    "CreateIndex": lambda ch, md: idx_grpc.DocumentIndexingServiceStub(ch).CreateIndex(
        idx.CreateIndexRequest(collection="c", index=INDEX), metadata=md
    ),
    "DropIndex": lambda ch, md: idx_grpc.DocumentIndexingServiceStub(ch).DropIndex(
        idx.DropIndexRequest(collection="c", name="by_n"), metadata=md
    ),
}


def enqueue(channel: grpc.aio.Channel, md: Metadata) -> Awaitable[Any]:
    return queue_grpc.QueueBasicServiceStub(channel).Enqueue(
        queue.EnqueueRequest(queue="q", payload=b"p"), metadata=md
    )


DENIED = "PERMISSION_DENIED ROLE_REQUIRED"
NOT_FOUND = "NOT_FOUND NAMESPACE_NOT_FOUND"
#: what each role may do in a namespace without `access:`: reads, writes, admin RPCs
BY_ROLE = {
    "acme-viewer": {"Get": "OK", "Scan": "OK", "Set": DENIED, "Find": "OK", "Count": "OK",
                    "Insert": DENIED, "CreateIndex": DENIED, "DropIndex": DENIED},
    "acme-editor": {"Get": "OK", "Scan": "OK", "Set": "OK", "Find": "OK", "Count": "OK",
                    "Insert": "OK", "CreateIndex": DENIED, "DropIndex": DENIED},
    "acme-admin": {"Get": "OK", "Scan": "OK", "Set": "OK", "Find": "OK", "Count": "OK",
                   "Insert": "OK", "CreateIndex": "OK", "DropIndex": "OK"},
}  # fmt: skip


async def role_matrix(secured: Secured, kv_ns: str, docs_ns: str) -> dict[str, dict[str, str]]:
    got: dict[str, dict[str, str]] = {}
    async with grpc.aio.insecure_channel(secured.server.address) as channel:
        for key in BY_ROLE:
            got[key] = {}
            for rpcs, namespace in ((KV, kv_ns), (DOCS, docs_ns)):
                for name, call in rpcs.items():
                    got[key][name] = await outcome(call(channel, secured.md(key, namespace)))
    return got


async def test_roles_in_memstore_keyvalue_and_document_namespaces(secured: Secured) -> None:
    assert await role_matrix(secured, "kv", "docs") == BY_ROLE


async def test_roles_in_the_embedded_sqlite_namespace(secured_sqlite: Secured) -> None:
    assert await role_matrix(secured_sqlite, "default", "default") == BY_ROLE
    async with grpc.aio.insecure_channel(secured_sqlite.server.address) as channel:
        viewer, editor = (secured_sqlite.md(k, None) for k in ("acme-viewer", "acme-editor"))
        assert await outcome(enqueue(channel, viewer)) == DENIED
        assert await outcome(enqueue(channel, editor)) == "OK"


async def test_role_required_names_the_needed_and_the_callers_level(secured: Secured) -> None:
    async with grpc.aio.insecure_channel(secured.server.address) as channel:
        code, message, info = await refusal(
            DOCS["CreateIndex"](channel, secured.md("acme-editor", "docs"))
        )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert {
        "reason": "ROLE_REQUIRED",
        "required": "admin",
        "level": "write",
    }.items() <= info.items()
    assert "CreateIndex needs admin access in namespace 'docs'" in message


async def test_access_map_caps_each_organizations_level(secured: Secured) -> None:
    cases = {
        # acme is capped to read: its editor and even its admin only read
        ("acme-editor", "capped", "Get"): "OK",
        ("acme-editor", "capped", "Set"): DENIED,
        ("acme-admin", "capped", "Set"): DENIED,
        ("globex-editor", "capped", "Set"): "OK",
        # "*": every organization not named, and keys of none
        ("acme-editor", "shared", "Scan"): "OK",
        ("acme-editor", "shared", "Set"): DENIED,
        ("no-org-editor", "shared", "Get"): "OK",
        ("no-org-editor", "shared", "Set"): DENIED,
        # a grant above the key's role does not raise it: an editor stays an editor
        ("globex-editor", "shared", "Set"): "OK",
        # a server admin ignores access:
        ("server", "capped", "Set"): "OK",
        ("server", "shared", "Set"): "OK",
    }
    got = {}
    async with grpc.aio.insecure_channel(secured.server.address) as channel:
        for key, namespace, rpc in cases:
            got[key, namespace, rpc] = await outcome(KV[rpc](channel, secured.md(key, namespace)))
        _, _, info = await refusal(KV["Set"](channel, secured.md("acme-admin", "capped")))
    assert got == cases
    assert (info["required"], info["level"]) == ("write", "read")


async def test_an_organization_not_granted_sees_no_namespace(secured: Secured) -> None:
    """Not granted: the very answer a namespace that does not exist gets — also when the
    namespace does not serve the service (no UNIMPLEMENTED giving it away), and when the
    header is left out and the only namespace serving the service is chosen."""
    async with grpc.aio.insecure_channel(secured.server.address) as channel:

        async def kv_get(key: str, namespace: str) -> tuple[Any, str, dict[str, str]]:
            return await refusal(KV["Get"](channel, secured.md(key, namespace)))

        def as_missing(answer: tuple[Any, str, dict[str, str]], name: str) -> Any:
            code, message, info = answer
            return code, message.replace(name, "NAME"), {**info, "namespace": "NAME"}

        missing = as_missing(await kv_get("acme-editor", "nope"), "nope")
        assert missing[0] == grpc.StatusCode.NOT_FOUND
        assert missing[2]["reason"] == "NAMESPACE_NOT_FOUND"
        # "capped" serves KeyValue but grants no "*"; "jobs" does not serve KeyValue at all
        for key, namespace in (("no-org-editor", "capped"), ("acme-editor", "jobs")):
            assert as_missing(await kv_get(key, namespace), namespace) == missing
        # left out where several namespaces serve KeyValue: the candidates named are those
        # the caller may use ("capped" grants no "*")
        candidates = {}
        for key in ("no-org-editor", "server"):
            _, _, info = await refusal(KV["Get"](channel, secured.md(key, None)))
            candidates[key] = info["reason"], info["candidates"]
        assert candidates == {
            "no-org-editor": ("NAMESPACE_AMBIGUOUS", "kv, shared"),
            "server": ("NAMESPACE_AMBIGUOUS", "capped, kv, shared"),
        }
        # granted, the truth: jobs serves no KeyValue
        assert await outcome(KV["Get"](channel, secured.md("globex-editor", "jobs"))) == (
            "UNIMPLEMENTED INTERFACE_NOT_PROVIDED"
        )

        enqueue_missing = await refusal(enqueue(channel, secured.md("acme-editor", "nope")))
        named = await refusal(enqueue(channel, secured.md("acme-editor", "jobs")))
        unnamed = await refusal(enqueue(channel, secured.md("acme-editor", None)))
        assert unnamed == named
        assert as_missing(named, "jobs") == as_missing(enqueue_missing, "nope")
        assert await outcome(enqueue(channel, secured.md("globex-editor", None))) == "OK"
        assert await outcome(enqueue(channel, secured.md("server", None))) == "OK"


async def test_no_auth_server_ignores_access(tmp_path: Path) -> None:
    nobody = {"namespaces": [memstore("closed", "direct", "document", {})]}
    async with (
        running_server(nobody, tmp_path, auth=False) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        got = {name: await outcome(call(channel, ())) for name, call in DOCS.items()}
    assert got == dict.fromkeys(DOCS, "OK")


async def test_server_streams_are_checked_like_unary_calls(secured: Secured) -> None:
    async def subscribed(channel: grpc.aio.Channel, md: Metadata) -> None:
        stream = pubsub_grpc.PubSubBasicServiceStub(channel).Subscribe(
            pubsub.SubscribeRequest(topic="t"), metadata=md
        )
        try:
            first = await stream.read()
            assert first.HasField("started")
        finally:
            stream.cancel()

    async with grpc.aio.insecure_channel(secured.server.address) as channel:
        publish = pubsub_grpc.PubSubBasicServiceStub(channel).Publish
        got = {
            "globex subscribes": await outcome(
                subscribed(channel, secured.md("globex-editor", None))
            ),
            "globex publishes": await outcome(
                publish(
                    pubsub.PublishRequest(topic="t"), metadata=secured.md("globex-editor", None)
                )
            ),
            "acme subscribes": await outcome(subscribed(channel, secured.md("acme-editor", None))),
        }
    assert got == {
        "globex subscribes": "OK",
        "globex publishes": DENIED,
        "acme subscribes": NOT_FOUND,
    }
