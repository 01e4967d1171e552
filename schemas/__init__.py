"""Event schemas, the Confluent wire codec, Kafka records and dead letters, the CQL schema, the Redis key layout."""
