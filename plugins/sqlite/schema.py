"""The schema as an append-only list of migrations, tracked by PRAGMA user_version.

Opening a database applies, in one transaction, every migration whose number is above the file's
user_version, so opening is idempotent and an older file is brought up to date. Never edit a
migration that has shipped: append a new one.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: list[tuple[str, ...]] = [
    # 1: key-value entries and the global revision counter
    (
        """CREATE TABLE kv (
            ns TEXT NOT NULL,
            key TEXT NOT NULL,
            value BLOB NOT NULL,
            revision INTEGER NOT NULL,
            expires_at REAL,
            PRIMARY KEY (ns, key)
        ) WITHOUT ROWID""",
        "CREATE INDEX kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
        "INSERT INTO counters (name, value) VALUES ('revision', 0)",
    ),
    # 2: documents (JSON text bodies) and the definitions of their secondary indexes
    (
        """CREATE TABLE docs (
            ns TEXT NOT NULL,
            collection TEXT NOT NULL,
            id TEXT NOT NULL,
            body TEXT NOT NULL,
            revision INTEGER NOT NULL,
            create_time INTEGER NOT NULL,
            update_time INTEGER NOT NULL,
            PRIMARY KEY (ns, collection, id)
        )""",
        """CREATE TABLE doc_indexes (
            ns TEXT NOT NULL,
            collection TEXT NOT NULL,
            name TEXT NOT NULL,
            definition BLOB NOT NULL,
            sql_name TEXT NOT NULL UNIQUE,
            PRIMARY KEY (ns, collection, name)
        ) WITHOUT ROWID""",
    ),
    # 3: queue messages (due time and lease end share visible_at) and dead-letter settings
    (
        """CREATE TABLE queue_messages (
            ns TEXT NOT NULL,
            queue TEXT NOT NULL,
            message_id TEXT NOT NULL,
            payload BLOB NOT NULL,
            attributes TEXT NOT NULL,
            priority INTEGER NOT NULL,
            enqueue_time INTEGER NOT NULL,
            visible_at REAL NOT NULL,
            position INTEGER NOT NULL,
            delivery_count INTEGER NOT NULL DEFAULT 0,
            receipt TEXT,
            source_queue TEXT
        )""",
        "CREATE INDEX queue_order ON queue_messages (ns, queue, priority DESC, position)",
        "CREATE INDEX queue_due ON queue_messages (ns, queue, visible_at)",
        "CREATE UNIQUE INDEX queue_receipt ON queue_messages (receipt) WHERE receipt IS NOT NULL",
        """CREATE TABLE queue_dead_letter (
            ns TEXT NOT NULL,
            queue TEXT NOT NULL,
            dead_letter_queue TEXT NOT NULL,
            max_deliveries INTEGER NOT NULL,
            PRIMARY KEY (ns, queue)
        ) WITHOUT ROWID""",
        "INSERT INTO counters (name, value) VALUES ('queue_position', 0)",
    ),
    # 4: the words of each document (rowid = docs.rowid) for the full-text search prefilter;
    # no diacritic folding: the search contract says "café" and "cafe" differ
    ("CREATE VIRTUAL TABLE doc_words USING fts5(text, tokenize='unicode61 remove_diacritics 0')",),
]

SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(sqlite3.DatabaseError):
    """The file was written by a newer plugin; refusing beats silently misreading it."""


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to SCHEMA_VERSION; returns the version found before migrating."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"database schema version {found} is newer than this plugin's {SCHEMA_VERSION}"
            )
        for statements in MIGRATIONS[found:]:
            for statement in statements:
                conn.execute(statement)
        # PRAGMA takes no bound parameters; SCHEMA_VERSION is an int computed above.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found
