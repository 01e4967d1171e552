"""Probe: does Prism hold the downstream watermark for an SDF residual deferred with a delay?

    .venv/bin/python bench/probe_prism_delayed_residual.py

Measured 2026-12-03 (Prism 2.77): no. While SLOW's residual waits out its 300 ms
delay, the timer fires through T0+25 min with SLOW applied only to T0+0; with
``defer_remainder()`` and no delay the timer stays within a minute of SLOW. The
Kafka source defers with a delay after an empty poll, so a partition whose fetch
is late can fall behind the watermark its neighbours set (features: ``too_late``
dead letters on uneven partitions, docs/benchmarks.md).

Two restrictions: FAST claims positions and advances its watermark to T0 + 10 h at once,
then keeps going; SLOW claims a position every bundle with a watermark of T0 + pos*1 min,
and every other bundle emits nothing and defers its residual with a 300 ms delay.
Downstream a stateful DoFn keyed on one key watches the watermark via an event-time timer
re-armed each minute of event time, and prints when it fires past SLOW's estimate.
"""
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
logging.disable(logging.WARNING)

import apache_beam as beam  # noqa: E402
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker  # noqa: E402
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from apache_beam.transforms import userstate  # noqa: E402
from apache_beam.transforms.core import RestrictionProvider, WatermarkEstimatorProvider  # noqa: E402
from apache_beam.transforms.window import GlobalWindows  # noqa: E402
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Duration, Timestamp  # noqa: E402
from apache_beam.utils.windowed_value import WindowedValue  # noqa: E402

from infra.install import prism_binary  # noqa: E402
from infra.settings import StackSettings  # noqa: E402

T0 = 1_700_000_000
H = 3600
class P(RestrictionProvider):
    def initial_restriction(self, e): return OffsetRange(0, 40)
    def create_tracker(self, r): return OffsetRestrictionTracker(r)
    def restriction_size(self, e, r): return r.size()
    def split(self, e, r): yield r
class W(WatermarkEstimatorProvider):
    def initial_estimator_state(self, e, r): return MIN_TIMESTAMP
    def create_watermark_estimator(self, s): return ManualWatermarkEstimator(s)
class S(beam.DoFn):
    def process(self, e, tracker=beam.DoFn.RestrictionParam(P()), wm=beam.DoFn.WatermarkEstimatorParam(W())):
        r = tracker.current_restriction()
        pos = r.start
        if e == "fast":
            if tracker.try_claim(pos):
                ts = T0 + 10 * H + pos * 60
                wm.set_watermark(Timestamp(ts))
                yield WindowedValue(("k", (e, pos, ts)), Timestamp(ts), [GlobalWindows.windowed_value(None).windows[0]])
                tracker.defer_remainder(Duration(seconds=0.2))
            return
        # slow
        if pos % 2 == 1:
            # nothing this time: defer with a delay, like an empty poll
            if tracker.try_claim(pos):
                tracker.defer_remainder(Duration(seconds=0.3))
            return
        if tracker.try_claim(pos):
            ts = T0 + pos * 60
            wm.set_watermark(Timestamp(ts))
            yield WindowedValue(("k", (e, pos, ts)), Timestamp(ts), [GlobalWindows.windowed_value(None).windows[0]])
            tracker.defer_remainder(Duration(seconds=0.05))
class Watch(beam.DoFn):
    TIMER = userstate.TimerSpec("t", userstate.TimeDomain.WATERMARK)
    SLOWMAX = userstate.ReadModifyWriteStateSpec("slow", beam.coders.PickleCoder())
    def process(self, kv, timer=beam.DoFn.TimerParam(TIMER), slow=beam.DoFn.StateParam(SLOWMAX)):
        k, (src, pos, ts) = kv
        if src == "slow":
            slow.write(max(slow.read() or 0, ts))
        print(f"{time.time()%100:6.2f} elem {src} pos={pos} ts=T0+{(ts-T0)/60:.0f}min", flush=True)
        timer.set(Timestamp(T0 + 60))
    @userstate.on_timer(TIMER)
    def fired(self, fire_ts=beam.DoFn.TimestampParam, timer=beam.DoFn.TimerParam(TIMER), slow=beam.DoFn.StateParam(SLOWMAX)):
        s = slow.read() or 0
        print(f"{time.time()%100:6.2f} TIMER fired at T0+{(fire_ts.micros/1e6-T0)/60:.0f}min; slow applied up to T0+{(s-T0)/60 if s else -1:.0f}min", flush=True)
        nxt = fire_ts + Duration(seconds=60)
        timer.set(nxt)


def main() -> None:
    prism = prism_binary(StackSettings.from_env())
    p = beam.Pipeline(options=PipelineOptions(["--runner=PrismRunner", f"--prism_location={prism}",
                                               "--environment_type=LOOPBACK"]))
    _ = p | beam.Create(["fast", "slow"]) | beam.ParDo(S()) | beam.ParDo(Watch())
    r = p.run()
    r.wait_until_finish(duration=25000)
    try:
        r.cancel()
    except Exception:  # finished or already gone
        pass


if __name__ == "__main__":
    main()
