"""RayExecutor on a local two-CPU Ray instance shared by the module, with the tiny LLaMA.

The first tests share one executor and its two warm actors, in definition order: the toy
units (a localize-like compute), then whole stages through the unit runner compared byte for
byte with the local executor, then a unit that kills every worker it reaches (which ends with
an error that kills the pool). Torch runs one thread on both sides: results depend on the
thread count in the last bits. Actor start-up (import torch, load the model) is most of this
module's time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from knowloc import attribute, load_model
from knowloc.data import load_facts
from knowloc.errors import ConfigError, ModelError, RunError
from knowloc.pipeline.consistency import consistency
from knowloc.pipeline.distributed import (
    RAY_MISSING,
    ModelSpec,
    RayConfig,
    RayExecutor,
    make_executor,
)
from knowloc.pipeline.localize import LocalizeConfig, localize
from knowloc.pipeline.mapping import MappingConfig, query_kn_mapping
from knowloc.pipeline.modify import ModifyConfig, modify
from knowloc.pipeline.units import LocalExecutor, Unit
from knowloc.store import RunStore

HERE = Path(__file__).resolve().parent
QUERIES = [
    ("the capital of france is", "paris"),
    ("the capital of spain is", "madrid"),
    ("the capital of italy is", "rome"),
    ("the official language of brazil is", "portuguese"),
    ("the capital of germany is", "berlin"),
    ("the capital of japan is", "tokyo"),
]


def toy_compute(model, payload: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """A localize-like unit: IG, 3 steps, the top neurons and a query row.

    ``payload["hold"]`` (a directory): on the unit's first attempt, write this worker's pid
    to ``<hold>/<key>.pid`` and wait to be killed. ``payload["die"]``: kill this worker.
    """
    if payload.get("die"):
        os.kill(os.getpid(), signal.SIGKILL)
    if payload.get("hold"):
        pid_file = Path(payload["hold"]) / f"{payload['key']}.pid"
        if not pid_file.exists():
            tmp = pid_file.with_suffix(".tmp")
            tmp.write_text(str(os.getpid()))
            tmp.rename(pid_file)
            time.sleep(300)
        (Path(payload["hold"]) / f"{payload['key']}.{os.getpid()}.done").touch()
    if payload.get("fail"):
        raise ConfigError("n_steps must be an integer >= 2")
    a = attribute(model, (payload["prompt"], payload["answer"]), "ig", n_steps=3, progress=False)
    top = pd.DataFrame(a.top(10), columns=["layer", "neuron", "attribution", "activation"])
    row = pd.DataFrame([{"prompt": a.prompt, "target_id": a.target_id, "prob": a.prob,
                         "predicted": a.predicted, "max": float(a.scores.max())}])
    return {"attributions": top, "queries": row}


def make_units(**extra: Any) -> list[Unit]:
    return [Unit(key=f"q{i}", payload={"key": f"q{i}", "prompt": p, "answer": a, **extra},
                 label=p) for i, (p, a) in enumerate(QUERIES)]


ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    path = os.pathsep.join([str(HERE), str(HERE.parent), *sys.path])  # workers import toy_compute from here
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray.get_runtime_context().gcs_address  # for drivers in other processes
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def executor(cluster):
    ex = RayExecutor(RayConfig(workers=2, threads_per_worker=1, max_retries=1))
    yield ex
    ex.close()
    assert ray.is_initialized()  # the executor did not start this instance: left running


@pytest.fixture(scope="module")
def reference(model) -> dict[str, dict[str, pd.DataFrame]]:
    """Every unit computed in this process, with the workers' one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {u.key: toy_compute(model, u.payload) for u in make_units()}
    finally:
        torch.set_num_threads(threads)


def assert_same(got: dict[str, dict[str, pd.DataFrame]], reference) -> None:
    assert sorted(got) == sorted(reference)
    for key, tables in got.items():
        assert sorted(tables) == sorted(reference[key])
        for name, frame in tables.items():
            pd.testing.assert_frame_equal(frame, reference[key][name], check_exact=True)


def collect(executor, units, model) -> dict[str, dict[str, pd.DataFrame]]:
    got: dict[str, dict[str, pd.DataFrame]] = {}
    for i, tables in executor.run(toy_compute, model, [u.payload for u in units]):
        assert units[i].key not in got, f"unit {units[i].key} yielded twice"
        got[units[i].key] = tables
    return got


def test_results_identical_to_in_process(executor, model, reference):
    got = collect(executor, make_units(), model)
    assert_same(got, reference)
    # the actors stay up between maps and serve the next one
    assert_same(collect(executor, make_units()[:2], model),
                {k: reference[k] for k in ("q0", "q1")})


def test_killed_worker_unit_is_retried_elsewhere_exactly_once(executor, model, reference,
                                                              tmp_path):
    units = make_units()
    units[2] = Unit(units[2].key, {**units[2].payload, "hold": str(tmp_path)}, units[2].label)
    pid_file = tmp_path / "q2.pid"
    killed: list[int] = []

    def kill_when_held() -> None:
        deadline = time.time() + 120
        while not pid_file.exists() and time.time() < deadline:
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGKILL)  # what the OOM killer does
        killed.append(pid)

    killer = threading.Thread(target=kill_when_held, daemon=True)
    killer.start()
    got = collect(executor, units, model)
    killer.join(timeout=5)
    assert killed, "the held unit never started"
    assert_same(got, reference)
    done = [p.name for p in tmp_path.glob("q2.*.done")]
    assert len(done) == 1 and done[0] != f"q2.{killed[0]}.done"  # finished by another worker


# ---------------------------------------------------------------- stages through run_units
STEPS = 3


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def consolidated(root: Path, *tables: str) -> dict[str, bytes]:
    """The bytes of a run's consolidated tables."""
    return {t: (root / f"{t}.parquet").read_bytes() for t in tables}


# ``timings`` holds wall seconds: everything else of localize must be identical
LOCALIZED = ("queries", "neuron_sets", "attributions")


def run_stages(root: Path, model, facts, executor, *, later: bool) -> Path:
    """Localize (IG, AMIG) with ``executor``; with ``later``, also consistency (local: it
    has no model), query-KN mapping and modification with ``executor``."""
    store = RunStore(root)
    localize(model, facts, store, LocalizeConfig(methods=["ig", "amig"], n_steps=STEPS),
             progress=False, executor=executor)
    if later:
        consistency(store, population="all")
        query_kn_mapping(model, store, MappingConfig(only_known=False), progress=False,
                         executor=executor)
        modify(model, store, ModifyConfig(ppl_entries=2, ppl_pool=4, ppl_max_tokens=16,
                                          n_locality=3).validate(),
               progress=False, executor=executor)
    return root


@pytest.fixture(scope="module")
def facts(facts_file):
    return load_facts(f"jsonl:{facts_file}")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, model, facts) -> Path:
    """The stages computed by the local executor, on one torch thread."""
    with one_thread():
        return run_stages(tmp_path_factory.mktemp("local") / "run", model, facts,
                          LocalExecutor(), later=True)


def test_stages_via_ray_write_the_local_executors_bytes(executor, model, facts, local_run,
                                                        tmp_path):
    got = run_stages(tmp_path / "run", model, facts, executor, later=True)
    tables = (*LOCALIZED, "consistency", "interventions", "edits")
    assert consolidated(got, *tables) == consolidated(local_run, *tables)
    assert len(pd.read_parquet(got / "interventions.parquet")) > 0
    assert len(pd.read_parquet(got / "edits.parquet")) > 0


def test_killed_worker_between_units_still_gives_identical_tables(executor, model, facts,
                                                                   local_run, tmp_path):
    if not executor.worker_pids():  # run alone: let the workers load their model first
        run_stages(tmp_path / "warm", model, facts, executor, later=False)
    before = executor.worker_pids()
    # workers that loaded their model before the last run ended (a slow one may not have)
    assert 1 <= len(before) <= 2
    os.kill(before[0], signal.SIGKILL)  # what the OOM killer does
    deadline = time.time() + 30
    while time.time() < deadline and os.path.exists(f"/proc/{before[0]}"):
        time.sleep(0.05)
    got = run_stages(tmp_path / "run", model, facts, executor, later=False)
    assert consolidated(got, *LOCALIZED) == consolidated(local_run, *LOCALIZED)
    after = executor.worker_pids()
    assert before[0] not in after and all(p in after for p in before[1:])  # replacement may load


def test_unit_that_always_kills_its_worker_fails_after_bounded_retries(executor, model):
    units = make_units()[:2]
    units[0] = Unit(units[0].key, {**units[0].payload, "die": True}, "poison")
    with pytest.raises(RunError, match=r"unit 1 of 2 \(dict\): its Ray worker died 2 times"):
        collect(executor, units, model)


def test_model_a_worker_cannot_load_is_a_one_line_model_error(cluster, model, tmp_path):
    spec = ModelSpec(str(tmp_path / "no-such-model"))
    with (RayExecutor(RayConfig(workers=1, threads_per_worker=1), spec=spec) as ex,
          pytest.raises(ModelError) as info):
        collect(ex, make_units()[:1], model)
    assert str(info.value).startswith(f"a Ray worker cannot load {spec.name_or_path}: "
                                      "knowloc.errors.ModelError: cannot load model")
    assert "\n" not in str(info.value)


def test_error_in_compute_is_raised_as_is(cluster, model):
    units = make_units()[:2]
    units[1] = Unit(units[1].key, {**units[1].payload, "fail": True}, units[1].label)
    with (RayExecutor(RayConfig(workers=1, threads_per_worker=1)) as ex,
          pytest.raises(ConfigError) as info):
        collect(ex, units, model)
    assert str(info.value) == "n_steps must be an integer >= 2"


def test_worker_model_must_match_the_drivers(cluster, model, tiny_dir):
    spec = ModelSpec(str(tiny_dir), device="cpu", dtype="bfloat16")
    with (RayExecutor(RayConfig(workers=1, threads_per_worker=1), spec=spec) as ex,
          pytest.raises(ConfigError, match="the units' keys would lie")):
        collect(ex, make_units()[:1], model)


def test_worker_weights_must_match_the_drivers(cluster, tiny_dir, tmp_path):
    """Weight files changed under the model's name after the driver loaded them: same
    fingerprint, other weights. The workers are refused with one line naming both hashes."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "tiny"
    shutil.copytree(tiny_dir, copy)
    driver = load_model(str(copy))
    ours = driver.weights_identity()["sha256"]
    (weights,) = copy.glob("*.safetensors")
    tensors = load_file(weights)
    name = min(tensors)
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights, metadata={"format": "pt"})
    theirs = load_model(str(copy)).weights_identity()["sha256"]
    assert theirs != ours
    with (RayExecutor(RayConfig(workers=1, threads_per_worker=1)) as ex,
          pytest.raises(RunError) as info):
        collect(ex, make_units()[:1], driver)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == (f"a Ray worker loaded {copy} with weights {theirs[:12]}, but the driver's "
                   f"model has weights {ours[:12]}; give every node the driver's weight files "
                   f"under that name, or run with --executor local")


class ToyState:
    """A per-worker state (a stage's setup): the model, this process and a build number."""

    def __init__(self, model) -> None:
        self.model = model
        self.pid = os.getpid()
        self.token = os.urandom(8).hex()
        self.units = 0


def toy_state_compute(state: ToyState, payload: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """``toy_compute`` through the state, with which state computed it."""
    state.units += 1
    tables = toy_compute(state.model, payload)
    tables["states"] = pd.DataFrame([{"pid": state.pid, "token": state.token,
                                      "nth": state.units}])
    return tables


def test_setup_runs_once_per_worker_per_call_and_changes_no_byte(executor, model, reference):
    """Each worker builds the stage's state on its first unit of a call and keeps it for the
    call's other units; the next call builds new states; the tables are the local bytes."""
    calls = []
    for _ in range(2):
        got = {}
        for i, tables in executor.run(toy_state_compute, model,
                                      [u.payload for u in make_units()], setup=ToyState):
            got[make_units()[i].key] = tables
        states = pd.concat([t.pop("states") for t in got.values()])
        assert_same(got, reference)
        per_token = states.groupby("token")
        assert per_token["pid"].nunique().eq(1).all()  # a state never leaves its worker
        assert states.groupby("pid")["token"].nunique().eq(1).all()  # one state per worker
        assert sorted(per_token["nth"].max()) == sorted(per_token.size())  # its units, counted
        calls.append(set(states["token"]))
    assert not calls[0] & calls[1]  # a new call, new states


def test_missing_ray_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError) as info:
        RayExecutor(RayConfig(workers=2))
    assert str(info.value) == RAY_MISSING == '--executor ray needs Ray: pip install "knowloc[ray]"'
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- through the CLI
def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "knowloc.cli", "-q", *argv]


def test_killed_driver_resumes_with_the_local_executor(cluster, executor, model, tiny_dir,
                                                       facts_file, tmp_path):
    """``knowloc localize --executor ray`` SIGKILLed mid-run, resumed by ``--executor local``,
    ends with the tables of one uninterrupted local run."""
    executor.close()  # free the two CPUs of the shared cluster for the subprocess' worker
    args = ["localize", "--model", str(tiny_dir), "--dataset", f"jsonl:{facts_file}",
            "--method", "ig,sig,amig", "--n-steps", "8"]
    reference = tmp_path / "reference"
    with one_thread():
        from knowloc.cli import main

        assert main(["-q", *args, "--out", str(reference)]) == 0
    total = len(list((reference / "parts" / "queries").glob("*.parquet")))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(cli(*args, "--out", str(run), "--executor", "ray", "--ray-address",
                                  cluster, "--workers", "1", "--threads-per-worker", "1"),
                              env=env, stderr=subprocess.PIPE, text=True)
    parts = run / "parts" / "queries"
    deadline = time.time() + 180
    while driver.poll() is None and time.time() < deadline:
        if parts.exists() and any(parts.glob("*.parquet")):
            break
        time.sleep(0.01)
    assert driver.poll() is None, f"the driver ended first: {driver.stderr.read()[-2000:]}"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done = len(list(parts.glob("*.parquet")))
    assert 0 < done < total
    assert not (run / "queries.parquet").exists()  # consolidation never happened
    with one_thread():
        assert main(["-q", *args, "--out", str(run), "--executor", "local"]) == 0
    assert consolidated(run, *LOCALIZED) == consolidated(reference, *LOCALIZED)


def test_ray_only_options_need_the_ray_executor():
    with pytest.raises(ConfigError) as info:
        make_executor("local", workers=2, threads_per_worker=1)
    assert str(info.value) == "--workers, --threads-per-worker only apply to --executor ray"


def test_missing_ray_through_the_cli(tmp_path, tiny_dir, facts_file):
    """Without Ray, ``--executor ray`` is one line and exit 2, before the model is loaded."""
    blocker = tmp_path / "no_ray"
    blocker.mkdir()
    (blocker / "ray.py").write_text("raise ImportError('No module named ray')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cli("localize", "--model", "smollm2-135m", "--dataset",
                             f"jsonl:{facts_file}", "--out", str(tmp_path / "run"),
                             "--executor", "ray"), env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"knowloc: error: {RAY_MISSING}"
