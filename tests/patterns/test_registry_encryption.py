"""Encryption at rest of private artifact sources (docs/authorization.md, "Encryption at rest"),
checked where it matters: in the raw storage of the backends (the SQLite file, PostgreSQL rows,
every Redis key and value of the L2 cache), never only through the service that decrypts.

Each source carries a unique marker word: a private marker must never be stored in clear, a
public one must be (which proves the raw reads look in the right place)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import sqlite3
import stat
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest
import redis
from google.protobuf.field_mask_pb2 import FieldMask
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2 as pb
from prism.patterns.artifact_registry.v1 import artifact_registry_pb2_grpc as ar_grpc

from server import crypto
from server.crypto import Keyring, parse_header
from server.patterns.artifact_registry.sealing import SEALED
from tests.support.harness import error_details, running_server
from tests.support.servers import ThrowawayServer, throwaway
from tests.support.wait import eventually

if TYPE_CHECKING:
    from prism.patterns.artifact_registry.v1.artifact_registry_pb2_grpc import (
        ArtifactRegistryServiceAsyncStub as AsyncStub,
    )

ORG = "acme"
KEY_1 = base64.b64decode(crypto.new_key())
KEY_2 = base64.b64decode(crypto.new_key())
#: an edit of one L2 cache entry ({"d": stored form, "r": revision}); None removes it
CacheEdit = Callable[[dict[str, Any]], dict[str, Any] | None]


def marker() -> str:
    """One search word (lower-case letters and digits) found nowhere else."""
    return "zq" + uuid.uuid4().hex


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def envelope_key(body: dict[str, Any]) -> str:
    """The key id a stored version is sealed under ("" when it is not sealed)."""
    return parse_header(base64.b64decode(body[SEALED])).key_id if SEALED in body else ""


class SqliteStorage:
    """The embedded default: store and L2 cache in one SQLite file of the data directory."""

    def __init__(self, data_dir: Path, namespace: str) -> None:
        self.path = data_dir / "prism.db"
        self.namespace = namespace

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=10)
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    def texts(self) -> list[str]:
        """Every document body, search-word row and cache key and value, as text."""
        with self._db() as db:
            rows = db.execute("SELECT body FROM docs").fetchall()
            rows += db.execute("SELECT text FROM doc_words").fetchall()
            rows += db.execute("SELECT key || ' ' || CAST(value AS TEXT) FROM kv").fetchall()
        return [str(r[0]) for r in rows]

    def file_bytes(self) -> bytes:
        """The database file and its write-ahead log, byte for byte."""
        wal = self.path.with_name(self.path.name + "-wal")
        return self.path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")

    def body(self, doc_id: str) -> dict[str, Any]:
        with self._db() as db:
            (text,) = db.execute(
                "SELECT body FROM docs WHERE ns = ? AND collection = 'artifacts' AND id = ?",
                (self.namespace, doc_id),
            ).fetchone()
        return dict(json.loads(text))

    def edit_cached(self, key: str, change: CacheEdit) -> None:
        with self._db() as db:
            where = (self.namespace, key)
            (value,) = db.execute("SELECT value FROM kv WHERE ns = ? AND key = ?", where).fetchone()
            entry = change(json.loads(value))
            if entry is None:
                db.execute("DELETE FROM kv WHERE ns = ? AND key = ?", where)
            else:
                db.execute(
                    "UPDATE kv SET value = ? WHERE ns = ? AND key = ?",
                    (json.dumps(entry).encode(), *where),
                )

    def overwrite(self, doc_id: str, body: dict[str, Any]) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE docs SET body = ? WHERE ns = ? AND collection = 'artifacts' AND id = ?",
                (json.dumps(body), self.namespace, doc_id),
            )


class PostgresStorage:
    """The `store` slot on PostgreSQL (rows of prism_docs, prism_kv)."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace

    def _query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cursor = conn.execute(sql, args)
            return cursor.fetchall() if cursor.description else []

    def texts(self) -> list[str]:
        rows = self._query(
            "SELECT body::text || ' ' || array_to_string(words, ' ') FROM prism_docs"
        )
        rows += self._query("SELECT encode(key, 'escape') || ' ' || encode(value, 'escape') "
                            "FROM prism_kv")  # fmt: skip
        return [str(r[0]) for r in rows]

    def body(self, doc_id: str) -> dict[str, Any]:
        ((body,),) = self._query(
            "SELECT body FROM prism_docs WHERE ns = %s AND collection = 'artifacts' AND id = %s",
            self.namespace,
            doc_id,
        )
        return dict(body)

    def overwrite(self, doc_id: str, body: dict[str, Any]) -> None:
        self._query(
            "UPDATE prism_docs SET body = %s::jsonb "
            "WHERE ns = %s AND collection = 'artifacts' AND id = %s",
            json.dumps(body),
            self.namespace,
            doc_id,
        )


def _redis_values(client: redis.Redis, key: bytes) -> list[Any]:
    kind = client.type(key)
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if kind == "string":
        return [client.get(key)]
    if kind == "hash":
        return [x for pair in client.hgetall(key).items() for x in pair]
    if kind == "zset":
        return list(client.zrange(key, 0, -1))
    if kind == "list":
        return list(client.lrange(key, 0, -1))
    assert kind in ("set", "none"), kind
    return list(client.smembers(key))


def redis_texts(url: str) -> list[str]:
    """Every key and value in the Redis server, whatever its type."""
    with redis.Redis.from_url(url) as client:
        return [
            bytes(part).decode("utf-8", "replace")
            for key in client.scan_iter(count=1000)
            for part in [key, *_redis_values(client, key)]
        ]


@dataclass
class Setup:
    """One backend combination: how to configure the server and read its raw storage."""

    name: str
    data_dir: Path
    config: dict[str, Any] | None  # None: the embedded default (registry on SQLite)
    storage: SqliteStorage | PostgresStorage
    keyring: Keyring | None  # None: the server's own keyring in its data directory
    redis_url: str = ""
    primary: str = "k1"

    def edit_cached(self, doc_id: str, change: CacheEdit) -> None:
        """Change (None: remove) a version's L2 cache entry behind the server's back."""
        key = f"artifact:{doc_id}"
        if not self.redis_url:
            assert isinstance(self.storage, SqliteStorage)
            self.storage.edit_cached(key, change)
            return
        with redis.Redis.from_url(self.redis_url) as client:
            (found,) = client.scan_iter(match=f"*:k:{key}")  # a hash: `v` value, `r` revision
            entry = change(json.loads(client.hget(found, "v") or b"null"))
            if entry is None:
                client.delete(found)
            else:
                client.hset(found, "v", json.dumps(entry))

    def rotate(self) -> None:
        """A new primary key k2, k1 kept: what an operator does before a restart."""
        if self.keyring is None:
            assert (
                crypto.main(["rotate", str(self.data_dir / "keyring.yaml"), "--key-id", "k2"]) == 0
            )
        else:
            self.keyring = Keyring("k2", {"k1": KEY_1, "k2": KEY_2})
        self.primary = "k2"

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[AsyncStub]:
        async with (
            running_server(self.config, self.data_dir, keyring=self.keyring) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            stub: AsyncStub = ar_grpc.ArtifactRegistryServiceStub(channel)
            yield stub


@pytest.fixture(scope="module")
def postgres_and_redis() -> Iterator[tuple[ThrowawayServer, ThrowawayServer]]:
    with throwaway("postgres") as postgres, throwaway("redis") as cache:
        yield postgres, cache


@pytest.fixture(params=["sqlite", "postgres+redis"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Setup:
    data_dir = tmp_path / "server"
    if request.param == "sqlite":
        return Setup("sqlite", data_dir, None, SqliteStorage(data_dir, "registry"), None)
    postgres, cache = request.getfixturevalue("postgres_and_redis")
    namespace = f"enc{uuid.uuid4().hex[:8]}"  # the servers are shared by the module's tests
    slots = {
        "store": {"backend": "postgres", "config": {"connection": postgres.url}},
        "cache": {"backend": "redis", "config": {"connection": cache.url}},
    }
    config = {"namespaces": [{"name": namespace, "pattern": "artifact-registry",
                              "pattern_version": "v1", "slots": slots}]}  # fmt: skip
    return Setup(
        "postgres+redis",
        data_dir,
        config,
        PostgresStorage(postgres.url, namespace),
        Keyring("k1", {"k1": KEY_1}),
        redis_url=cache.url,
    )


async def create(
    stub: AsyncStub,
    name: str,
    source: str,
    visibility: pb.Visibility.ValueType,
    publish: bool = True,
) -> pb.Artifact:
    art = pb.Artifact(
        organization=ORG,
        name=name,
        type=pb.ARTIFACT_TYPE_PERSONA,
        version="1.0.0",
        source=source,
        visibility=visibility,
    )
    return (
        await stub.CreateArtifact(pb.CreateArtifactRequest(artifact=art, publish=publish))
    ).artifact


async def read(stub: AsyncStub, doc_id: str) -> pb.Artifact:
    return (await stub.GetArtifact(pb.GetArtifactRequest(id=doc_id))).artifact


async def assert_reads(stub: AsyncStub, doc_id: str, source: str) -> None:
    for _ in range(2):  # the second read comes from the caches
        got = await read(stub, doc_id)
        assert got.source == source and got.source_sha256 == sha256(source)


async def set_visibility(stub: AsyncStub, doc_id: str, visibility: pb.Visibility.ValueType) -> None:
    await stub.UpdateArtifact(
        pb.UpdateArtifactRequest(
            artifact=pb.Artifact(id=doc_id, visibility=visibility),
            update_mask=FieldMask(paths=["visibility"]),
        )
    )


async def search(stub: AsyncStub, query: str) -> list[pb.SearchHit]:
    response = await stub.SearchArtifacts(
        pb.SearchArtifactsRequest(query=query, filter=pb.ArtifactFilter(organization=ORG))
    )
    return list(response.hits)


async def test_private_sources_are_never_stored_in_clear(setup: Setup) -> None:
    secret, public_word, victim_word = marker(), marker(), marker()
    secret_source = f"persona Private {{ {secret} }}"
    public_source = f"persona Public {{ {public_word} }}"
    async with setup.serve() as stub:
        private = await create(stub, "Private One", secret_source, pb.VISIBILITY_PRIVATE)
        public = await create(stub, "Public One", public_source, pb.VISIBILITY_PUBLIC)
        victim = await create(
            stub, "Victim", f"persona V {{ {victim_word} }}", pb.VISIBILITY_PRIVATE
        )
        await assert_reads(stub, private.id, secret_source)
        await assert_reads(stub, public.id, public_source)

        stored = "\n".join(setup.storage.texts())
        assert public_word in stored
        assert secret not in stored and victim_word not in stored
        if isinstance(setup.storage, SqliteStorage):
            raw = setup.storage.file_bytes()
            assert public_word.encode() in raw and secret.encode() not in raw
        body = setup.storage.body(private.id)
        assert body["source"] == "" and body["source_sha256"] == ""
        assert envelope_key(body) == "k1"
        assert SEALED not in setup.storage.body(public.id)
        if setup.redis_url:
            cached = "\n".join(redis_texts(setup.redis_url))
            assert public_word in cached  # L2 was filled by the reads above ...
            assert f"artifact:{private.id}" in cached and '"sealed"' in cached  # ... sealed
            assert secret not in cached

        # private sources are not searchable; their names are, public sources are
        assert await search(stub, secret) == []
        assert [h.artifact.id for h in await search(stub, "private")] == [private.id]
        hits = await search(stub, public_word)
        assert [h.artifact.id for h in hits] == [public.id]
        assert any(h.field == "source" for h in hits[0].highlights)

        # visibility changes are writes: they unseal and seal again
        await set_visibility(stub, private.id, pb.VISIBILITY_PUBLIC)
        opened = setup.storage.body(private.id)
        assert opened["source"] == secret_source and SEALED not in opened
        await assert_reads(stub, private.id, secret_source)
        await set_visibility(stub, private.id, pb.VISIBILITY_PRIVATE)
        assert setup.storage.body(private.id)["source"] == ""
        await assert_reads(stub, private.id, secret_source)
        assert secret not in "\n".join(setup.storage.texts())
        if setup.redis_url:
            assert secret not in "\n".join(redis_texts(setup.redis_url))

    # a modified envelope, or one copied from another version, is DATA_LOSS for that version
    # only; tampered while the server is down, its caches gone (L1) or dropped (L2). A
    # tampered L2 entry is dropped and the store answers.
    body = setup.storage.body(victim.id)
    setup.storage.overwrite(victim.id, {**body, SEALED: flip_last_byte(body[SEALED])})
    setup.edit_cached(victim.id, lambda entry: None)
    setup.edit_cached(
        private.id, lambda e: {**e, "d": {**e["d"], SEALED: flip_last_byte(e["d"][SEALED])}}
    )
    async with setup.serve() as stub:
        for forged in (None, setup.storage.body(private.id)[SEALED]):
            if forged is not None:  # a failed read cached nothing: no restart needed
                setup.storage.overwrite(victim.id, {**body, SEALED: forged})
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await read(stub, victim.id)
            assert info.value.code() == grpc.StatusCode.DATA_LOSS
            reason = error_details(info.value)[0]
            assert reason is not None and reason.reason == "DECRYPTION_FAILED"
            assert victim_word not in (info.value.details() or "")
        await assert_reads(stub, private.id, secret_source)
        await assert_reads(stub, public.id, public_source)


def flip_last_byte(sealed: str) -> str:
    envelope = bytearray(base64.b64decode(sealed))
    envelope[-1] ^= 0x01
    return base64.b64encode(bytes(envelope)).decode()


async def test_rotation_reseals_in_the_background(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    sources = {f"Draft {i}": f"persona D{i} {{ {marker()} }}" for i in range(24)}
    sources["Legacy"] = f"persona L {{ {marker()} }}"
    with caplog.at_level(logging.WARNING, logger="prism.server"):
        async with setup.serve() as stub:
            ids = {
                name: (await create(stub, name, src, pb.VISIBILITY_PRIVATE, publish=False)).id
                for name, src in sources.items()
            }
    # a private version as stored before encryption existed: source in clear, no envelope
    legacy = setup.storage.body(ids["Legacy"])
    setup.storage.overwrite(
        ids["Legacy"],
        {k: v for k, v in legacy.items() if k != SEALED}
        | {"source": sources["Legacy"], "source_sha256": sha256(sources["Legacy"])},
    )

    def keys() -> set[str]:
        return {envelope_key(setup.storage.body(i)) for i in ids.values()}

    assert keys() == {"k1", ""}
    if setup.keyring is None:  # the server made its own keyring, owner-only, and said so
        mode = stat.S_IMODE((setup.data_dir / "keyring.yaml").stat().st_mode)
        assert mode == 0o600
        warnings = [
            r.getMessage() for r in caplog.records if "no keyring configured" in r.getMessage()
        ]
        assert len(warnings) == 1 and "lives beside the data" in warnings[0]
    async with setup.serve() as stub:  # restarted with the same keyring: still readable ...
        await assert_reads(stub, ids["Draft 0"], sources["Draft 0"])
        await assert_reads(stub, ids["Legacy"], sources["Legacy"])
        # ... and the version from before encryption gets sealed in the background
        await eventually(lambda: keys() == {"k1"}, timeout=15, message="legacy version sealed")
        assert sources["Legacy"] not in "\n".join(setup.storage.texts())

    setup.rotate()
    async with setup.serve() as stub:
        # client writes racing the background pass: each must survive it
        edited = list(ids.values())[:8]
        await asyncio.gather(*(
            stub.UpdateArtifact(pb.UpdateArtifactRequest(
                artifact=pb.Artifact(id=i, metadata=pb.ArtifactMetadata(description=f"edit {i}")),
                update_mask=FieldMask(paths=["metadata.description"]),
            ))
            for i in edited
        ))  # fmt: skip
        await eventually(lambda: keys() == {"k2"}, timeout=15, message="envelopes moved to k2")
        for name, doc_id in ids.items():
            got = await read(stub, doc_id)
            assert got.source == sources[name] and got.source_sha256 == sha256(sources[name])
            if doc_id in edited:
                assert got.metadata.description == f"edit {doc_id}"


@pytest.mark.parametrize("search_by", ["store", "pattern"])
async def test_search_paths_agree_on_private_sources(search_by: str, tmp_path: Path) -> None:
    """The store's document_search (SQLite) and the pattern's own scoring (a store without
    document_search) both leave private sources out and keep everything else searchable."""
    store: dict[str, Any] = {"backend": "sqlite", "config": {"connection": "sqlite:///s.db"}}
    if search_by == "pattern":
        store = {"backend": "memstore", "config": {},
                 "interfaces": ["document_basic", "document_query"]}  # fmt: skip
    config = {"namespaces": [{"name": "registry", "pattern": "artifact-registry",
                              "pattern_version": "v1", "slots": {"store": store}}]}  # fmt: skip
    secret, shared = marker(), marker()
    ring = Keyring("k1", {"k1": KEY_1})
    async with (
        running_server(config, tmp_path, keyring=ring) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub: AsyncStub = ar_grpc.ArtifactRegistryServiceStub(channel)
        private = await create(stub, "Hidden Helper", f"{shared} {secret}", pb.VISIBILITY_PRIVATE)
        public = await create(stub, "Open Helper", f"{shared} words", pb.VISIBILITY_PUBLIC)
        assert await search(stub, secret) == []
        hits = await search(stub, shared)
        assert [h.artifact.id for h in hits] == [public.id]
        assert [h.field for h in hits[0].highlights] == ["source"]
        both = await search(stub, "helper")
        assert {h.artifact.id for h in both} == {private.id, public.id}
        hidden = next(h for h in both if h.artifact.id == private.id)
        assert hidden.artifact.source == f"{shared} {secret}"  # hits still carry the plaintext
        assert all(h.field != "source" for h in hidden.highlights)
