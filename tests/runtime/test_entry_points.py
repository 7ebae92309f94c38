"""Third-party plugins: a distribution registering a class in the `prism.backends` entry point
group (its YAML named by the class's `backend_yaml`) is loadable and servable without any edit
to this repository. The "installed" distribution is a real dist-info directory on sys.path."""

from __future__ import annotations

from pathlib import Path

import grpc.aio
import pytest
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc

from plugins.runtime.loader import load_plugin
from prismctl.registry import load_registry
from tests.runtime.kvfake import BACKEND_YAML, registry_with_testkv
from tests.support.harness import running_server

PLUGIN_MODULE = """
from pathlib import Path
from typing import ClassVar

from tests.runtime.kvfake import KvFakePlugin


class ThirdPartyPlugin(KvFakePlugin):
    name: ClassVar[str] = "thirdkv"
    backend_yaml: ClassVar[str] = str(Path(__file__).with_name("thirdkv.yaml"))
"""


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    dist = site / "thirdkv-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdkv\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[prism.backends]\nthirdkv = thirdkv_plugin:ThirdPartyPlugin\n"
    )
    (site / "thirdkv_plugin.py").write_text(PLUGIN_MODULE)
    declaration = BACKEND_YAML.replace("backend: testkv", "backend: thirdkv").replace(
        "plugin_class: tests.runtime.kvfake:KvFakePlugin\n", ""
    )
    (site / "thirdkv.yaml").write_text(declaration)
    monkeypatch.syspath_prepend(str(site))
    return site


async def test_entry_point_backend_loads_and_serves(installed: Path, tmp_path: Path) -> None:
    registry = load_registry(registry_with_testkv(tmp_path))
    spec = registry.backends["thirdkv"]
    assert spec.builtin is False
    assert spec.plugin_class == "thirdkv_plugin:ThirdPartyPlugin"
    plugin = load_plugin("thirdkv", {}, tmp_path, registry)
    assert type(plugin).__name__ == "ThirdPartyPlugin"

    config = {
        "namespaces": [
            {"name": "t", "pattern": "keyvalue", "slots": {"store": {"backend": "thirdkv"}}}
        ]
    }
    async with (
        running_server(config, tmp_path / "data", registry=registry) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = kv_grpc.KeyValueBasicServiceStub(channel)
        await stub.Set(kv.SetRequest(key="k", value=b"third"))
        assert (await stub.Get(kv.GetRequest(key="k"))).value == b"third"
