"""MongodbPlugin: Document and KeyValue on MongoDB (or a MongoDB-wire server) via pymongo's
asyncio client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pymongo.errors import OperationFailure

from plugins.mongodb.connection import Mongo, settings
from plugins.mongodb.document import MongoDocuments
from plugins.mongodb.keyvalue import MongoKeyValue
from plugins.mongodb.transactions import MongoTransactions
from plugins.runtime.base import BackendPlugin
from plugins.runtime.errors import InvalidArgument

#: how often idle transactions are looked for (their timeouts are 1 s and up)
REAP_INTERVAL = 0.25
DEFAULT_MAX_TRANSACTIONS = 100


class MongodbPlugin(BackendPlugin):
    """One client per slot binding; namespaces are kept apart inside the data (see the
    keyvalue and document modules), so one database serves them all."""

    name: ClassVar[str] = "mongodb"

    def __init__(self, config: Mapping[str, Any], *, data_dir: Path) -> None:
        super().__init__(config, data_dir=data_dir)
        self.mongo = Mongo(settings(config))
        self.keyvalue = MongoKeyValue(self.mongo)
        max_transactions = config.get("max_transactions", DEFAULT_MAX_TRANSACTIONS)
        if isinstance(max_transactions, bool) or not isinstance(max_transactions, int):
            raise InvalidArgument("max_transactions", "must be an integer")
        if max_transactions < 1:
            raise InvalidArgument("max_transactions", "must be positive")
        self.transactions = MongoTransactions(self.keyvalue, max_transactions=max_transactions)
        self.documents = MongoDocuments(self.mongo)
        self.facts: dict[str, str] = {}
        self._started = False
        self._reaper: asyncio.Task[None] | None = None

    def implementations(self) -> Mapping[str, object]:
        return {
            "keyvalue_basic": self.keyvalue,
            "keyvalue_batch": self.keyvalue,
            "keyvalue_cas": self.keyvalue,
            "keyvalue_scan": self.keyvalue,
            "keyvalue_ttl": self.keyvalue,
            "keyvalue_transactional": self.transactions,
            "document_basic": self.documents,
            "document_query": self.documents,
            "document_indexing": self.documents,
            "document_search": self.documents,
        }

    async def start(self) -> None:
        """Probe the deployment and create the fixed indexes; Unavailable (fast) when the
        server cannot be reached."""
        if self._started:
            return
        async with self.mongo.call(None):
            info = await self.mongo.client.admin.command("buildInfo")
            hello = await self.mongo.client.admin.command("hello")
            await self.keyvalue.prepare()
            await self.documents.prepare()
            text_index = await self._probe_text_index()
            transactions = await self._probe_transactions()
        self.keyvalue.transactions = transactions
        self.mongo.server_version = str(info.get("version", ""))
        self.facts = {
            "server_version": self.mongo.server_version,
            "topology": f"replica set {hello['setName']}" if "setName" in hello else "standalone",
            "database": self.mongo.settings.database,
            "pool": f"{self.mongo.settings.pool_min_size}..{self.mongo.settings.pool_max_size}",
            "transactions": "supported" if transactions else "not supported by this deployment",
            "batch_atomicity": (
                "BatchSet/BatchDelete run in one multi-document transaction"
                if transactions
                else "NOT atomic: the deployment has no transactions (ordered bulk writes)"
            ),
            "transaction_isolation": (
                "snapshot: a transaction reads one snapshot (taken at its first operation) plus "
                "its own writes; a write to a key changed since then makes Commit fail with "
                "TRANSACTION_CONFLICT; a plain write to a key an open transaction wrote waits "
                "for it to end (MongoDB's rule)"
                if transactions
                else "keyvalue_transactional unusable: BeginTransaction is FAILED_PRECONDITION"
            ),
            "text_search": (
                "scored in the plugin (plugins/runtime/textsearch) over the documents the "
                "server-side filter selects; server text index "
                + (
                    "available but unused (its tokenizer differs from the contract's words)"
                    if text_index
                    else "not supported by this server"
                )
            ),
            "query": (
                "filters, sorts and keyset pages run on the server (exact translation of the "
                "filter language and sort order, with array-path guards; sorts on fields are an "
                "aggregation computing each field's sort rank); Aggregate runs in the plugin "
                "over the matching documents"
            ),
            "expiry": "TTL index on the expiry field plus read-time filtering (plugin clock)",
        }
        self._reaper = asyncio.create_task(self._reap_forever(), name="mongodb-reaper")
        self._started = True

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            await self.transactions.reap()

    async def _probe_transactions(self) -> bool:
        probe = self.mongo.db[self.mongo.name("probe")]
        try:
            async with self.mongo.client.start_session() as session:
                await session.start_transaction()
                await probe.insert_one({"transaction_probe": True}, session=session)
                await session.abort_transaction()
        except OperationFailure:
            return False
        return True

    async def _probe_text_index(self) -> bool:
        probe = self.mongo.db[self.mongo.name("probe")]
        # the collection must exist before the transaction probe (older servers cannot create
        # collections inside a transaction)
        await probe.update_one({"_id": "probe"}, {"$set": {"probe": True}}, upsert=True)
        try:
            await probe.create_index([("t", "text")], name="prism_text_probe")
        except OperationFailure:
            return False
        await probe.drop_index("prism_text_probe")
        return True

    async def close(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
        await self.transactions.close()
        await self.mongo.close()

    async def check_health(self) -> bool:
        return await self.mongo.ping()

    def details(self) -> dict[str, str]:
        return dict(self.facts)
