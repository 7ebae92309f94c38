"""The SQLite plugin: the embedded default backend (one WAL-mode database file)."""

from plugins.sqlite.plugin import SqlitePlugin

__all__ = ["SqlitePlugin"]
