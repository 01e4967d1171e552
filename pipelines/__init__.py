"""Beam pipelines of feedbeam: one module per pipeline, Beam IO under ``pipelines.io``."""
