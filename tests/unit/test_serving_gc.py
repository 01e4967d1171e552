"""A serving worker's full garbage collections on its own schedule (serving.app.FullCollections)."""
import asyncio
import gc

from serving.app import FullCollections


class _Cycle:
    def __init__(self):
        self.me = self


def test_full_collections_are_the_workers_own_and_python_gets_its_schedule_back():
    before = gc.get_threshold()

    async def run() -> tuple:
        collections = FullCollections(0.05)
        collections.start()
        try:
            started = (gc.get_threshold(), gc.get_freeze_count())
            _Cycle()  # garbage only a collection finds
            for _ in range(200):
                if collections.collections >= 2:
                    break
                await asyncio.sleep(0.02)
            return started, collections.collections, collections.last_ms
        finally:
            collections.stop()

    (thresholds, frozen), done, last_ms = asyncio.run(run())
    assert thresholds == (before[0], before[1], FullCollections.NEVER)
    assert frozen > 0          # what the process held at start is never scanned again
    assert done >= 2 and last_ms is not None and last_ms >= 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_collection_finds_the_cycles_left_behind():
    collections = FullCollections(600)
    gc.disable()
    try:
        _Cycle()
        assert collections.collect() >= 1
        assert collections.collections == 1
    finally:
        gc.enable()


def test_zero_leaves_pythons_schedule_alone():
    before = gc.get_threshold()

    async def run():
        collections = FullCollections(0)
        collections.start()
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0
        collections.stop()

    asyncio.run(run())
    assert gc.get_threshold() == before


def test_a_negative_pace_is_refused():
    import pytest

    from serving.config import ServingConfig

    with pytest.raises(ValueError, match="full_gc_every_s"):
        ServingConfig(jwt_key="k", full_gc_every_s=-1)
    assert ServingConfig(jwt_key="k", full_gc_every_s=0).full_gc_every_s == 0
