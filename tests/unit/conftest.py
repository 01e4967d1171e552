"""Unit-test fixtures.

Beam's DirectRunner (the default of ``TestPipeline``) first tries Prism, and
``PrismRunner`` keeps one job server per process, built from the options of
the first pipeline that asks. A unit test's TestPipeline has no
``--prism_location``, so that server would try to download Prism from GitHub
for every later pipeline in the process, whatever location it passes (an
integration test run after the unit tests then fails). Each unit test gets
its own throwaway singleton instead.
"""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_prism_singleton(monkeypatch):
    from apache_beam.runners.portability.prism_runner import PrismRunner
    from apache_beam.utils import shared

    monkeypatch.setattr(PrismRunner, "shared_handle", shared.Shared())
