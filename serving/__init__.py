"""Thin HTTP API over the views the pipelines materialize in Redis and Cassandra."""
