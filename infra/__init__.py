"""Local real stack for development and tests: Kafka, Cassandra, Redis, Prism, Flink.

Everything is installed from package registries (Maven Central, Debian, the Go
module proxy) into one cache directory and run from one state directory; see
``infra.settings`` for the knobs and ``infra.stack`` for the lifecycle.
"""
