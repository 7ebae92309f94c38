"""The PostgreSQL plugin: psycopg 3 async over a psycopg_pool connection pool."""

from plugins.postgres.plugin import PostgresPlugin

__all__ = ["PostgresPlugin"]
