"""Kafka administration outside Beam: offset ranges, consumer-group lag."""
