"""Cassandra stores: one module per aggregate; connections and migrations in ``session``."""
