"""The unit runner (knowloc.pipeline.units) and screening in waves."""

from __future__ import annotations

import shlex
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

from knowloc.data import Fact, FactSet, Query
from knowloc.pipeline import localize as loc
from knowloc.pipeline.units import (
    LocalExecutor,
    Unit,
    UnitError,
    WorkersLost,
    cli_command,
    resume_hint,
    run_units,
)
from knowloc.store import RunStore


def square(model, payload):
    """A pure compute: two tables, one of them the marker."""
    n = int(payload)
    return {"rows": pd.DataFrame({"n": [n] * n, "i": list(range(n))}),
            "done": pd.DataFrame({"n": [n], "square": [n * n * model["scale"]]})}


class ReversedExecutor:
    """Yields results in reverse order, as a distributed executor may."""

    def run(self, compute, model, payloads):
        for i in reversed(range(len(payloads))):
            yield i, compute(model, payloads[i])


class RecordingStore(RunStore):
    def __init__(self, root):
        super().__init__(root)
        self.order: list[tuple[str, str]] = []

    def put(self, table, key, df):
        self.order.append((table, key))
        super().put(table, key, df)


UNITS = [Unit(f"k{n}", n, f"unit {n}") for n in (3, 1, 2)]
SORT = {"rows": ["n", "i"], "done": ["n"]}


def test_runner_writes_every_table_marker_last_and_consolidates_sorted(tmp_path):
    store = RecordingStore(tmp_path / "run")
    stats = run_units(UNITS, square, store, model={"scale": 1}, marker="done",
                      consolidate=SORT, progress=False)
    assert (stats.computed, stats.skipped_done) == (3, 0)
    assert store.order == [("rows", "k3"), ("done", "k3"), ("rows", "k1"), ("done", "k1"),
                           ("rows", "k2"), ("done", "k2")]
    done = pd.read_parquet(tmp_path / "run" / "done.parquet")
    assert done["n"].tolist() == [1, 2, 3] and done["square"].tolist() == [1, 4, 9]
    rows = pd.read_parquet(tmp_path / "run" / "rows.parquet")
    assert rows[["n", "i"]].values.tolist() == [[1, 0], [2, 0], [2, 1], [3, 0], [3, 1], [3, 2]]


def test_runner_resumes_and_any_executor_gives_the_same_bytes(tmp_path):
    a = RunStore(tmp_path / "a")
    run_units(UNITS[:1], square, a, model={"scale": 1}, marker="done", progress=False)
    stats = run_units(UNITS, square, a, model={"scale": 1}, marker="done", consolidate=SORT,
                      executor=LocalExecutor(), progress=False)
    assert (stats.computed, stats.skipped_done) == (2, 1)
    again = run_units(UNITS, square, a, model={"scale": 99}, marker="done", consolidate=SORT,
                      progress=False)
    assert (again.computed, again.skipped_done) == (0, 3)  # nothing recomputed
    b = RunStore(tmp_path / "b")
    run_units(UNITS, square, b, model={"scale": 1}, marker="done", consolidate=SORT,
              executor=ReversedExecutor(), progress=False)
    for table in ("done", "rows"):
        assert (tmp_path / "a" / f"{table}.parquet").read_bytes() == \
            (tmp_path / "b" / f"{table}.parquet").read_bytes()
    # resume=False computes every unit again
    forced = run_units(UNITS, square, b, model={"scale": 2}, marker="done", progress=False,
                       resume=False)
    assert forced.computed == 3 and b.get("done", "k3")["square"].tolist() == [18]


def test_a_unit_without_its_marker_is_an_error_and_not_done(tmp_path):
    store = RunStore(tmp_path / "run")

    def no_marker(model, payload):
        return {"rows": pd.DataFrame({"n": [payload]})}

    with pytest.raises(UnitError, match="no 'done' table"):
        run_units(UNITS, no_marker, store, model=None, marker="done", progress=False)
    assert not store.done_keys("done")


# ------------------------------------------------------------------ screening in waves
def _facts(rng: np.random.Generator) -> FactSet:
    facts = []
    for r in range(3):
        for f in range(int(rng.integers(1, 9))):
            qs = tuple(Query(fact_id=f"P{r}-{f}", query_id=f"P{r}-{f}#{j}", relation=f"P{r}",
                             template=f"[X] {j} is [Y]", prompt=f"s{r}.{f} {j} is",
                             answer=f"a{f}") for j in range(2))
            facts.append(Fact(fact_id=f"P{r}-{f}", relation=f"P{r}", subject=f"s{r}.{f}",
                              object=f"a{f}", queries=qs))
    rng.shuffle(facts)  # relations interleaved
    return FactSet(facts=facts, source="test", skipped={}, relations=[f"P{r}" for r in range(3)])


def _sequential(facts: FactSet, known: set[str], quota: int | None, cap: int | None) -> set[str]:
    """Today's one-by-one loop: the facts it screens."""
    n_known: dict[str, int] = {}
    n_seen: dict[str, int] = {}
    screened = set()
    for f in facts:
        if quota is not None and n_known.get(f.relation, 0) >= quota:
            continue
        if cap is not None and n_seen.get(f.relation, 0) >= cap:
            continue
        n_seen[f.relation] = n_seen.get(f.relation, 0) + 1
        screened.add(f.fact_id)
        if f.fact_id in known:
            n_known[f.relation] = n_known.get(f.relation, 0) + 1
    return screened


@pytest.mark.parametrize("seed", range(12))
def test_screening_waves_screen_the_facts_a_sequential_loop_would(tmp_path, monkeypatch, seed):
    rng = np.random.default_rng(seed)
    facts = _facts(rng)
    known = {f.fact_id for f in facts if rng.random() < 0.4}
    quota = [None, 1, 2, 3][seed % 4]
    cap = [None, 4][seed % 2]

    def fake_screen(model, unit):
        fact = unit.fact
        return {"screen": pd.DataFrame([{"relation": q.relation, "fact_id": q.fact_id,
                                         "query_id": q.query_id, "prompt": q.prompt,
                                         "answer": q.answer, "target_id": 0, "prob": 0.5,
                                         "predicted": "x", "known": fact.fact_id in known}
                                        for q in fact.queries])}

    monkeypatch.setattr(loc, "screen_fact", fake_screen)
    model = SimpleNamespace(name="fake", adapter=SimpleNamespace(name="fake"), dtype="float32",
                            n_layers=1, d_mlp=1, target_ids=lambda prompt, answer, target: [0])
    table = loc.screen(model, facts, RunStore(tmp_path / "run"), progress=False,  # type: ignore[arg-type]
                       known_per_relation=quota, max_per_relation=cap)
    assert set(table["fact_id"]) == _sequential(facts, known, quota, cap)


def test_screening_in_waves_logs_one_summary_line(facts_file, tmp_path, caplog):
    """Screening with a quota runs in waves; the stage still says one summary line (what
    ``-q`` shows), counting every wave."""
    import logging

    from tiny import tiny_model

    from knowloc.data import load_facts

    facts = load_facts(f"jsonl:{facts_file}")
    model = tiny_model("llama")
    with caplog.at_level(logging.INFO, logger="knowloc"):
        table = loc.screen(model, facts, RunStore(tmp_path / "run"), progress=False,
                           known_per_relation=1)
    lines = [r.getMessage() for r in caplog.records if getattr(r, "summary", False)]
    n = table["fact_id"].nunique()
    waves = table.groupby("relation")["fact_id"].nunique().max()
    assert waves > 1  # the tiny model knows (almost) nothing: one wave per fact
    assert len(lines) == 1 and lines[0].startswith(f"screening ({waves} waves): {n} facts, "
                                                   f"{n} computed, 0 already done, "), lines


# ------------------------------------------------------------------ per-worker state
class Counter:
    """A stage's per-worker state: the model plus a memo of squares, counting its builds."""

    built: ClassVar[list[Counter]] = []

    def __init__(self, model) -> None:
        self.model = model
        self.memo: dict[int, int] = {}
        self.units = 0
        Counter.built.append(self)


def square_with_state(state: Counter, payload):
    """``square`` through a memo that only caches (the unit contract)."""
    n = int(payload)
    state.units += 1
    state.memo.setdefault(n, n * n * state.model["scale"])
    return {"rows": pd.DataFrame({"n": [n] * n, "i": list(range(n))}),
            "done": pd.DataFrame({"n": [n], "square": [state.memo[n]]})}


def test_local_executor_builds_the_state_once_per_call_and_only_with_units():
    Counter.built = []
    ex = LocalExecutor()
    got = dict(ex.run(square_with_state, {"scale": 2}, [3, 1, 3], setup=Counter))
    assert [int(t["done"]["square"].iloc[0]) for _, t in sorted(got.items())] == [18, 2, 18]
    assert len(Counter.built) == 1 and Counter.built[0].units == 3
    assert list(ex.run(square_with_state, {"scale": 2}, [], setup=Counter)) == []
    assert len(Counter.built) == 1  # no unit, no setup
    list(ex.run(square_with_state, {"scale": 2}, [2], setup=Counter))
    assert len(Counter.built) == 2 and Counter.built[1].units == 1  # a new call, a new state


def test_run_units_with_setup_writes_the_bytes_of_the_stateless_compute(tmp_path):
    """A stage with a setup writes what a plain compute writes; an executor written without
    ``setup`` still serves stages that have none."""
    Counter.built = []
    a, b = RunStore(tmp_path / "a"), RunStore(tmp_path / "b")
    run_units(UNITS, square, a, model={"scale": 1}, marker="done", consolidate=SORT,
              executor=ReversedExecutor(), progress=False)
    run_units(UNITS, square_with_state, b, model={"scale": 1}, marker="done",
              consolidate=SORT, setup=Counter, progress=False)
    assert len(Counter.built) == 1 and Counter.built[0].units == 3
    for table in ("done", "rows"):
        assert (tmp_path / "a" / f"{table}.parquet").read_bytes() == \
            (tmp_path / "b" / f"{table}.parquet").read_bytes()


def test_modify_has_no_module_state_and_builds_its_state_per_call():
    """The modification stage's caches are its setup step (EditState), not module globals."""
    import knowloc.pipeline.modify as modify_module
    from knowloc.pipeline.modify import EditState, EditUnit

    assert not hasattr(modify_module, "_MEMO")
    assert "scope" not in EditUnit.__dataclass_fields__
    state = EditState(model := object())
    assert state.model is model and state.samplers == {} and not state.baseline.seen


class LostExecutor:
    """Computes the first ``n`` units, then has no worker left."""

    def __init__(self, n: int) -> None:
        self.n = n

    def run(self, compute, model, payloads):
        for i in range(self.n):
            yield i, compute(model, payloads[i])
        raise WorkersLost("no live node of the Ray cluster could host a worker")


def test_lost_workers_keep_the_finished_units_and_say_how_to_resume(tmp_path):
    store = RunStore(tmp_path / "run")
    with pytest.raises(WorkersLost) as info:
        run_units(UNITS, square, store, model={"scale": 1}, marker="done", consolidate=SORT,
                  executor=LostExecutor(2), desc="squaring", progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("squaring: no live node of the Ray cluster could host a worker; "
                          f"1 of 3 units were not computed, the 2 finished ones are saved in "
                          f"{store.root}; rerun the same command to resume it")
    assert "`--executor local`" in msg
    assert sorted(store.done_keys("done")) == ["k1", "k3"]
    stats = run_units(UNITS, square, store, model={"scale": 1}, marker="done",
                      consolidate=SORT, progress=False)
    assert (stats.computed, stats.skipped_done) == (1, 2)


@pytest.mark.parametrize(("argv", "local"), [
    (["/usr/bin/knowloc", "modify", "--run", "r", "--executor", "ray", "--ray-address",
      "h:6379", "--workers=2", "--threads-per-worker", "1", "-q"],
     "knowloc modify --run r -q --executor local"),
    (["/x/knowloc/cli/__main__.py", "localize", "--executor=ray", "--gpus-per-worker", "0.5",
      "--out", "my run"],
     "knowloc localize --out 'my run' --executor local"),
])
def test_resume_hint_names_the_command_on_this_machine_and_on_ray(argv, local):
    hint = resume_hint(argv)
    assert f"resume on this machine with `{local}`" in hint
    assert f"or rerun `{shlex.join(['knowloc', *argv[1:]])}` once the Ray cluster" in hint
    assert cli_command(["/usr/bin/python", "-m", "pytest"]) is None
