"""Event schemas, the Confluent wire codec, the CQL schema and the Redis key layout."""
