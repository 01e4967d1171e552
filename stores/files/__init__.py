"""File stores: Parquet writers, the feature log, the model registry."""
