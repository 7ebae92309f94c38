"""Fail-fast plugin loading: the YAML declaration and the code must agree in both directions and
every implementation must have every contract method. The plugin classes below are test-only
fakes (legitimately: the loader's checks are what is under test, not any backend)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import pytest

from plugins.runtime.base import BackendPlugin
from plugins.runtime.loader import (
    PluginLoadError,
    backend_spec,
    instantiate,
    load_plugin,
    plugin_class,
)
from prismctl.registry import BackendSpec, Registry, load_registry
from tests.runtime.kvfake import KvFakePlugin, KvFakeStore, registry_with_testkv


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return load_registry(registry_with_testkv(tmp_path_factory.mktemp("reg")))


@pytest.fixture(scope="module")
def spec(registry: Registry) -> BackendSpec:
    return registry.backends["testkv"]


class HalfKv:
    """Has set/get but not delete/exists."""

    async def set(self, request: object, ctx: object) -> object:
        return request

    async def get(self, request: object, ctx: object) -> object:
        return request


class FixedPlugin(BackendPlugin):
    """A plugin whose implementations() is whatever the test assigns to `impls`."""

    name = "testkv"
    impls: Mapping[str, object] = {}

    def implementations(self) -> Mapping[str, object]:
        return self.impls


def plugin_with(impls: Mapping[str, object]) -> type[BackendPlugin]:
    return type("FixedPluginVariant", (FixedPlugin,), {"impls": impls})


def test_matching_declaration_loads(registry: Registry, tmp_path: Path) -> None:
    plugin = load_plugin("testkv", {"slow_seconds": 1}, tmp_path, registry)
    assert isinstance(plugin, KvFakePlugin)
    assert set(plugin.implementations()) == {"keyvalue_basic", "keyvalue_scan", "pubsub_basic"}


def test_declared_but_not_implemented_names_file_and_interface(
    spec: BackendSpec, tmp_path: Path
) -> None:
    store = KvFakeStore(0)
    cls = plugin_with({"keyvalue_basic": store, "keyvalue_scan": store})
    with pytest.raises(PluginLoadError) as caught:
        instantiate(cls, spec, {}, tmp_path)
    message = str(caught.value)
    assert "testkv.yaml" in message
    assert "declares 'pubsub_basic' but FixedPluginVariant does not implement it" in message


def test_implemented_but_not_declared_names_file_and_interface(
    spec: BackendSpec, tmp_path: Path
) -> None:
    store = KvFakeStore(0)
    impls = {"keyvalue_basic": store, "keyvalue_scan": store, "pubsub_basic": object()}
    narrow = dataclasses.replace(spec, implements=["keyvalue_basic", "keyvalue_scan"])
    with pytest.raises(PluginLoadError) as caught:
        instantiate(plugin_with(impls), narrow, {}, tmp_path)
    message = str(caught.value)
    assert "testkv.yaml" in message
    assert "does not declare 'pubsub_basic' but FixedPluginVariant implements it" in message


def test_missing_contract_method_is_named(spec: BackendSpec, tmp_path: Path) -> None:
    only_basic = dataclasses.replace(spec, implements=["keyvalue_basic"])
    with pytest.raises(PluginLoadError) as caught:
        instantiate(plugin_with({"keyvalue_basic": HalfKv()}), only_basic, {}, tmp_path)
    assert "'keyvalue_basic' implementation lacks delete, exists" in str(caught.value)


def test_planned_backend_is_refused_by_name(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(PluginLoadError, match="backend 'testplanned' is planned"):
        load_plugin("testplanned", {}, tmp_path, registry)


def test_unimportable_plugin_class_is_named(spec: BackendSpec) -> None:
    broken = dataclasses.replace(spec, plugin_class="tests.runtime.no_such_module:Plugin")
    with pytest.raises(
        PluginLoadError, match=re.escape("cannot import plugin_class tests.runtime.no_such")
    ):
        plugin_class(broken)
    not_a_plugin = dataclasses.replace(spec, plugin_class="tests.runtime.kvfake:KvFakeStore")
    with pytest.raises(PluginLoadError, match="is not a BackendPlugin subclass"):
        plugin_class(not_a_plugin)


def test_unknown_backend_lists_known_ones(registry: Registry) -> None:
    with pytest.raises(PluginLoadError, match=r"unknown backend 'nope' \(known backends: .*testkv"):
        backend_spec("nope", registry)


def test_config_is_checked_against_the_backend_schema(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(PluginLoadError, match="slow_seconds: 'fast' is not of type 'number'"):
        load_plugin("testkv", {"slow_seconds": "fast"}, tmp_path, registry)
