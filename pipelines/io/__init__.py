"""Beam IO shared by every pipeline: Kafka source and sink, dead letters, the batching store sink."""
