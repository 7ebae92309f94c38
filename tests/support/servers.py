"""Throwaway database servers for tests: each in its own temp dir, on a free port, owned by the
test process so fault tests can kill and restart it.

A missing server binary fails with an install hint; `PRISM_ALLOW_MISSING_BACKENDS=1` turns that
into a skip. `PRISM_TEST_MONGO_URL` replaces the SecantusDB server with a real mongod.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

INSTALL_HINT = {
    "postgres": "apt-get install -y postgresql",
    "redis": "apt-get install -y redis-server",
    "nats": "apt-get install -y nats-server",
    "mongodb": "pip install secantusdb (a dev dependency: `make install`)",
}


def free_port() -> int:
    """A port nobody listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing(backend: str, what: str) -> None:
    message = f"{what} not found: install it ({INSTALL_HINT[backend]})"
    if os.environ.get("PRISM_ALLOW_MISSING_BACKENDS") == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class ThrowawayServer(ABC):
    """A server process we own. `stop()`/`start()` keep the data dir, so a restart finds the
    data again; `kill()` is SIGKILL, for fault tests."""

    name: str
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    @abstractmethod
    def url(self) -> str:
        """What a client (and a slot's `connection:`) uses to reach the server."""

    @abstractmethod
    def command(self) -> list[str]:
        """The server's command line."""

    def prepare(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """One-time setup before the first start (e.g. initdb)."""

    def start(self) -> None:
        log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115 - owned by the process
        # own process group: kill() must reach the real server behind a wrapper (runuser)
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=log, cwd=self.workdir, start_new_session=True
        )
        log.close()
        wait_for_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL to the whole process group: the server and its workers die at once."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class RedisServer(ThrowawayServer):
    """Debian redis-server with an fsync-always AOF, so an acknowledged write survives a kill."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.workdir), "--save", "", "--appendonly", "yes",
            "--appendfsync", "always", "--daemonize", "no", "--protected-mode", "no",
        ]  # fmt: skip


@dataclass
class NatsServer(ThrowawayServer):
    """nats-server with JetStream, storing under the work dir. max_payload is raised from the
    1 MiB default to 8 MiB so messages up to the contract's 4 MiB limit fit (no flag for it:
    only a config file sets it)."""

    max_payload: str = "8MB"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        config = self.workdir / "nats.conf"
        config.write_text(f"max_payload: {self.max_payload}\n")
        return [
            binary, "-c", str(config), "-a", "127.0.0.1", "-p", str(self.port),
            "-js", "-sd", str(self.workdir),
        ]  # fmt: skip


class MongoServer(ThrowawayServer):
    """SecantusDB's MongoDB-wire server (PyPI secantusdb), durable across restarts."""

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def command(self) -> list[str]:
        launcher = Path(sys.executable).with_name("secantusd-py")
        return [
            str(launcher), "--host", "127.0.0.1", "--port", str(self.port),
            "--storage-path", str(self.workdir / "data"), "--sync-on-commit",
            "--log-level", "WARNING",
        ]  # fmt: skip


class PostgresServer(ThrowawayServer):
    """A private cluster made with initdb and run as the `postgres` OS user when we are root
    (PostgreSQL refuses to run as root). fsync stays on: fault tests rely on durability."""

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @staticmethod
    def bindir() -> Path | None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        return Path(found[-1]).parent if found else None

    def _as_owner(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args

    def prepare(self) -> None:
        bindir = self.bindir()
        assert bindir is not None
        self.datadir = self.workdir / "pgdata"
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
        subprocess.run(
            self._as_owner([str(bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                            "-A", "trust", "-E", "UTF8", "--no-sync"]),
            check=True, capture_output=True, cwd=self.workdir,
        )  # fmt: skip

    def start(self) -> None:
        self._clear_stale_locks()
        super().start()

    def kill(self) -> None:
        """Crash the whole cluster at once. Every backend is its own process group leader, so
        the group kill alone would leave backends answering queries until they notice the
        postmaster is gone: freeze the postmaster (no new forks), SIGKILL its children, then it."""
        postmaster = self._postmaster_pid()
        if postmaster is not None and self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(postmaster, signal.SIGSTOP)
                for child in _children(postmaster):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                os.kill(postmaster, signal.SIGKILL)
        super().kill()

    def _postmaster_pid(self) -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int((self.datadir / "postmaster.pid").read_text().split()[0])
        return None

    def _clear_stale_locks(self) -> None:
        """After kill() the dead postmaster (not our child: runuser's) lingers as a zombie until
        init reaps it, and postgres takes a zombie's pid in its lock files for a live server."""
        for lock in (self.datadir / "postmaster.pid", self.workdir / f".s.PGSQL.{self.port}.lock"):
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                pid = int(lock.read_text().split()[0])
                try:
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                except FileNotFoundError:
                    state = "gone"
                if state in ("Z", "X", "gone"):
                    lock.unlink()

    def command(self) -> list[str]:
        bindir = self.bindir()
        assert bindir is not None
        return self._as_owner([
            str(bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port),
            "-k", str(self.workdir), "-c", "listen_addresses=127.0.0.1",
            "-c", "max_connections=200", "-c", "shared_buffers=64MB",
        ])  # fmt: skip


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


class ExternalMongo(ThrowawayServer):
    """A mongod someone else runs (PRISM_TEST_MONGO_URL): not ours to stop, so fault tests skip."""

    external_url: str = ""

    @property
    def url(self) -> str:
        return self.external_url

    def command(self) -> list[str]:
        pytest.skip("PRISM_TEST_MONGO_URL points at a server this test does not own")

    def start(self) -> None:
        """Already running."""

    def stop(self) -> None:
        """Not ours to stop."""

    def kill(self) -> None:
        pytest.skip("PRISM_TEST_MONGO_URL points at a server this test does not own")


def _available(backend: str) -> bool:
    if backend == "postgres":
        return PostgresServer.bindir() is not None
    if backend == "redis":
        return shutil.which("redis-server") is not None
    if backend == "nats":
        return shutil.which("nats-server") is not None or Path("/usr/sbin/nats-server").exists()
    if backend == "mongodb":
        return Path(sys.executable).with_name("secantusd-py").exists()
    raise ValueError(backend)


_KINDS: dict[str, type[ThrowawayServer]] = {
    "postgres": PostgresServer,
    "redis": RedisServer,
    "nats": NatsServer,
    "mongodb": MongoServer,
}


@contextlib.contextmanager
def throwaway(backend: str, **options: Any) -> Iterator[ThrowawayServer]:
    """Start a private server for `backend` ("postgres", "redis", "nats", "mongodb") and remove
    it and its data afterwards; `options` are fields of its server class (e.g. NatsServer's
    max_payload)."""
    if backend == "mongodb" and os.environ.get("PRISM_TEST_MONGO_URL"):
        external = ExternalMongo(name="mongodb", workdir=Path(tempfile.gettempdir()))
        external.external_url = os.environ["PRISM_TEST_MONGO_URL"]
        yield external
        return
    if not _available(backend):
        missing(backend, f"{backend} server binary")
    workdir = Path(tempfile.mkdtemp(prefix=f"prism-{backend}-"))
    server = _KINDS[backend](name=backend, workdir=workdir, **options)
    try:
        server.prepare()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
