"""Polling helper for tests; the conformance library ships the same one so that
`prismctl conformance` needs nothing from tests/."""

from prismctl.conformance.wait import eventually

__all__ = ["eventually"]
