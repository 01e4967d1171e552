"""Beam pipelines of feedbeam: one module per pipeline, IO under ``pipelines.io``."""
