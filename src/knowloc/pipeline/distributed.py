"""Run a stage's units on a Ray cluster: one long-lived actor per worker, one model per actor.

:class:`RayExecutor` is the distributed implementation of the unit runner's executor seam:
``run(compute, model, payloads)`` yields ``(index, tables)`` for every payload, in the order
the units finish (:func:`knowloc.pipeline.units.run_units` writes them). It is built on Ray
Core actors rather than Ray Data ``map_batches``:

- units are heterogeneous (a localization unit, an edit, an attention unit), each a
  payload plus a pure module-level ``compute(model, payload) -> {table: frame}``, not rows
  of a dataset with one schema; a stage's per-worker state (``setup``, see
  :mod:`knowloc.pipeline.units`) is built by each actor on its first unit of a stage call
  and dropped when the call ends, as a Ray Data actor class's ``__init__`` would hold it;
- a worker holds one model for its whole life (loading LLaMA-3-8B takes longer than many
  units), and the same actors serve every stage of a run that uses the same model;
- the driver gets each unit's tables as soon as that unit finishes, writes them as the
  unit's parts and can be stopped at any point (a rerun resumes from the parts written);
- a unit whose worker dies (killed actor, OOM-killed process, lost node) is resubmitted on
  its own to another worker, a bounded number of times; Ray Data retries whole batches and
  hides which rows were lost.

Workers *return* their tables to the driver, which alone writes the run directory; nothing
needs a filesystem shared between the nodes. Every unit is dispatched to at most one
worker at a time and resubmitted only once its worker is known dead, so each unit's tables
are yielded exactly once.

Units are dispatched in their order, each to the next idle worker; which units share a
worker does not change their bytes (the unit contract of :mod:`knowloc.pipeline.units`).

A worker loads its model from a :class:`ModelSpec` (an embedded name, a local directory or
a Hugging Face id: it must be reachable under that name on every node). Before a worker
gets a unit, its :func:`~knowloc.pipeline.run.model_fingerprint` and its weights hash
(:meth:`~knowloc.models.Model.weights_identity`) must match the driver's, because the units'
keys and the run's weights record come from the driver's model.

A cluster that loses every node able to host a worker (a node's raylet killed, the machine
gone) cannot finish the units: once no live node has room for one worker for
``RayConfig.node_wait_s`` seconds (after one had), :meth:`RayExecutor.run` raises
:class:`~knowloc.pipeline.units.WorkersLost` (the units finished before are written; the
error says how to resume) instead of waiting for an actor that can never start.

Ray is an optional dependency (``pip install "knowloc[ray]"``), imported only here.
:func:`make_executor` builds the executor a stage runs its units with, by name (``local`` or
``ray``), as the CLI's ``--executor`` options do.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, KnowlocError, ModelError, RunError
from .run import model_fingerprint
from .units import Compute, Executor, LocalExecutor, Setup, Tables, WorkersLost

if TYPE_CHECKING:
    from typing_extensions import Self

    from ..models import Model

log = logging.getLogger(__name__)

__all__ = ["EXECUTORS", "RAY_MISSING", "ModelSpec", "RayConfig", "RayExecutor",
           "make_executor"]

RAY_MISSING = '--executor ray needs Ray: pip install "knowloc[ray]"'
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide to run.

    ``address``: an existing cluster (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``);
    ``None`` joins the Ray instance this process already initialized, or else starts a local
    one sized to the workers. ``workers``: number of actors (default: as many as the
    cluster's GPUs allow at ``gpus_per_worker``, else its CPUs at ``threads_per_worker``).
    ``gpus_per_worker``: GPUs reserved per actor (fractions share a GPU); with GPUs the
    workers load the model on ``cuda``. ``threads_per_worker``: torch intra-op threads and
    CPUs reserved per actor (default: a local cluster's cores split between the workers,
    else 1). ``max_retries``: how many times one unit is resubmitted after its worker died.
    ``node_wait_s``: how long the run waits while no live node of the cluster can host a
    worker (all died, or the last one left) before it stops with
    :class:`~knowloc.pipeline.units.WorkersLost`; ``poll_s``: how often it checks.
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0
    threads_per_worker: int | None = None
    max_retries: int = 2
    node_wait_s: float = 60.0
    poll_s: float = 2.0

    def validate(self) -> RayConfig:
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise ConfigError(f"workers must be an integer >= 1 (got {self.workers!r})")
        if not self.gpus_per_worker >= 0:
            raise ConfigError(f"gpus_per_worker must be >= 0 (got {self.gpus_per_worker!r})")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ConfigError(
                f"threads_per_worker must be an integer >= 1 (got {self.threads_per_worker!r})"
            )
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0 (got {self.max_retries!r})")
        if not self.node_wait_s >= 0 or not self.poll_s > 0:
            raise ConfigError(f"node_wait_s must be >= 0 and poll_s > 0 (got "
                              f"{self.node_wait_s!r}, {self.poll_s!r})")
        return self


@dataclass(frozen=True)
class ModelSpec:
    """What a worker passes to :func:`knowloc.models.load_model` (picklable)."""

    name_or_path: str
    device: str = "cpu"
    dtype: str = "float32"

    @classmethod
    def of(cls, model: Model, device: str | None = None) -> ModelSpec:
        """The spec that reloads ``model`` (by its name), on ``device`` or on its own device."""
        return cls(
            name_or_path=model.name,
            device=device or str(model.device),
            dtype=str(model.dtype).replace("torch.", ""),
        )


class Worker:
    """The body of one Ray actor: loads the model once, then computes units.

    A stage's state (``setup``) is built on the worker's first unit of each stage call
    (``call`` numbers the calls of one executor) and kept for that call's units only."""

    def __init__(self, spec: ModelSpec, threads: int) -> None:
        import torch

        from ..models import load_model

        torch.set_num_threads(threads)
        self.model = load_model(spec.name_or_path, device=spec.device, dtype=spec.dtype)
        self.call: int | None = None
        self.state: Any = None

    def identity(self) -> tuple[dict[str, Any], str, int, int]:
        """The model's fingerprint, its weights hash, this process's id and its torch
        threads."""
        import torch

        return (model_fingerprint(self.model), self.model.weights_identity()["sha256"],
                os.getpid(), torch.get_num_threads())

    def run(self, compute: Compute, payload: Any, setup: Setup | None = None,
            call: int | None = None) -> Tables:
        if setup is None:
            return compute(self.model, payload)
        if call is None or call != self.call:
            self.release()
            self.state = setup(self.model)
            self.call = call
        return compute(self.state, payload)

    def release(self) -> None:
        """Drop the state of the last stage call."""
        self.state = None
        self.call = None


def import_ray() -> Any:
    """The ``ray`` module, or :class:`ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


@dataclass
class _Pool:
    spec: ModelSpec
    ready: list[Any] = field(default_factory=list)  # idle between run calls
    loading: dict[Any, Any] = field(default_factory=dict)  # identity() ref -> actor
    pids: dict[Any, int] = field(default_factory=dict)  # ready actor -> its process id


class RayExecutor:
    """Executor that computes units on Ray actors (see the module docstring).

    ``spec``: the model the workers load; by default the driver's model, reloaded by name
    (on ``cuda`` when ``gpus_per_worker`` > 0). The actors live from the first :meth:`run`
    until :meth:`close` (also a context manager) and serve every ``run`` with the same spec
    (all the stages of ``knowloc reproduce``).
    """

    def __init__(self, config: RayConfig | None = None, spec: ModelSpec | None = None) -> None:
        self.ray = import_ray()
        self.config = (config or RayConfig()).validate()
        self.spec = spec
        self._actor_class = self.ray.remote(Worker)
        self._pool: _Pool | None = None
        self._started_ray = False
        self._calls = 0  # numbers the run calls: a worker's setup state is per call
        self._had_host = False  # a live node could host a worker once (then lost: an error)

    # ------------------------------------------------------------------ cluster and actors
    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        cfg = self.config
        if cfg.address is not None:
            log.info("connecting to the Ray cluster at %s", cfg.address)
            ray.init(address=cfg.address)
        else:
            cpus = max(os.cpu_count() or 1, (cfg.workers or 1) * (cfg.threads_per_worker or 1))
            log.info("starting a local Ray instance with %d CPUs", cpus)
            ray.init(num_cpus=cpus, include_dashboard=False)
        self._started_ray = True

    def _sizes(self) -> tuple[int, int]:
        """(workers, threads per worker) on the cluster this process is connected to."""
        cfg = self.config
        resources = self.ray.cluster_resources()
        if cfg.gpus_per_worker > 0:
            gpus = resources.get("GPU", 0)
            workers = cfg.workers or int(gpus // cfg.gpus_per_worker)
            if workers < 1:
                raise ConfigError(f"the Ray cluster has {gpus:g} GPUs: not enough for one worker "
                                  f"at --gpus-per-worker {cfg.gpus_per_worker:g}")
            return workers, cfg.threads_per_worker or 1
        cpus = int(resources.get("CPU", 1))
        local = self._started_ray and cfg.address is None  # a machine of our own: split it
        threads = cfg.threads_per_worker or (max(1, cpus // cfg.workers) if cfg.workers and local
                                             else 1)
        return cfg.workers or max(1, cpus // threads), threads

    def _new_actor(self, spec: ModelSpec, threads: int) -> Any:
        options = {"num_cpus": threads, "num_gpus": self.config.gpus_per_worker,
                   "max_restarts": 0, "max_task_retries": 0}
        return self._actor_class.options(**options).remote(spec, threads)

    def close(self) -> None:
        """Kill the actors; shut Ray down if this executor started or joined it."""
        self._kill_pool()
        if self._started_ray and self.ray.is_initialized():
            self.ray.shutdown()  # a cluster we only joined keeps running
        self._started_ray = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kill_pool(self) -> None:
        if self._pool is not None:
            for actor in [*self._pool.ready, *self._pool.loading.values()]:
                self.ray.kill(actor)
            self._pool = None

    def worker_pids(self) -> list[int]:
        """The process ids of the workers that have loaded their model (for monitoring)."""
        return list(self._pool.pids.values()) if self._pool is not None else []

    # ------------------------------------------------------------------ run
    def run(self, compute: Compute, model: Model, payloads: Sequence[Any], *,
            setup: Setup | None = None) -> Iterator[tuple[int, Tables]]:
        """Compute every payload on the workers; yield ``(index, tables)`` as each finishes.

        ``setup``: the stage's per-worker state, built by each worker on its first unit of
        this call and dropped at its end (:mod:`knowloc.pipeline.units`). A unit whose worker
        dies is resubmitted to another worker (a new actor replaces the dead one) up to
        ``max_retries`` times, then :class:`RunError`; when no live node can host a worker
        for ``node_wait_s``, :class:`~knowloc.pipeline.units.WorkersLost`. An exception raised
        by ``compute`` itself is re-raised at once. On any exception, and on Ctrl-C, the
        actors are killed before it propagates.
        """
        if not payloads:
            return
        if model is None:  # a stage without a model (consistency): nothing to spread
            yield from LocalExecutor().run(compute, model, payloads, setup=setup)
            return
        self._connect()
        spec = self.spec or ModelSpec.of(
            model, device="cuda" if self.config.gpus_per_worker > 0 else None
        )
        self._calls += 1
        finished = False
        try:
            yield from self._run(compute, list(payloads), spec, model_fingerprint(model),
                                 model.weights_identity()["sha256"], setup, self._calls)
            finished = True
        finally:
            if not finished:  # an error, Ctrl-C, or the caller stopped early
                self._kill_pool()
            elif setup is not None and self._pool is not None:
                for actor in self._pool.ready:  # the call's state is not needed any more
                    actor.release.remote()

    def _hosts(self, threads: int) -> int:
        """How many live nodes of the cluster could host one worker (by their total CPUs and
        GPUs: a busy node frees its resources in time, a dead one never)."""
        gpus = self.config.gpus_per_worker
        return sum(1 for node in self.ray.nodes()
                   if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) >= threads
                   and node.get("Resources", {}).get("GPU", 0) >= gpus)

    def _run(self, compute: Compute, payloads: list[Any], spec: ModelSpec,
             identity: dict[str, Any], weights: str, setup: Setup | None,
             call: int) -> Iterator[tuple[int, Tables]]:
        ray = self.ray
        lost = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.OutOfMemoryError, ray.exceptions.NodeDiedError)
        workers, threads = self._sizes()
        if self._pool is not None and self._pool.spec != spec:
            self._kill_pool()
        if self._pool is None:
            self._pool = _Pool(spec)
            log.info("starting %d Ray workers (%d thread(s), %g GPU(s) each) for %s",
                     workers, threads, self.config.gpus_per_worker, spec.name_or_path)
        pool = self._pool
        idle: deque[Any] = deque(pool.ready)
        # ref -> (actor, unit index), or (actor, None) for an actor still loading its model
        pending: dict[Any, tuple[Any, int | None]] = {
            ref: (actor, None) for ref, actor in pool.loading.items()
        }

        def start_actor() -> None:
            actor = self._new_actor(spec, threads)
            ref = actor.identity.remote()
            pool.loading[ref] = actor
            pending[ref] = (actor, None)

        for _ in range(workers - len(pool.ready) - len(pool.loading)):
            start_actor()
        queue: deque[int] = deque(range(len(payloads)))
        deaths = [0] * len(payloads)
        load_failures = 0
        remaining = len(payloads)

        def dispatch() -> None:
            while idle and queue:
                actor, i = idle.popleft(), queue.popleft()
                pending[actor.run.remote(compute, payloads[i], setup, call)] = (actor, i)

        no_host_since: float | None = None  # since when no live node can host a worker
        if not self._had_host:
            self._had_host = self._hosts(threads) > 0
        while remaining:
            dispatch()
            if not pending:
                raise RunError("no Ray worker is left to compute the remaining units")
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.config.poll_s)
            if not ready:
                hosts = self._hosts(threads)
                self._had_host = self._had_host or hosts > 0
                if hosts or not self._had_host:  # never had one: an autoscaler may add one
                    no_host_since = None
                    continue
                now = time.monotonic()
                if no_host_since is None:
                    no_host_since = now
                    log.warning("no live node of the Ray cluster can host a worker; waiting "
                                "up to %g s for one", self.config.node_wait_s)
                if now - no_host_since >= self.config.node_wait_s:
                    raise WorkersLost(
                        f"the Ray cluster has had no live node that can host a worker "
                        f"({threads} CPU(s), {self.config.gpus_per_worker:g} GPU(s)) for "
                        f"{self.config.node_wait_s:g} s: its nodes died (a raylet killed, a "
                        f"machine lost)")
                continue
            no_host_since = None
            [ref] = ready
            actor, i = pending.pop(ref)
            pool.loading.pop(ref, None)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # compute raised: no retry
                if isinstance(exc.cause, KnowlocError):
                    raise exc.cause from None  # a user error keeps its one-line message
                raise
            except lost as exc:
                self.ray.kill(actor)  # in case it is only unreachable: it gets nothing more
                if actor in pool.ready:
                    pool.ready.remove(actor)
                    pool.pids.pop(actor, None)
                if i is None and exc.actor_init_failed:  # load_model raised: no retry
                    raise ModelError(f"a Ray worker cannot load {spec.name_or_path}: "
                                     f"{_last_line(exc)}") from None
                if i is None:
                    load_failures += 1
                    log.warning("a Ray worker died while loading %s: %s",
                                spec.name_or_path, _first_line(exc))
                    if load_failures > self.config.max_retries:
                        raise RunError(f"Ray workers keep dying while loading "
                                       f"{spec.name_or_path}: {_first_line(exc)}") from exc
                else:
                    deaths[i] += 1
                    name = f"{i + 1} of {len(payloads)} ({type(payloads[i]).__name__})"
                    if deaths[i] > self.config.max_retries:
                        raise RunError(f"unit {name}: its Ray worker died {deaths[i]} times; "
                                       f"last: {_first_line(exc)}") from exc
                    log.warning("Ray worker died computing unit %s (%s); resubmitting it",
                                name, _first_line(exc))
                    queue.appendleft(i)
                start_actor()
                continue
            if i is None:  # a new actor has loaded its model
                got, got_weights, pid, n_threads = result
                if got != identity:
                    raise ConfigError(f"a Ray worker loaded {spec.name_or_path} as {got}, but the "
                                      f"driver's model is {identity}; the units' keys would lie")
                if got_weights != weights:
                    raise RunError(
                        f"a Ray worker loaded {spec.name_or_path} with weights "
                        f"{got_weights[:12]}, but the driver's model has weights {weights[:12]}; "
                        f"give every node the driver's weight files under that name, or run "
                        f"with --executor local")
                log.debug("Ray worker pid %d ready (%d threads)", pid, n_threads)
                pool.ready.append(actor)
                pool.pids[actor] = pid
                idle.append(actor)
            else:
                remaining -= 1
                idle.append(actor)
                dispatch()  # keep the workers busy while the caller writes this unit
                yield i, result


def make_executor(kind: str = "local", *, address: str | None = None, workers: int | None = None,
                  gpus_per_worker: float | None = None,
                  threads_per_worker: int | None = None) -> Executor:
    """The executor named ``kind``: ``local`` (this process, units in order) or ``ray``
    (:class:`RayExecutor` with these options; they apply to ``ray`` only).

    Without Ray installed, ``ray`` is a :class:`ConfigError` saying how to install it, raised
    here, before any model is loaded.
    """
    if kind not in EXECUTORS:
        raise ConfigError(f"unknown executor {kind!r}; choose from {', '.join(EXECUTORS)}")
    ray_only = {"--ray-address": address, "--workers": workers,
                "--gpus-per-worker": gpus_per_worker, "--threads-per-worker": threads_per_worker}
    if kind == "local":
        given = [name for name, value in ray_only.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to --executor ray")
        return LocalExecutor()
    return RayExecutor(RayConfig(address=address, workers=workers,
                                 gpus_per_worker=gpus_per_worker or 0,
                                 threads_per_worker=threads_per_worker))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _last_line(exc: BaseException) -> str:
    """The last line of a remote traceback: ``module.Error: message``."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
