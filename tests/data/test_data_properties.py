"""Property-based: a facts file with random bad lines, encodings and duplicate ids either
fails with an error naming the file and line, or loads every valid fact exactly once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from knowloc.data import load_facts
from knowloc.errors import DataError, TokenizationError

NAME = st.text(alphabet="abcXYZé\u2028\u00a0", min_size=1, max_size=6).filter(
    lambda t: t.strip() and t == t.strip())
BAD = st.sampled_from([
    b'{"relation": "P1", ',  # malformed JSON
    b"[1, 2]",  # not an object
    b'{"relation": "P1", "subject": "a"}',  # no object
    b'{"relation": "P1", "subject": "\xff\xfe", "object": "b"}',  # not UTF-8
    b'{"relation": 5, "subject": "a", "object": "b"}',  # relation not a string
])


@st.composite
def facts_file(draw):
    """(lines as bytes, expected fact ids in order or None when an error is due)."""
    n = draw(st.integers(1, 6))
    lines: list[bytes] = []
    ids: list[str] = []
    bad = False
    for _ in range(n):
        if draw(st.integers(0, 4)) == 0:
            lines.append(draw(BAD))
            bad = True
            continue
        fid = draw(st.sampled_from(["f1", "f2", "f3", "f4", "f5", "f6"]))
        bad |= fid in ids
        ids.append(fid)
        row = {"relation": "P1", "subject": draw(NAME), "object": draw(NAME), "fact_id": fid,
               "templates": ["[X] is [Y]"]}
        lines.append(json.dumps(row, ensure_ascii=draw(st.booleans())).encode("utf-8"))
        if draw(st.booleans()):
            lines.append(b"")
    return lines, None if bad else ids, draw(st.booleans()), draw(st.sampled_from([b"\n", b"\r\n"]))


def check(path: Path, lines: list[bytes], expected: list[str] | None, bom: bool,
          eol: bytes):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + eol.join(lines) + eol)
    try:
        facts = load_facts(path, min_queries=1)
    except DataError as exc:
        assert expected is None, f"valid file refused: {exc}"
        m = re.search(re.escape(str(path)) + r":(\d+)", str(exc))
        assert m and 1 <= int(m.group(1)) <= len(lines), str(exc)
        return None
    assert expected is not None, "a bad file was accepted"
    assert [f.fact_id for f in facts] == expected
    return facts


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(facts_file())
def test_loader_errors_name_the_line_or_load_every_fact_once(tmp_path, case):
    lines, expected, bom, eol = case
    check(tmp_path / "facts.jsonl", lines, expected, bom, eol)


@settings(max_examples=3, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(facts_file())
# "X" is <unk> in the tiny vocabulary: an answer with no target
@example(([(b'{"relation": "P1", "subject": "X", "object": "X", "fact_id": "f1", '
            b'"templates": ["[X] is [Y]"]}')], ["f1"], False, b"\n"))
def test_every_valid_fact_is_localized_exactly_once(tmp_path_factory, tiny_dir, case):
    from knowloc.models import load_model
    from knowloc.pipeline.localize import LocalizeConfig, localize
    from knowloc.store import RunStore

    lines, expected, bom, eol = case
    d = tmp_path_factory.mktemp("prop")
    facts = check(d / "facts.jsonl", lines, expected, bom, eol)
    if facts is None:
        return
    model = _model(tiny_dir, load_model)
    untargetable = []
    for f in facts:
        try:
            [model.target_ids(q.prompt, q.answer) for q in f.queries]
        except TokenizationError:
            untargetable.append(f.fact_id)
    store = RunStore(d / "run")
    if untargetable:
        # an answer the tiny vocabulary cannot spell (<unk>): refused before any unit runs,
        # naming the fact
        with pytest.raises(TokenizationError, match=f"fact {untargetable[0]} "):
            localize(model, facts, store, LocalizeConfig(n_steps=2), progress=False)
        assert not store.done_keys("queries")
        return
    res = localize(model, facts, store, LocalizeConfig(n_steps=2), progress=False)
    got = res.queries.groupby("fact_id").size().to_dict()
    assert got == {f.fact_id: len(f.queries) for f in facts}


_MODELS: dict[str, object] = {}


def _model(tiny_dir, load):
    if "m" not in _MODELS:
        _MODELS["m"] = load(str(tiny_dir))
    return _MODELS["m"]


GOOD_LINE = b'{"relation": "P1", "subject": "a", "object": "b", "templates": ["[X] is [Y]"]}'


@pytest.mark.parametrize("data", [b"\xff\n", GOOD_LINE + b"\n\xfe\n"])
def test_undecodable_line_is_named(tmp_path, data):
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    with pytest.raises(DataError, match=re.escape(str(path)) + r":\d+: not UTF-8"):
        load_facts(path)
