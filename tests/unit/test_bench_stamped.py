"""The text layout the probes measure against (bench/stamped_layout.py): its bulk parse."""
import numpy as np
import pytest

from bench.stamped_layout import parse_stamped


def test_stored_values_parse_with_their_stamps():
    raw = [b"3.0@1700000000123456", b"-0.25@1700000000000999", b"1e-05@5", b"nan@1000",
           b"12@1700000000000000", b"0@-9000000000000000000"]
    values, valid_at = parse_stamped(raw)
    assert np.array_equal(values, [3.0, -0.25, 1e-05, np.nan, 12.0, 0.0], equal_nan=True)
    assert valid_at.tolist() == [1700000000123, 1700000000000, 0, 1, 1700000000000,
                                 -9000000000000000]
    assert parse_stamped([])[0].shape == (0,)


def test_a_stored_value_without_its_stamp_fails_the_parse():
    with pytest.raises(ValueError, match="<value>@<stamp>"):
        parse_stamped([b"3.0@1700000000123456", b"3.0"])
