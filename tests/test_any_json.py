"""Any valid JSON decodes (worker/jobs/any_json.py): what Python's decoder gives, and placeholders
where it gives up; text that is not JSON is refused, however deep it is nested."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.payloads import json_values
from worker.jobs import any_json
from worker.jobs.any_json import DEPTH_MAX, Unreadable, _Parser

#: Deeper than Python's decoder goes (its recursion limit, about 1,000).
DEEP = 5_000


def nested(depth: int, inner: str = "0") -> str:
    return "[" * depth + inner + "]" * depth


@settings(max_examples=300, deadline=None, database=None)
@given(value=json_values, indent=st.sampled_from([None, 0, 2]), ascii_only=st.booleans())
def test_the_parser_for_deep_text_reads_what_pythons_decoder_reads(
    value: object, indent: int | None, ascii_only: bool
) -> None:
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    decoded, expected = _Parser(text).value(), json.loads(text)
    if not (isinstance(expected, float) and math.isnan(expected)):  # NaN != NaN
        assert repr(decoded) == repr(expected)


def test_nesting_past_pythons_limit_decodes_with_a_placeholder_at_the_depth_limit() -> None:
    with pytest.raises(RecursionError):
        json.loads(nested(DEEP))

    value = any_json.loads('{"id": "job-1", "junk": ' + nested(DEEP) + ', "n": 2}')

    assert (value["id"], value["n"]) == ("job-1", 2)
    inner = value["junk"]
    for _ in range(DEPTH_MAX - 1):  # the object is level 1, "junk"'s lists 2..DEPTH_MAX
        [inner] = inner
    assert isinstance(inner, Unreadable)
    assert "nested deeper than 64 levels" in repr(inner)


def test_an_integer_over_pythons_digit_limit_decodes_to_a_placeholder() -> None:
    value = any_json.loads('{"n": -' + "9" * 5_000 + ', "m": 1e400}')
    assert repr(value["n"]) == "<an integer of 5000 digits>"
    assert value["m"] == math.inf


@pytest.mark.parametrize(
    "inner",
    ["[1,]", "{,}", '{"a"}', '{"a":}', "[1 2]", "01", "[}", "{]", "tru", '"abc', "1.", ".5",
     "[,1]", '{"a":1,}', "'a'", '"\x01"', '"\\x"', "-"],
)  # fmt: skip
def test_text_that_is_not_json_is_refused_however_deep(inner: str) -> None:
    for text in (inner, nested(DEEP, inner)):
        with pytest.raises(ValueError):
            any_json.loads(text)


@pytest.mark.parametrize("text", ["", nested(DEEP) + "]", "[" + nested(DEEP), nested(DEEP) + " x"])
def test_unbalanced_or_trailing_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        any_json.loads(text)
