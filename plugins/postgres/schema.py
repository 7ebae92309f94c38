"""The schema as an append-only list of versioned migrations, recorded in schema_migrations.

`migrate` runs in one transaction under a transaction-scoped advisory lock, so two servers
starting at once against the same database apply each migration exactly once (the second waits,
then finds nothing left to do). PostgreSQL DDL is transactional: a failing migration leaves
nothing half-applied. Never edit a migration that has shipped: append a new one.
"""

from __future__ import annotations

from typing import LiteralString

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

#: arbitrary constant naming "the Prism schema" for pg_advisory_xact_lock
MIGRATION_LOCK_ID = 0x50_52_49_53_4D  # "PRISM"

MIGRATIONS: list[tuple[LiteralString, ...]] = [
    # 1: key-value entries and the global revision sequence. Keys are bytea so that ordering
    # and prefix ranges are plain UTF-8 byte order (the scan contract) whatever the database's
    # collation, and NUL characters round-trip.
    (
        "CREATE SEQUENCE prism_revision AS bigint",
        """CREATE TABLE prism_kv (
            ns text COLLATE "C" NOT NULL,
            key bytea NOT NULL,
            value bytea NOT NULL,
            revision bigint NOT NULL,
            expires_at timestamptz,
            PRIMARY KEY (ns, key)
        )""",
        "CREATE INDEX prism_kv_expiry ON prism_kv (expires_at) WHERE expires_at IS NOT NULL",
    ),
    # 2: documents (JSONB) with the contract's search words of every string in the body (a GIN
    # prefilter for DocumentSearch), and the metadata of per-collection indexes
    (
        """CREATE TABLE prism_docs (
            ns text COLLATE "C" NOT NULL,
            collection text COLLATE "C" NOT NULL,
            id text COLLATE "C" NOT NULL,
            body jsonb NOT NULL,
            words text[] COLLATE "C" NOT NULL,
            revision bigint NOT NULL,
            create_time timestamptz NOT NULL,
            update_time timestamptz NOT NULL,
            PRIMARY KEY (ns, collection, id)
        )""",
        "CREATE INDEX prism_docs_words ON prism_docs USING gin (words)",
        "CREATE INDEX prism_docs_body ON prism_docs USING gin (body jsonb_path_ops)",
        """CREATE TABLE prism_doc_indexes (
            ns text COLLATE "C" NOT NULL,
            collection text COLLATE "C" NOT NULL,
            name text COLLATE "C" NOT NULL,
            definition bytea NOT NULL,
            sql_name text NOT NULL UNIQUE,
            PRIMARY KEY (ns, collection, name)
        )""",
    ),
    # 3: queue messages (one row each; `visible_at` is both a delayed message's due time and
    # the end of a lease) and dead-letter configurations
    (
        "CREATE SEQUENCE prism_queue_position AS bigint",
        """CREATE TABLE prism_queue_messages (
            ns text COLLATE "C" NOT NULL,
            message_id text COLLATE "C" NOT NULL,
            queue text COLLATE "C" NOT NULL,
            payload bytea NOT NULL,
            attributes jsonb NOT NULL,
            priority integer NOT NULL,
            enqueue_time timestamptz NOT NULL,
            visible_at timestamptz NOT NULL,
            position bigint NOT NULL,
            delivery_count integer NOT NULL DEFAULT 0,
            receipt text COLLATE "C",
            source_queue text COLLATE "C",
            PRIMARY KEY (ns, message_id)
        )""",
        "CREATE INDEX prism_queue_order ON prism_queue_messages "
        "(ns, queue, priority DESC, position)",
        "CREATE INDEX prism_queue_visible ON prism_queue_messages (ns, queue, visible_at)",
        "CREATE UNIQUE INDEX prism_queue_receipt ON prism_queue_messages (receipt) "
        "WHERE receipt IS NOT NULL",
        """CREATE TABLE prism_queue_dead_letter (
            ns text COLLATE "C" NOT NULL,
            queue text COLLATE "C" NOT NULL,
            dead_letter_queue text COLLATE "C" NOT NULL,
            max_deliveries integer NOT NULL,
            PRIMARY KEY (ns, queue)
        )""",
    ),
    # 4: published messages too large for a NOTIFY payload, read by listeners and swept soon
    (
        """CREATE TABLE prism_pubsub_spill (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            body bytea NOT NULL,
            created timestamptz NOT NULL DEFAULT statement_timestamp()
        )""",
    ),
    # 5: dead-letter configurations belong to a messages table (a slot's `table` config), so
    # slots keeping queues in different tables never share them
    (
        'ALTER TABLE prism_queue_dead_letter ADD COLUMN messages_table text COLLATE "C" '
        "NOT NULL DEFAULT 'prism_queue_messages'",
        "ALTER TABLE prism_queue_dead_letter DROP CONSTRAINT prism_queue_dead_letter_pkey, "
        "ADD PRIMARY KEY (messages_table, ns, queue)",
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(Exception):
    """The database was migrated by a newer plugin; refusing beats silently misreading it."""


async def migrate(conn: AsyncConnection[TupleRow]) -> int:
    """Bring the schema up to SCHEMA_VERSION; returns the version found before migrating."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
        row = await cur.fetchone()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"database schema version {found} is newer than this plugin's {SCHEMA_VERSION}"
            )
        for version, statements in enumerate(MIGRATIONS[found:], start=found + 1):
            for statement in statements:
                await conn.execute(statement)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
    return found
