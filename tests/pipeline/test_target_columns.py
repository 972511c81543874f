"""The ``screen`` and ``queries`` tables say what was scored: ``target_ids`` (every token of
the answer's target in the run's target mode) and ``target_text`` (exactly those tokens,
decoded); ``target_id`` stays the first token. On Gemma, the year 1961 under ``first`` is
the bare space and "1" (" 1"), under ``all`` all five tokens (" 1961")."""

from __future__ import annotations

import pandas as pd
import pytest
from tiny import tiny_model

from knowloc.attribution import AttributionConfig
from knowloc.data import Fact, Query
from knowloc.neurons import Selection
from knowloc.pipeline.localize import (
    LocalizeUnit,
    ScreenUnit,
    attribute_query,
    localization_tables,
    localize_query,
    screen_fact,
)
from knowloc.pipeline.run import MAPS, map_frame, read_map
from knowloc.store import RunStore

# the tiny tokenizer is word-level: the target of a three-word answer is three tokens
Q1, Q2, ANSWER = "the official is", "official language is", "portuguese and official"
TURING = "Alan Turing was born in the year"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def query(i: int, prompt: str, answer: str) -> Query:
    return Query("f", f"q{i}", "R", f"[X] {prompt} [Y]", prompt, answer)


def fact(*prompts: str, answer: str) -> Fact:
    return Fact("f", "R", "x", answer, tuple(query(i, p, answer) for i, p in enumerate(prompts)))


def localize_unit(prompt: str, answer: str, target: str) -> LocalizeUnit:
    return LocalizeUnit(query(0, prompt, answer),
                        AttributionConfig(method="ig", n_steps=2, target=target).validate(),
                        Selection(), 10, None, 1.0)


@pytest.mark.parametrize(("target", "text"), [("first", "portuguese"), ("all", ANSWER)])
def test_screen_rows_name_every_scored_token(tiny, target, text):
    rows = screen_fact(tiny, ScreenUnit(fact(Q1, Q2, answer=ANSWER), target))["screen"]
    for _, row in rows.iterrows():
        ids = tiny.target_ids(row["prompt"], ANSWER, target)
        assert row["target_ids"] == list(ids) and len(ids) == (1 if target == "first" else 3)
        assert row["target_id"] == ids[0]
        assert row["target_text"].strip() == text


@pytest.mark.parametrize(("target", "text"), [("first", "portuguese"), ("all", ANSWER)])
def test_queries_row_names_the_attributed_tokens_also_when_read_from_a_stored_map(
        tiny, tmp_path, target, text):
    unit = localize_unit(Q1, ANSWER, target)
    direct = localize_query(tiny, unit)["queries"]
    (row,) = direct.to_dict("records")
    assert row["target_ids"] == list(tiny.target_ids(Q1, ANSWER, target))
    assert row["target_id"] == row["target_ids"][0] and row["target_text"].strip() == text
    # the same unit computed from its stored attribution map (FromMaps) has the same row
    store = RunStore(tmp_path / "run")
    attr, seconds = attribute_query(tiny, unit)
    store.put(MAPS, "m", map_frame(attr, unit.ident, seconds))
    stored, _ = read_map(store, "m", "q0")
    again = localization_tables(unit, stored, seconds, tiny)["queries"]
    pd.testing.assert_frame_equal(again, direct, check_exact=True)


@pytest.mark.slow
@pytest.mark.parametrize(("target", "text", "n_tokens"), [("first", " 1", 2), ("all", " 1961", 5)])
def test_gemma_1961_tables_say_what_was_attributed(gemma, target, text, n_tokens):
    """The bug report: ``target_id`` alone decodes to a bare space, though " 1" is scored."""
    screened = screen_fact(gemma, ScreenUnit(fact(TURING, answer="1961"), target))["screen"]
    (srow,) = screened.to_dict("records")
    (qrow,) = localize_query(gemma, localize_unit(TURING, "1961", target))["queries"] \
        .to_dict("records")
    for row in (srow, qrow):
        assert gemma.tokenizer.decode([row["target_id"]]) == " "
        assert row["target_ids"] == list(gemma.target_ids(TURING, "1961", target))
        assert len(row["target_ids"]) == n_tokens and row["target_text"] == text
