"""The ranking pipeline's debounce step on Prism, driven by a TestStream.

Watermark and element times are controlled, so the refresh times are exact:
the same as ``simulate_debounce`` computes with a perfect clock. Needs only
the Prism binary (no servers). The processing-time clock reads the wall
clock, which a TestStream does not drive: it runs end to end in
``test_ranking_pipeline``.
"""
from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from infra.install import prism_binary
from pipelines.ranking import debounce_fn
from domain.ranking import Debounce, simulate_debounce
from schemas.ranking import ENGAGED, POST_CREATED, POST_DELETED, Trigger

pytestmark = pytest.mark.integration

T0 = 1_780_000_000  # seconds


def at(seconds: float, trigger: Trigger):
    return TimestampedValue((trigger.user_id, trigger), T0 + seconds)


def test_refreshes_are_debounced_per_user(stack):
    ms = lambda s: (T0 + s) * 1000  # noqa: E731
    user1 = [(0.0, Trigger(1, ms(0), ENGAGED)),
             (0.1, Trigger(1, ms(0.1), POST_CREATED, 100, 9, ms(0.1), "PHOTO")),
             (0.3, Trigger(1, ms(0.3), POST_CREATED, 101, 9, ms(0.3), "REEL")),
             (1.0, Trigger(1, ms(1), POST_DELETED, 100, 9, ms(0.1), "PHOTO")),
             (4.0, Trigger(1, ms(4), ENGAGED)),
             (20.0, Trigger(1, ms(20), ENGAGED))]
    user2 = [(0.2, Trigger(2, ms(0.2), ENGAGED))]
    stream = (TestStream()
              .advance_watermark_to(T0)
              .add_elements([at(s, t) for s, t in user1[:3] + user2])
              .advance_watermark_to(T0 + 0.9)
              .add_elements([at(s, t) for s, t in user1[3:5]])
              .advance_watermark_to(T0 + 19)
              .add_elements([at(s, t) for s, t in user1[5:]])
              .advance_watermark_to_infinity())
    options = PipelineOptions(["--runner=PrismRunner", f"--prism_location={prism_binary(stack)}",
                               "--environment_type=LOOPBACK", "--streaming"])
    debounce = Debounce(settle_ms=500, interval_ms=5000)
    with beam.Pipeline(options=options) as p:
        requests = (p
                    | "Triggers" >> stream
                    # Prism keys a stateful stage by the encoded key: give it a typed one.
                    | "Typed" >> beam.Map(lambda kv: kv).with_output_types(
                        beam.typehints.Tuple[int, Trigger])
                    | "Debounce" >> beam.ParDo(debounce_fn(debounce, "event")))
        fired = requests | "When" >> beam.Map(
            lambda r, ts=beam.DoFn.TimestampParam: (
                r.user_id, ts.micros // 1000, r.changed_at_ms, r.triggers,
                tuple(c.post_id for c in r.new_posts), tuple(sorted(r.deleted))))
        assert_that(fired, equal_to([
            (1, ms(0.5), ms(0), 3, (100, 101), ()),         # the first burst, settled
            (1, ms(5.5), ms(1), 2, (), (100,)),              # after the cooldown
            (1, ms(20.5), ms(20), 1, (), ()),                # idle again: settle only
            (2, ms(0.7), ms(0.2), 1, (), ()),                # another user: independent
        ]))
    # The same refresh times as the pure model of the rule.
    assert [t for t, _ in simulate_debounce(debounce, [int(ms(s)) for s, _ in user1])] == [
        ms(0.5), ms(5.5), ms(20.5)]


def test_unknown_clock_is_refused():
    with pytest.raises(ValueError):
        debounce_fn(Debounce(), "wall")
