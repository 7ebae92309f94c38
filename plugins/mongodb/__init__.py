"""The MongoDB backend (pymongo's asyncio client): Document and KeyValue on any MongoDB-wire
server."""

from plugins.mongodb.plugin import MongodbPlugin

__all__ = ["MongodbPlugin"]
