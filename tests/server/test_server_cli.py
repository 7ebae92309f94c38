"""`prism-server` as a real subprocess of the installed console script: the embedded default
(SQLite in the data dir), config findings refused with locations, and SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import grpc.aio
import pytest
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc

from tests.runtime.kvfake import registry_with_testkv, subprocess_env
from tests.support.harness import BIN

LISTENING = "prism-server listening on "


@asynccontextmanager
async def server_process(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str]]]:
    """Start prism-server (authentication off), read stdout up to its listening line; yield
    (process, lines)."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "prism-server"),
        "--no-auth",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env or os.environ),
        cwd=cwd,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while not (lines and lines[-1].startswith(LISTENING)):
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            if not line:
                stderr = await proc.stderr.read() if proc.stderr else b""
                pytest.fail(f"prism-server exited early: {stderr.decode()}")
            lines.append(line.decode().rstrip("\n"))
        yield proc, lines
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_embedded_default_serves_sqlite_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "store"
    async with server_process("--listen", "127.0.0.1:0", "--data-dir", str(data)) as (
        proc,
        lines,
    ):
        assert f"prism-server: data in {data.resolve()}" in lines
        assert any("embedded default" in line for line in lines)
        address = lines[-1].removeprefix(LISTENING)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = kv_grpc.KeyValueBasicServiceStub(channel)
            await stub.Set(kv.SetRequest(key="hello", value=b"world"))
            assert (await stub.Get(kv.GetRequest(key="hello"))).value == b"world"
        assert (data / "prism.db").is_file()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert proc.stderr is not None
        assert b"Traceback" not in await proc.stderr.read()


async def test_env_vars_and_sigint(tmp_path: Path) -> None:
    reg = registry_with_testkv(tmp_path)
    config = tmp_path / "prism.yaml"
    config.write_text(
        "namespaces:\n"
        "  - name: envns\n"
        "    pattern: keyvalue\n"
        "    pattern_version: v1\n"
        "    slots:\n"
        "      store: {backend: testkv}\n",
        encoding="utf-8",
    )
    env = {
        **subprocess_env(reg),
        "PRISM_CONFIG": str(config),
        "PRISM_LISTEN": "127.0.0.1:0",
        "PRISM_DATA_DIR": str(tmp_path / "d"),
    }
    async with server_process(env=env) as (proc, lines):
        assert f"prism-server: config {config}" in lines
        address = lines[-1].removeprefix(LISTENING)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = kv_grpc.KeyValueBasicServiceStub(channel)
            await stub.Set(kv.SetRequest(key="k", value=b"v"))
            call = stub.Get(kv.GetRequest(key="k"))
            assert (await call).value == b"v"
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        # one JSON access-log line per call
        assert '"method":"/prism.interfaces.keyvalue.v1.KeyValueBasicService/Get"' in log
        assert '"code":"OK"' in log and "Traceback" not in log


def run_server(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "prism-server"), "--listen", "127.0.0.1:0", *args],
        env=dict(env or os.environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bad_config_is_refused_with_located_findings(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "namespaces:\n"
        "  - name: n1\n"
        "    pattern: direct\n"
        "    pattern_version: v1\n"
        "    slots:\n"
        "      keyvalue: {backend: nosuchdb}\n"
        "  - name: n1\n"
        "    pattern: nosuchpattern\n"
        "    slots: {}\n",
        encoding="utf-8",
    )
    done = run_server("--config", str(config), "--data-dir", str(tmp_path / "d"))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) >= 3 and "Traceback" not in done.stderr
    assert all(line.startswith(f"{config}:") for line in lines), lines
    assert any(":6:" in line and "nosuchdb" in line for line in lines)
    assert any("nosuchpattern" in line for line in lines)
    assert any("DUPLICATE_NAMESPACE" in line for line in lines)
    assert done.stdout == ""  # never claimed to be listening


def test_missing_config_file_is_a_finding(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    done = run_server("--config", str(missing), "--data-dir", str(tmp_path / "d"))
    assert done.returncode == 1
    assert done.stderr.strip().startswith(f"{missing}:1:1: no such file")


def test_port_in_use_is_one_line_exit_3(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                str(BIN / "prism-server"),
                "--listen",
                f"127.0.0.1:{port}",
                "--data-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 3
    where = f"127.0.0.1:{port}"
    assert done.stderr.strip() == (
        f"prism-server: cannot listen on {where}: Failed to bind to address {where}"
    )


def test_invalid_registry_exits_3_with_its_findings(tmp_path: Path) -> None:
    reg = registry_with_testkv(tmp_path)
    (reg / "backends" / "broken.yaml").write_text("backend: [not, a, name]\n", encoding="utf-8")
    done = run_server("--data-dir", str(tmp_path / "d"), env=subprocess_env(reg))
    assert done.returncode == 3
    assert "broken.yaml:1:" in done.stderr and "Traceback" not in done.stderr
