"""Make `tests.*` importable (shared fixtures and test-only plugins live there) however pytest
is invoked."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
