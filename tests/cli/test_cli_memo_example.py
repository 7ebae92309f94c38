"""MEMO-006's iot-devices example validates with exit 0 and the memo's ✓ layout; breaking it in
each way the rules name exits 1 with a located finding."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cli.cli_support import FIXTURES, Run

MEMO = FIXTURES / "memo006-iot-devices.yaml"

LAYOUT = """\
Validating namespace: iot-devices
  Pattern: multicast-registry v1
  Slot: registry
    Backend: redis
    Required interfaces:
      ✓ keyvalue_basic (redis implements)
      ✓ keyvalue_scan (redis implements)
    Optional interfaces:
      ✓ keyvalue_ttl (redis implements)
  Slot: messaging
    Backend: nats
    Required interfaces:
      ✓ pubsub_basic (nats implements)
  Slot: durability
    Backend: postgres
    Required interfaces:
      ✓ queue_basic (postgres implements)
      ✓ queue_visibility (postgres implements)
      ✓ queue_dead_letter (postgres implements)
"""


def test_memo_example_is_valid(prismctl: Run) -> None:
    proc = prismctl("validate", MEMO)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.startswith(LAYOUT)
    assert proc.stdout.rstrip().endswith("✅ Configuration valid")
    assert "[" not in proc.stdout.replace("[BACKEND_PLANNED]", "")  # no error findings


def test_memo_registry_and_messaging_slots_are_valid(prismctl: Run, tmp_path: Path) -> None:
    """The memo's two required slots alone, which hold whatever postgres implements."""
    text = MEMO.read_text(encoding="utf-8")
    config = tmp_path / "iot.yaml"
    config.write_text(text[: text.index("      # Optional durability slot")], encoding="utf-8")
    proc = prismctl("validate", config)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.startswith(LAYOUT[: LAYOUT.index("  Slot: durability")])
    assert proc.stdout.rstrip().endswith("✅ Configuration valid")


BREAKS = [
    # (description, old text, new text, rule, line:col)
    ("unknown backend", "backend: redis", "backend: etcd", "UNKNOWN_BACKEND", "9:18"),
    (
        "backend lacks required",
        "backend: nats",
        "backend: sqlite",
        "MISSING_REQUIRED_INTERFACE",
        "19:18",
    ),
    (
        "unknown pattern",
        "pattern: multicast-registry",
        "pattern: multicast",
        "UNKNOWN_PATTERN",
        "4:14",
    ),
    (
        "unknown version",
        "pattern_version: v1",
        "pattern_version: v9",
        "UNKNOWN_PATTERN_VERSION",
        "5:22",
    ),
    ("unknown slot", "      messaging:", "      messages:", "UNKNOWN_SLOT", "18:7"),
    (
        "missing required slot",
        "      messaging:",
        "      durability2:",
        "MISSING_REQUIRED_SLOT",
        "7:5",
    ),
    (
        "interface not in slot",
        "          - pubsub_basic",
        "          - pubsub_basic\n          - queue_basic",
        "INTERFACE_NOT_IN_SLOT",
        "22:13",
    ),
    (
        "interface backend lacks",
        "backend: nats # NATS implements: pubsub_basic, pubsub_wildcards ✓\n"
        "        interfaces:\n          - pubsub_basic",
        "backend: memstore\n        interfaces:\n          - pubsub_basic\n"
        "          - pubsub_persistent",
        "INTERFACE_NOT_IMPLEMENTED",
        "22:13",
    ),
    ("unknown interface", "- keyvalue_ttl #", "- keyvalue_expiry #", "UNKNOWN_INTERFACE", "13:13"),
    (
        "bad connection",
        '"redis://localhost:6379/0"',
        '"localhost:6379"',
        "CONNECTION_FORMAT",
        "15:23",
    ),
    ("unknown config key", 'key_prefix: "iot:"', 'keyprefix: "iot:"', "BACKEND_CONFIG", "16:11"),
    (
        "duplicate namespace",
        "    slots:\n      registry:",
        "    slots:\n      registry:",
        "DUPLICATE_NAMESPACE",
        None,
    ),
]


@pytest.mark.parametrize("case", BREAKS, ids=[b[0] for b in BREAKS])
def test_breaking_the_memo_example(
    case: tuple[str, str, str, str, str | None], prismctl: Run, tmp_path: Path
) -> None:
    _, old, new, rule, where = case
    text = MEMO.read_text(encoding="utf-8")
    assert old in text
    if rule == "DUPLICATE_NAMESPACE":
        body = text[text.index("  - name: iot-devices") :]
        text = text + body
        where = f"{text.count(chr(10), 0, text.rindex('  - name: iot-devices')) + 1}:11"
    else:
        text = text.replace(old, new, 1)
    config = tmp_path / "iot.yaml"
    config.write_text(text, encoding="utf-8")
    proc = prismctl("validate", config.name, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout
    located = re.compile(rf"^iot\.yaml:{where}: .* \[{rule}\]$", re.M)
    assert located.search(proc.stdout), proc.stdout
    assert "❌ Configuration invalid" in proc.stdout
