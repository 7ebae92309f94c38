"""The registry as other parts use it: prismctl.registry / prismctl.config in-process."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from plugins.runtime.interfaces import catalog
from prismctl.config import load_config, validate_config_data
from prismctl.diagnostics import render_json, render_text
from prismctl.registry import SLOT_INTERFACES, load_registry
from prismctl.registry_check import flavor_id, matrix_data, validate_registry

REPO = Path(__file__).resolve().parents[2]
REG = load_registry()


def test_default_root_is_the_repository_registry() -> None:
    assert REG.root.resolve() == (REPO / "registry").resolve()
    assert REG.diagnostics == []
    assert validate_registry(REG) == []


def test_env_var_selects_another_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "reg"
    shutil.copytree(REPO / "registry", copy)
    (copy / "patterns" / "direct.yaml").unlink()
    monkeypatch.setenv("PRISM_REGISTRY_DIR", str(copy))
    other = load_registry()
    assert other.root == copy
    assert "direct" not in other.patterns and "direct" in REG.patterns


def test_every_generated_interface_is_catalogued_with_its_rpcs() -> None:
    for iid, info in catalog().items():
        spec = REG.interfaces[iid]
        assert spec.status == "available"
        assert spec.service == info.service_name
        assert spec.proto_file == info.proto_file
        assert spec.rpcs == [m.name for m in info.service.methods]


def test_naming_rule_display_names() -> None:
    assert REG.models["keyvalue"].display_name == "KeyValue"
    assert REG.interfaces["keyvalue_ttl"].flavor == "TTL"
    assert flavor_id("DeadLetter") == "dead_letter"
    assert flavor_id("ConsumerGroups") == "consumer_groups"
    assert flavor_id("CAS") == "cas"
    planned = {i.model for i in REG.interfaces.values() if i.status == "planned"}
    assert planned == {"list", "set", "sortedset", "timeseries", "graph"}


def test_no_backend_claims_a_planned_interface() -> None:
    for backend in REG.backends.values():
        for iid in backend.implements:
            assert REG.interfaces[iid].status == "available", (backend.name, iid)


def test_backend_specs_carry_locations_and_schemas() -> None:
    sqlite = REG.backends["sqlite"]
    assert sqlite.plugin_class == "plugins.sqlite:SqlitePlugin"
    assert sqlite.builtin
    assert sqlite.source_file.endswith("registry/backends/sqlite.yaml")
    text = (REPO / "registry" / "backends" / "sqlite.yaml").read_text().splitlines()
    loc = sqlite.implements_locations["keyvalue_scan"]
    assert text[loc.line - 1][loc.col - 1 :] == "keyvalue_scan"
    assert sqlite.config_schema["additionalProperties"] is False
    Draft202012Validator.check_schema(sqlite.config_schema)


@pytest.mark.parametrize(
    ("backend", "config"),
    [
        (
            "redis",
            {"connection": "redis://localhost:6379/0", "key_prefix": "iot:", "ttl_seconds": 3600},
        ),
        ("nats", {"connection": "nats://localhost:4222", "subject_prefix": "iot.devices."}),
        (
            "sqlite",
            {
                "connection": "sqlite:///path/to/file.db",
                "busy_timeout_ms": 5000,
                "sweep_interval_seconds": 1.5,
            },
        ),
        ("sqlite", {}),
        ("memstore", {}),
    ],
)
def test_memo_and_documented_config_keys_are_accepted(
    backend: str, config: dict[str, object]
) -> None:
    Draft202012Validator(REG.backends[backend].config_schema).validate(config)


def test_postgres_accepts_the_memo_connection_string() -> None:
    pg = REG.backends["postgres"]
    assert re.fullmatch(pg.connection_pattern, "postgresql://localhost:5432/prism")
    assert re.fullmatch(pg.connection_pattern, "postgres://u:p@db.internal:5433/app")
    assert not re.fullmatch(pg.connection_pattern, "mysql://localhost/prism")


def test_patterns_shape() -> None:
    ar = REG.patterns["artifact-registry"]
    assert ar.exposes == "prism.patterns.artifact_registry.v1.ArtifactRegistryService"
    assert ar.slots["store"].required_interfaces == ["document_basic", "document_query"]
    assert not ar.slots["store"].optional
    assert all(ar.slots[s].optional for s in ("search", "cache", "events"))
    assert REG.patterns["keyvalue"].exposes == SLOT_INTERFACES
    direct = REG.patterns["direct"]
    assert direct.exposes == SLOT_INTERFACES and direct.min_filled_slots == 1
    assert list(direct.slots) == ["keyvalue", "document", "queue", "pubsub", "stream"]
    mr = REG.patterns["multicast-registry"]
    assert mr.exposes.endswith(".MulticastRegistryService")
    assert mr.slots["durability"].optional and not mr.slots["messaging"].optional


def test_capabilities_map_to_interfaces() -> None:
    assert REG.capabilities["ttl_support"].interface == "keyvalue_ttl"
    assert REG.capabilities["visibility_timeout"].interface == "queue_visibility"
    assert REG.capabilities["dead_letter"].interface == "queue_dead_letter"
    assert all(c.interface in REG.interfaces for c in REG.capabilities.values())


def test_every_schema_is_draft_2020_12() -> None:
    schemas = sorted((REPO / "registry" / "schemas").glob("*.json"))
    assert {p.name for p in schemas} >= {
        "interface.schema.json",
        "backend.schema.json",
        "pattern.schema.json",
        "capabilities.schema.json",
        "matrix.schema.json",
        "config.schema.json",
    }
    for path in schemas:
        schema = json.loads(path.read_text())
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(schema)


EMBEDDED = """\
namespaces:
  - name: default
    pattern: direct
    slots:
      keyvalue: {backend: sqlite}
      queue:
        backend: sqlite
        interfaces: [queue_basic]
        address: "127.0.0.1:7001"
"""


def test_validate_config_data_with_text_has_positions_and_slot_model() -> None:
    result = validate_config_data(yaml.safe_load(EMBEDDED), "embedded", REG, EMBEDDED)
    assert result.ok, render_text(result.diagnostics)
    (ns,) = result.namespaces
    assert (ns.name, ns.pattern, ns.pattern_version) == ("default", "direct", "v1")
    kv = ns.slots["keyvalue"]
    assert kv.interfaces == [
        i
        for i in REG.patterns["direct"].slots["keyvalue"].interfaces
        if i in REG.backends["sqlite"].implements
    ]
    assert kv.address is None and kv.config == {} and not kv.interfaces_listed
    queue = ns.slots["queue"]
    assert queue.interfaces == ["queue_basic"] and queue.interfaces_listed
    assert queue.address == "127.0.0.1:7001"
    assert (queue.location.line, queue.location.col) == (6, 7)


def test_validate_config_data_without_text() -> None:
    data = yaml.safe_load(EMBEDDED.replace("backend: sqlite}", "backend: oracle}"))
    result = validate_config_data(data, "<embedded default>", REG)
    assert not result.ok
    (finding,) = result.diagnostics
    assert finding.rule_id == "UNKNOWN_BACKEND"
    assert (finding.file, finding.line, finding.col) == ("<embedded default>", 1, 1)


def test_bad_address_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(EMBEDDED.replace('"127.0.0.1:7001"', '"localhost"'))
    result = load_config(path, REG)
    (finding,) = result.diagnostics
    assert (finding.rule_id, finding.line, finding.col) == ("SCHEMA", 9, 18)
    assert not result.ok and not result.io_error


def test_render_formats(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(EMBEDDED.replace("pattern: direct", "pattern: directt"))
    result = load_config(path, REG)
    text = render_text(result.diagnostics)
    assert text.splitlines()[0] == f"{path}:3:14: unknown pattern 'directt' [UNKNOWN_PATTERN]"
    doc = json.loads(render_json(result.diagnostics))
    assert doc["version"] == 1 and doc["valid"] is False
    assert doc["diagnostics"][0]["rule_id"] == "UNKNOWN_PATTERN"
    assert json.loads(render_json([])) == {"version": 1, "valid": True, "diagnostics": []}


ACME = textwrap.dedent("""\
    backend: acme
    description: A third-party key-value store.
    status: available
    version: 1.0.0
    connection_string_format: "acme://host"
    connection_pattern: '^acme://\\S+$'
    default_connection: "acme://localhost"
    implements: [keyvalue_basic, keyvalue_scan]
    config_schema:
      type: object
      additionalProperties: false
      properties:
        connection: {type: string}
""")


def _install_third_party(site: Path, module: str, *, broken: bool = False) -> None:
    """A pip-installed-looking package: a module plus a dist-info with a prism.backends entry.
    Each test uses its own module name, since imported modules stay cached."""
    (site / module).mkdir(parents=True)
    (site / module / "acme.yaml").write_text(ACME)
    (site / module / "__init__.py").write_text(
        "from pathlib import Path\n\n"
        + ("raise ImportError('acme needs libacme.so')\n" if broken else "")
        + "class AcmePlugin:\n    backend_yaml = Path(__file__).parent / 'acme.yaml'\n"
    )
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[prism.backends]\nacme = {module}:AcmePlugin\n")


def test_third_party_backend_from_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_third_party(tmp_path, "acme_prism")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = load_registry()
    assert reg.diagnostics == []
    acme = reg.backends["acme"]
    assert acme.plugin_class == "acme_prism:AcmePlugin" and not acme.builtin
    assert "acme" not in matrix_data(reg)["backends"]  # matrix.yaml stays the built-ins'
    data = {
        "namespaces": [
            {"name": "a", "pattern": "keyvalue", "slots": {"store": {"backend": "acme"}}}
        ]
    }
    result = validate_config_data(data, "x", reg)
    assert result.ok, render_text(result.diagnostics)
    assert result.namespaces[0].slots["store"].interfaces == ["keyvalue_basic", "keyvalue_scan"]


def test_broken_third_party_backend_is_a_diagnostic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_third_party(tmp_path, "acme_prism_broken", broken=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = load_registry()
    (finding,) = reg.diagnostics
    assert finding.rule_id == "ENTRY_POINT"
    assert "acme needs libacme.so" in finding.message
    assert "acme" not in reg.backends


def test_planned_backend_warns_unless_bound_to_a_sidecar(tmp_path: Path) -> None:
    copy = tmp_path / "reg"
    shutil.copytree(REPO / "registry", copy)
    redis_yaml = copy / "backends" / "redis.yaml"
    redis_yaml.write_text(re.sub(r"(?m)^status: \w+", "status: planned", redis_yaml.read_text()))
    reg = load_registry(copy)
    slot = {"backend": "redis", "config": {"connection": "redis://localhost:6379/0"}}
    data = {"namespaces": [{"name": "a", "pattern": "direct", "slots": {"keyvalue": slot}}]}
    warned = validate_config_data(data, "x", reg)
    assert warned.ok
    assert [(d.rule_id, d.severity) for d in warned.diagnostics] == [("BACKEND_PLANNED", "warning")]
    slot["address"] = "127.0.0.1:7001"
    assert validate_config_data(data, "x", reg).diagnostics == []
