"""kill -9 of the SQLite-backed `prism-server` (the embedded default) loses no acknowledged
write: KeyValue Set and Document Insert calls that returned OK are all there after a restart on
the same data directory, including those acknowledged while other writes were still in flight."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from prism.interfaces.document.v1 import document_basic_pb2 as doc_pb
from prism.interfaces.document.v1.document_basic_pb2_grpc import DocumentBasicServiceStub
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv_pb
from prism.interfaces.keyvalue.v1.keyvalue_basic_pb2_grpc import KeyValueBasicServiceStub

from prismctl.conformance.core import open_channel
from tests.support.wait import eventually

SERVER = str(Path(sys.executable).parent / "prism-server")
STARTUP_TIMEOUT = 30.0
COLLECTION = "durable"
WRITERS = 8


@contextlib.asynccontextmanager
async def server_process(data_dir: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`prism-server --listen 127.0.0.1:0 --data-dir DIR` (embedded default config); yields the
    process and the address it prints. SIGKILLed at exit if still running."""
    proc = await asyncio.create_subprocess_exec(
        SERVER,
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        "--no-auth",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        address = ""
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while not address:
                line = (await proc.stdout.readline()).decode()
                assert line, f"prism-server exited ({await proc.wait()}) before listening"
                if line.startswith("prism-server listening on "):
                    address = line.removeprefix("prism-server listening on ").strip()
        yield proc, address
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


class Writer:
    """Writes keys and documents, remembering exactly which writes were acknowledged."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.kv = KeyValueBasicServiceStub(channel)
        self.docs = DocumentBasicServiceStub(channel)
        self.acked_keys: dict[str, bytes] = {}
        self.acked_docs: dict[str, dict[str, object]] = {}
        self.attempted_keys: dict[str, bytes] = {}
        self.attempted_docs: dict[str, dict[str, object]] = {}

    async def set(self, key: str) -> None:
        value = f"value of {key}".encode() * 8
        self.attempted_keys[key] = value
        await self.kv.Set(kv_pb.SetRequest(key=key, value=value))
        self.acked_keys[key] = value

    async def insert(self, doc_id: str) -> None:
        body: dict[str, object] = {"id_copy": doc_id, "n": len(self.attempted_docs), "ok": True}
        self.attempted_docs[doc_id] = body
        await self.docs.Insert(
            doc_pb.InsertRequest(collection=COLLECTION, id=doc_id, json=json.dumps(body))
        )
        self.acked_docs[doc_id] = body

    async def forever(self, worker: int) -> None:
        """Alternate Sets and Inserts until the server dies under us."""
        i = 0
        with contextlib.suppress(grpc.aio.AioRpcError):
            while True:
                await self.set(f"live-{worker}-{i}")
                await self.insert(f"live-{worker}-{i}")
                i += 1


async def test_kill9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    async with server_process(tmp_path) as (proc, address), open_channel(address) as channel:
        writer = Writer(channel)
        # Acknowledged before the kill: some sequential, most concurrent.
        for i in range(20):
            await writer.set(f"seq-{i}")
            await writer.insert(f"seq-{i}")
        await asyncio.gather(*(writer.set(f"conc-{i}") for i in range(150)))
        await asyncio.gather(*(writer.insert(f"conc-{i}") for i in range(100)))
        # Then kill -9 while eight writers are mid-flight.
        live = [asyncio.create_task(writer.forever(w)) for w in range(WRITERS)]
        target = len(writer.acked_keys) + 200
        await eventually(lambda: len(writer.acked_keys) >= target, timeout=60, interval=0.01)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await asyncio.gather(*live)
    assert len(writer.acked_keys) >= 370 and len(writer.acked_docs) >= 220

    async with server_process(tmp_path) as (_, address), open_channel(address) as channel:
        kv = KeyValueBasicServiceStub(channel)
        docs = DocumentBasicServiceStub(channel)
        keys = sorted(writer.attempted_keys)
        got = await asyncio.gather(*(kv.Get(kv_pb.GetRequest(key=k)) for k in keys))
        lost = [k for k, g in zip(keys, got, strict=True) if k in writer.acked_keys and not g.found]
        assert lost == [], f"{len(lost)} acknowledged Sets lost: {lost[:10]}"
        wrong = [
            k
            for k, g in zip(keys, got, strict=True)
            if g.found and g.value != writer.attempted_keys[k]
        ]
        assert wrong == [], f"keys with a value never written: {wrong[:10]}"

        async def read(doc_id: str) -> dict[str, object] | None:
            try:
                response = await docs.Get(doc_pb.GetRequest(collection=COLLECTION, id=doc_id))
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                return None
            body: dict[str, object] = json.loads(response.document.json)
            return body

        ids = sorted(writer.attempted_docs)
        bodies = await asyncio.gather(*(read(i) for i in ids))
        lost_docs = [
            i for i, b in zip(ids, bodies, strict=True) if i in writer.acked_docs and b is None
        ]
        assert lost_docs == [], f"{len(lost_docs)} acknowledged Inserts lost: {lost_docs[:10]}"
        torn = [
            i
            for i, b in zip(ids, bodies, strict=True)
            if b is not None and b != writer.attempted_docs[i]
        ]
        assert torn == [], f"documents with a body never written: {torn[:10]}"
