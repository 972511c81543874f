"""Tests for knowloc.data: built-in facts, ParaRel loading, users' JSONL, bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from knowloc.data import Fact, FactSet, Query, load_facts, normalize_template, pararel_relations
from knowloc.errors import ConfigError, DataError, KnowlocError

PARAREL = Path(__file__).resolve().parents[3] / "shared" / "data" / "pararel"


def _needs_pararel() -> None:
    if not (PARAREL / "graphs_json").is_dir():
        pytest.skip(f"ParaRel data not found at {PARAREL}")


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


def _mini_pararel(root: Path, patterns: dict[str, list[str]], facts: dict[str, int]) -> Path:
    """A tiny ParaRel-shaped directory: patterns per relation, n facts per relation."""
    for rel, pats in patterns.items():
        _write_jsonl(root / "graphs_json" / f"{rel}.jsonl", [{"pattern": p} for p in pats])
    for rel, n in facts.items():
        _write_jsonl(
            root / "trex_lms_vocab" / f"{rel}.jsonl",
            [
                {"sub_label": f"S{rel}{i}", "obj_label": f"O{i}", "uuid": f"u{rel}-{i}"}
                for i in range(n)
            ],
        )
    return root


def _check_query_shape(q: Query) -> None:
    assert "[Y]" not in q.prompt and "[X]" not in q.prompt
    assert q.prompt == q.prompt.strip() and q.prompt
    assert q.template.endswith(" [Y]") and q.template.count("[X]") == 1
    assert q.answer and q.answer == q.answer.strip()


# ----------------------------------------------------------------------------- builtin


def test_builtin_set_size_and_shape() -> None:
    fs = load_facts()
    assert isinstance(fs, FactSet) and fs.source == "builtin"
    assert fs.skipped == {}
    assert len(fs.relations) >= 20 and fs.relations == sorted(fs.relations)
    per_rel = Counter(f.relation for f in fs.facts)
    assert set(per_rel) == set(fs.relations)
    assert min(per_rel.values()) >= 10
    assert len(fs) == len(fs.facts) == sum(per_rel.values())
    for f in fs.facts:
        assert isinstance(f, Fact)
        assert len(f.queries) >= 4
        assert len({q.template for q in f.queries}) == len(f.queries)
        for i, q in enumerate(f.queries):
            _check_query_shape(q)
            assert q.fact_id == f.fact_id and q.relation == f.relation
            assert q.query_id == f"{f.fact_id}#{i}"
            assert q.answer == f.object
            assert f.subject in q.prompt
    ids = [q.query_id for q in fs.queries()]
    assert len(ids) == len(set(ids)) == sum(len(f.queries) for f in fs.facts)
    assert len({f.fact_id for f in fs.facts}) == len(fs)


def test_builtin_brazil_portuguese() -> None:
    fs = load_facts("builtin", relations=["P37"])
    assert fs.relations == ["P37"]
    brazil = [f for f in fs.facts if f.subject == "Brazil"]
    assert len(brazil) == 1 and brazil[0].object == "Portuguese"
    prompts = {q.prompt for q in brazil[0].queries}
    assert "The official language of Brazil is" in prompts
    assert brazil[0].fact_id.startswith("builtin:P37:")


def test_builtin_facts_per_relation_and_max_queries() -> None:
    fs = load_facts(facts_per_relation=3, max_queries_per_fact=2)
    full = load_facts()
    assert Counter(f.relation for f in fs.facts) == {r: 3 for r in full.relations}
    # first N in file order
    for rel, facts in fs.by_relation().items():
        assert [f.fact_id for f in facts] == [f.fact_id for f in full.by_relation()[rel][:3]]
    assert all(len(f.queries) == 2 for f in fs.facts)


def test_shuffle_is_seeded_and_per_relation() -> None:
    a = load_facts(facts_per_relation=4, shuffle=True, seed=1)
    b = load_facts(facts_per_relation=4, shuffle=True, seed=1)
    c = load_facts(facts_per_relation=4, shuffle=True, seed=2)
    assert [f.fact_id for f in a] == [f.fact_id for f in b]
    assert [f.fact_id for f in a] != [f.fact_id for f in c]
    only = load_facts(relations=["P36"], facts_per_relation=4, shuffle=True, seed=1)
    assert [f.fact_id for f in only] == [f.fact_id for f in a.by_relation()["P36"]]


def test_normalize_template_rule() -> None:
    assert normalize_template("The capital of  [X] is [Y] .") == "The capital of [X] is [Y]"
    assert normalize_template("[X]'s capital is [Y].") == "[X]'s capital is [Y]"
    assert normalize_template(" [X] is in [Y] ") == "[X] is in [Y]"
    for bad in [
        "[Y] is the capital of [X].",
        "[X] is a [Y]-born person.",
        "[X] is in [Y],",
        "[X] is in[Y]",
        "The capital is [Y]",
        "[X] and [X] are [Y]",
    ]:
        with pytest.raises(DataError):
            normalize_template(bad)


# ----------------------------------------------------------------------------- ParaRel


def test_pararel_real_counts() -> None:
    _needs_pararel()
    assert len(pararel_relations(PARAREL)) == 39

    def n_lines(rel: str) -> int:
        text = (PARAREL / "trex_lms_vocab" / f"{rel}.jsonl").read_text(encoding="utf-8")
        return sum(1 for line in text.splitlines() if line.strip())

    # min_queries=1 keeps every relation (each has >= 1 pattern with [Y] last).
    every = load_facts(f"pararel:{PARAREL}", min_queries=1)
    assert len(every.relations) == 39
    assert len(every) == sum(n_lines(r) for r in every.relations) == 27610

    fs = load_facts(PARAREL)  # a directory path works too
    assert fs.source == f"pararel:{PARAREL}"
    counts = Counter(f.relation for f in fs.facts)
    for rel in ["P36", "P103", "P17", "P1376"]:
        assert counts[rel] == n_lines(rel)
    assert counts["P36"] == 471 and counts["P103"] == 919
    # P37, P140, P190, P1001 have a single pattern ending in [Y]: all their facts skipped.
    single = {"P37", "P140", "P190", "P1001"}
    assert set(fs.relations) == set(every.relations) - single and len(fs.relations) == 35
    assert fs.skipped["fewer than 2 usable templates"] == sum(n_lines(r) for r in single)
    assert fs.skipped["templates dropped: [Y] not last"] == 115

    p36 = fs.by_relation()["P36"][0]
    assert p36.fact_id.startswith("P36:") and len(p36.queries) == 8
    assert p36.queries[0].template == "The capital of [X] is [Y]"
    assert p36.queries[0].prompt == f"The capital of {p36.subject} is"
    for q in fs.queries():
        _check_query_shape(q)
    ids = [q.query_id for q in fs.queries()]
    assert len(ids) == len(set(ids))


def test_pararel_select_relations_and_first_n() -> None:
    _needs_pararel()
    fs = load_facts(f"pararel:{PARAREL}", relations=["P36", "P103"], facts_per_relation=5)
    assert fs.relations == ["P103", "P36"]
    rows = [
        json.loads(line)
        for line in (PARAREL / "trex_lms_vocab" / "P36.jsonl").read_text().splitlines()[:5]
    ]
    got = [f for f in fs.facts if f.relation == "P36"]
    assert [f.fact_id for f in got] == [f"P36:{r['uuid']}" for r in rows]
    assert [(f.subject, f.object) for f in got] == [(r["sub_label"], r["obj_label"]) for r in rows]


def test_pararel_unknown_relation_lists_available() -> None:
    _needs_pararel()
    with pytest.raises(DataError) as e:
        load_facts(PARAREL, relations=["P36", "P999999"])
    assert "P999999" in str(e.value) and "P36" in str(e.value) and "P1376" in str(e.value)


# ----------------------------------------------------------------------------- ParaRel-shaped tmp dirs


def test_mini_pararel_template_rules_and_skips(tmp_path: Path) -> None:
    root = _mini_pararel(
        tmp_path / "pr",
        {
            "P1": ["[X] is in [Y] .", "[X]  is in [Y].", "[X] lies in [Y]", "[Y] has [X]."],
            "P2": ["[X] likes [Y].", "[Y] is liked by [X]."],  # one usable template
            "P3": ["[Y] is the capital of [X].", "[X] is a [Y]-born person."],  # none usable
        },
        {"P1": 3, "P2": 4, "P3": 2},
    )
    fs = load_facts(f"pararel:{root}")
    assert fs.relations == ["P1"] and len(fs) == 3
    assert [q.template for q in fs.facts[0].queries] == ["[X] is in [Y]", "[X] lies in [Y]"]
    assert [q.prompt for q in fs.facts[0].queries] == ["SP10 is in", "SP10 lies in"]
    assert fs.skipped == {
        "templates dropped: duplicate after normalization": 1,
        "templates dropped: [Y] not last": 4,
        "relations skipped: no usable template": 1,
        "fewer than 2 usable templates": 4,
    }
    one = load_facts(root, min_queries=1)
    assert one.relations == ["P1", "P2"] and len(one) == 7


def test_missing_dir_and_missing_graphs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope"):
        load_facts(f"pararel:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="graphs_json"):
        load_facts(f"pararel:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="graphs_json"):
        load_facts(tmp_path / "empty")  # a directory without graphs_json/
    with pytest.raises(DataError, match="accepted forms"):
        load_facts(str(tmp_path / "does-not-exist"))
    with pytest.raises(DataError, match="accepted forms"):
        load_facts("")


def test_missing_trex_dir(tmp_path: Path) -> None:
    root = _mini_pararel(tmp_path / "pr", {"P1": ["[X] a [Y]", "[X] b [Y]"]}, {})
    with pytest.raises(DataError, match="trex_lms_vocab"):
        load_facts(root)


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    root = _mini_pararel(tmp_path / "pr", {"P1": ["[X] a [Y]", "[X] b [Y]"]}, {"P1": 3})
    fact_file = root / "trex_lms_vocab" / "P1.jsonl"
    lines = fact_file.read_text().splitlines()
    lines[1] = '{"sub_label": "x", "obj_label": '
    fact_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_facts(root)
    assert f"{fact_file}:2" in str(e.value) and "P1.jsonl" in str(e.value)

    graph_file = root / "graphs_json" / "P1.jsonl"
    graph_file.write_text('{"pattern": "[X] a [Y]"}\n\n{"pattern": oops}\n')
    with pytest.raises(DataError) as e:
        load_facts(root)
    assert f"{graph_file}:3" in str(e.value)


def test_fact_line_missing_label(tmp_path: Path) -> None:
    root = _mini_pararel(tmp_path / "pr", {"P1": ["[X] a [Y]", "[X] b [Y]"]}, {})
    _write_jsonl(
        root / "trex_lms_vocab" / "P1.jsonl",
        [{"sub_label": "a", "obj_label": "b", "uuid": "1"}, {"sub_label": "a", "uuid": "2"}],
    )
    with pytest.raises(DataError) as e:
        load_facts(root)
    assert "P1.jsonl:2" in str(e.value) and "obj_label" in str(e.value)


def test_unknown_relation_tmp(tmp_path: Path) -> None:
    root = _mini_pararel(tmp_path / "pr", {"P1": ["[X] a [Y]", "[X] b [Y]"]}, {"P1": 1})
    with pytest.raises(DataError, match=r"P2.*available: P1"):
        load_facts(root, relations=["P2"])


def test_only_skipped_relations_is_an_error(tmp_path: Path) -> None:
    root = _mini_pararel(tmp_path / "pr", {"P1": ["[X] a [Y]"]}, {"P1": 2})
    with pytest.raises(DataError, match="min_queries=2"):
        load_facts(root)
    assert len(load_facts(root, min_queries=1)) == 2


# ----------------------------------------------------------------------------- user JSONL


def test_user_jsonl_both_line_kinds(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"relation": "P36", "subject": "Peru", "object": "Lima"},
            {
                "relation": "P36",
                "label": "capital",
                "templates": ["The capital of [X] is [Y]", "[X]'s capital is [Y]."],
            },
            "",
            {
                "relation": "P36",
                "subject": "Chile",
                "object": "Santiago",
                "fact_id": "chile",
                "templates": [
                    "[X] has its capital in [Y]",
                    "[X] is governed from [Y]",
                    "[X]  is governed from [Y]",
                ],
            },
        ],
    )
    for src in (f"jsonl:{path}", str(path), path):
        fs = load_facts(src)
        assert fs.source == f"jsonl:{path}" and fs.relations == ["P36"]
        assert fs.relation_labels == {"P36": "capital"}
        assert [f.fact_id for f in fs] == ["jsonl:P36:0", "chile"]
        assert [q.prompt for q in fs.facts[0].queries] == [
            "The capital of Peru is",
            "Peru's capital is",
        ]
        assert [q.prompt for q in fs.facts[1].queries] == [
            "Chile has its capital in",
            "Chile is governed from",
        ]
        assert fs.skipped == {"templates dropped: duplicate after normalization": 1}


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"relation": "P1", "subject": "a", "object": "b", "templates": ["[Y] is [X]"]}, "[Y]"),
        ({"relation": "P1", "subject": "a", "object": "b", "templates": ["a is [Y]"]}, "[X]"),
        (
            {"relation": "P1", "subject": "a", "object": "b", "templates": ["[X] is [Y] ok"]},
            "end with [Y]",
        ),
        ({"relation": "P1", "subject": "a", "object": "b", "templates": []}, "templates"),
        ({"relation": "P1", "subject": "a", "templates": ["[X] is [Y]"]}, "object"),
        ({"subject": "a", "object": "b", "templates": ["[X] is [Y]"]}, "relation"),
        ({"relation": "P1", "subject": "a", "object": "b"}, "no 'templates'"),
        ({"relation": "P1", "subject": "", "object": "b", "templates": ["[X] [Y]"]}, "subject"),
        (
            {
                "relation": "P1",
                "subject": "a",
                "object": "b",
                "fact_id": "x#1",
                "templates": ["[X] is [Y]"],
            },
            "#",
        ),
        ({"relation": "P1"}, "a line must be"),
        ("[1, 2]", "JSON object"),
        ('{"relation": "P1", ', "malformed JSON"),
    ],
)
def test_user_jsonl_bad_lines(tmp_path: Path, row: object, needle: str) -> None:
    good = {"relation": "P1", "subject": "x", "object": "y", "templates": ["[X] is [Y]"]}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as e:
        load_facts(path, min_queries=1)
    assert f"{path}:2" in str(e.value)
    assert needle in str(e.value)


def test_user_jsonl_duplicates_and_missing(tmp_path: Path) -> None:
    t = {"relation": "P1", "templates": ["[X] a [Y]", "[X] b [Y]"]}
    path = _write_jsonl(tmp_path / "dup.jsonl", [t, t])
    with pytest.raises(DataError, match="already given"):
        load_facts(path)
    f = {"relation": "P1", "subject": "a", "object": "b", "fact_id": "same"}
    path = _write_jsonl(tmp_path / "dupid.jsonl", [t, f, f])
    with pytest.raises(DataError, match="duplicate fact_id"):
        load_facts(path)
    path = _write_jsonl(tmp_path / "nofacts.jsonl", [t])
    with pytest.raises(DataError, match="no facts"):
        load_facts(path)
    with pytest.raises(DataError, match="not found"):
        load_facts(tmp_path / "missing.jsonl")


def test_bad_options() -> None:
    with pytest.raises(ConfigError):
        load_facts(min_queries=0)
    with pytest.raises(ConfigError):
        load_facts(facts_per_relation=0)
    with pytest.raises(ConfigError):
        load_facts(max_queries_per_fact=1, min_queries=2)
    with pytest.raises(KnowlocError):
        load_facts(relations=[])
    with pytest.raises(DataError, match="available"):
        load_facts(relations=["P999"])
    # a bare string is one relation, not a sequence of characters
    assert load_facts(relations="P36").relations == ["P36"]
