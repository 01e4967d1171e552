"""Batch jobs and the ``feedbeam`` command line."""
