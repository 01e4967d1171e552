"""Every Redis, Cassandra, file and Kafka-admin reader and writer, shared by pipelines, serving and jobs (no Beam)."""
