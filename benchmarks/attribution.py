"""Benchmark: knowloc's IG engine against the one-layer-at-a-time loop of existing tools.

Usage::

    python benchmarks/attribution.py                      # both models, all engines, 3 repeats
    python benchmarks/attribution.py --repeats 5 --json runs/bench_attribution.json
    python benchmarks/attribution.py --models gpt2-small-random --engines knowloc loop

One ParaRel-style query, IG with 20 steps over all layers, measured side by side:

* ``knowloc``  -- ``knowloc.attribute(model, query, "ig")`` with its defaults (cached prefix,
  last token only, layers x steps batched in memory-budgeted chunks, fused target head);
* ``loop``     -- the per-layer full-sequence loop that existing tools run: for each layer one
  batch of all steps (the prompt repeated ``steps`` times), a forward pre-hook on the down
  projection that swaps in the scaled activation at the last position, the model called as
  a Hugging Face causal LM with logits only at the last position (``logits_to_keep=1``),
  P(target) by softmax, ``torch.autograd.grad`` w.r.t. the scaled activations, weights
  frozen;
* ``loop-tuned`` -- the same loop made faster than existing tools make it, as a stricter
  control: the base model without its head, then the head on the contiguous last hidden
  state. On CPU, ``logits_to_keep=1`` hands the head a strided [steps, 1, d] slice, which
  PyTorch runs as a batched matrix-vector product against a broadcast [steps, d, vocab]
  weight (``aten::bmm``): ~270 ms per layer on GPT-2 instead of ~25 ms for one GEMM;
* ``knowledge-neurons`` -- EleutherAI's ``knowledge-neurons==0.0.2`` (optional). It is not
  installed into the environment: install it beside it with
  ``pip install --no-deps --target /tmp/kn_site knowledge-neurons==0.0.2`` (``--kn-site``).
  It hooks the *output* of the up/gate projection (``mlp.c_fc`` for GPT-2, here
  ``mlp.up_proj`` for Gemma), not the input of the down projection, which is the wrong
  neuron site (docs/methods.md §0), and integrates over alpha = linspace(0, 1, steps); its scores
  are therefore not comparable with the other two -- only its time is. Where it is not
  installed it is reported as skipped and the other engines run as usual (exit status 0).

Models: the embedded Gemma 3 270M (``load_model("gemma3-270m")``) and a GPT-2-small config
with random weights (``GPT2Config()`` defaults: 12 layers, d_model 768, vocab 50257, seeded),
queried through the word-level tokenizer of ``tests/tiny.py`` (its ids fit GPT-2's vocab;
any tokenizer does for timing).

Every (model, engine) pair runs in its own subprocess (``--worker MODEL ENGINE``), which loads
the model and makes one warm-up run. The timed runs are interleaved: in each of ``--repeats``
rounds every engine runs once (rotating the order), the others idle meanwhile, so that all
engines see the same drift of this machine's speed (it drifts by +-20% over minutes here).
Times are medians over rounds; a ratio is the median over rounds of the paired ratio.
Memory: ``ru_maxrss`` of the worker (its peak RSS, model loading included) and its RSS right
after loading the model, so that peak - model is what the attribution itself needed (a lower bound when loading peaked
higher than attribution; the load peak is recorded too). The parent checks that knowloc and
both loops agree (max |a - b| / max |b| over the [layers, d_mlp] map, below
``AGREEMENT_TOL``). The line per model ends in ``ratio <N>x``, the loop's time over
knowloc's; the tuned loop's ratio is on the same line.

This is a benchmark, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from knowloc.models.forward import prompt_activations

REPO = Path(__file__).resolve().parents[1]
MODELS = ("gemma3-270m", "gpt2-small-random")
ENGINES = ("knowloc", "loop", "loop-tuned", "knowledge-neurons")
ENGINE_LABELS = {
    "knowloc": "knowloc",
    "loop": "per-layer loop",
    "loop-tuned": "per-layer loop, tuned",
    "knowledge-neurons": "knowledge-neurons 0.0.2",
}
LOOPS = ("loop", "loop-tuned")  # checked against knowloc (same scores)
OPTIONAL_ENGINES = ("knowledge-neurons",)  # skipped, with a note, where not installed
QUERIES = {  # model -> (prompt, answer)
    "gemma3-270m": ("The official language of Brazil is", "Portuguese"),
    "gpt2-small-random": ("the official language of brazil is", "portuguese"),
}
# max relative difference allowed between knowloc's map and a loop's. The loop as tools call
# it is looser: its head backward is a float32 batched matrix-vector product summing over the
# whole vocabulary, measured 1.15e-4 off the float64 truth on Gemma (knowloc 3.0e-6, the tuned
# loop 2.0e-6), so the two float32 maps differ by ~1.2e-4 there.
AGREEMENT_TOL = {"loop": 1e-3, "loop-tuned": 1e-4}
DEFAULT_KN_SITE = Path("/tmp/kn_site")
GIB = 2**30


# ----------------------------------------------------------------------------- memory
def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def current_rss_bytes() -> int:
    """Current resident set size (``/proc/self/statm``; falls back to the peak elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def system_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have been busy (``/proc/stat``), or None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- models
def build_model(name: str) -> Any:
    """A knowloc ``Model`` (frozen, eval, float32, CPU) for one benchmark model name."""
    import torch

    from knowloc import load_model
    from knowloc.models import wrap

    if name == "gemma3-270m":
        return load_model("gemma3-270m")
    if name == "gpt2-small-random":
        from transformers import AutoModelForCausalLM, GPT2Config

        sys.path.insert(0, str(REPO / "tests"))
        from tiny import make_tokenizer  # word-level tokenizer of the test suite

        torch.manual_seed(0)  # both workers of a model must build the same weights
        hf = AutoModelForCausalLM.from_config(GPT2Config(), dtype=torch.float32)
        hf.eval()
        return wrap(hf, make_tokenizer(bos=False), name=name)
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


# ------------------------------------------------------------------ baseline: per-layer loop
def loop_attribute(model: Any, prompt: str, answer: str, n_steps: int, tuned: bool = False) -> Any:
    """IG scores [n_layers, d_mlp] by the one-layer-at-a-time full-sequence loop.

    Same quantity as ``knowloc.attribute(..., "ig")``: Attr(l, p) = a_lp * (1/m) *
    sum_{k=1..m} dP(alpha_k a_l)/da_lp, alpha_k = k/m, P the softmax probability of the
    target at the last position. ``tuned=False`` calls the model as existing tools do (the
    causal LM with ``logits_to_keep=1``); ``tuned=True`` runs the base model and the head on
    the contiguous last hidden state instead (same numbers, a faster head on CPU).
    """
    import torch

    ids = torch.tensor([model.encode_prompt(prompt)], device=model.device)
    target = model.answer_ids(prompt, answer)[0]
    work = torch.promote_types(model.dtype, torch.float32)  # float32, or float64 for a check
    acts = prompt_activations(model, ids[0]).to(work)  # [L, D], one no-grad forward
    batch = ids.repeat(n_steps, 1)  # the prompt repeated once per integration step
    alphas = torch.arange(1, n_steps + 1, dtype=work, device=model.device) / n_steps
    base, head, cap = model.base_model(), model.unembedding(), model.logit_softcap()
    scores = torch.empty(model.n_layers, model.d_mlp, dtype=work)

    for layer in range(model.n_layers):
        scaled = (alphas[:, None] * acts[layer][None, :]).to(model.dtype).requires_grad_(True)

        def patch(module: Any, args: tuple[Any, ...], x: Any = scaled) -> tuple[Any, ...]:
            h = args[0]  # [steps, seq, d_mlp]: replace the last position only
            return (torch.cat([h[:, :-1], x[:, None, :]], dim=1),) + tuple(args[1:])

        handle = model.down_proj(layer).register_forward_pre_hook(patch)
        try:
            with torch.enable_grad():
                if tuned:
                    out = base(input_ids=batch, use_cache=False)
                    hidden = out.last_hidden_state[:, -1].contiguous()
                    logits = head(hidden)
                    if cap:
                        logits = torch.tanh(logits / cap) * cap
                else:  # the causal LM applies its own soft-cap, if any
                    logits = model.hf(input_ids=batch, use_cache=False, logits_to_keep=1).logits[:, -1]
                if logits.dtype in (torch.float16, torch.bfloat16):
                    logits = logits.float()
                # softmax probability of the target, as exp(logit_t - logsumexp): in float32,
                # torch.softmax over Gemma's 262k vocab then [:, t] is ~7e-5 (relative) off the
                # float64 result at p_t ~ 0.9, this form ~2e-6
                p_target = torch.exp(logits[:, target] - torch.logsumexp(logits, dim=-1))
                (grad,) = torch.autograd.grad(p_target.sum(), scaled)
        finally:
            handle.remove()
        scores[layer] = (acts[layer] * grad.to(work).sum(0) / n_steps).cpu()
    return scores


# ------------------------------------------------------------- optional: knowledge-neurons
def skip_reason(engine: str, kn_site: Path) -> str | None:
    """Why ``engine`` cannot run on this machine (an optional engine that is not installed),
    or None when it can. Checked before any worker starts, so an absent engine costs nothing."""
    if engine == "knowledge-neurons" and not (kn_site / "knowledge_neurons").is_dir():
        return (
            f"not installed under {kn_site}; to include it: pip install --no-deps --target "
            f"{kn_site} knowledge-neurons==0.0.2"
        )
    return None


def _install_einops_shim() -> None:
    """knowledge-neurons imports einops (not a knowloc dependency) only for
    ``repeat(x, "b d -> (r b) d", r=n)``, i.e. ``x.repeat(n, 1)``; provide just that."""
    try:
        import einops  # noqa: F401
    except ImportError:
        shim = types.ModuleType("einops")

        def repeat(x: Any, pattern: str, **axes: int) -> Any:
            if pattern.replace(" ", "") != "bd->(rb)d":
                raise NotImplementedError(f"einops shim: pattern {pattern!r}")
            return x.repeat(axes["r"], 1)

        shim.repeat = repeat  # type: ignore[attr-defined]
        sys.modules["einops"] = shim


def knowledge_neurons_runner(
    model: Any, prompt: str, answer: str, n_steps: int, kn_site: Path
) -> Callable[[], Any]:
    """A closure running ``KnowledgeNeurons.get_scores`` (knowledge-neurons 0.0.2).

    Adapted, not fixed: in ``model_type="gpt"`` mode it targets
    ``tokenizer.encode(answer)``, i.e. for Gemma ``[BOS, "Portuguese" without its leading
    space]``, and runs one full per-layer sweep per target token with BOS as the first
    target. ``_prepare_inputs`` is patched to target the gold first token (knowloc's
    ``target_id``, one sweep). Layer/MLP paths are overridden for Gemma. The hooked site --
    the output of ``up_proj`` (``c_fc`` for GPT-2) -- is left as the package has it, and it is
    the wrong one (docs/methods.md §0): the scores are not comparable, only the time.
    """
    reason = skip_reason("knowledge-neurons", kn_site)
    if reason is not None:
        raise RuntimeError(f"knowledge-neurons {reason}")
    _install_einops_shim()
    sys.path.insert(0, str(kn_site))
    from knowledge_neurons import KnowledgeNeurons  # type: ignore[import-not-found]

    target_id = model.answer_ids(prompt, answer)[0]

    class PatchedKnowledgeNeurons(KnowledgeNeurons):  # type: ignore[misc]
        def _prepare_inputs(self, prompt: str, target: Any = None, encoded_input: Any = None):
            encoded_input, mask_idx, _ = super()._prepare_inputs(prompt, None, encoded_input)
            return encoded_input, mask_idx, (None if target is None else [target_id])

    kn = PatchedKnowledgeNeurons(model.hf, model.tokenizer, model_type="gpt", device="cpu")
    if model.adapter.name == "gemma3":
        kn.transformer_layers_attr = "model.layers"
        kn.input_ff_attr = "mlp.up_proj"  # output of up_proj: the package's (wrong) site
        kn.output_ff_attr = "mlp.down_proj.weight"
        kn.word_embeddings_attr = "model.embed_tokens.weight"
    elif model.adapter.name != "gpt2":
        raise RuntimeError(f"no knowledge-neurons mapping for {model.adapter.name}")

    def run() -> Any:
        # batch_size = steps: one batch of all steps per layer, like the loop (package default 10)
        return kn.get_scores(prompt, answer, batch_size=n_steps, steps=n_steps, pbar=False)

    return run


# ----------------------------------------------------------------------------- worker
def make_runner(model: Any, model_name: str, engine: str, n_steps: int, kn_site: Path) -> Callable[[], Any]:
    """A closure computing one query's [n_layers, d_mlp] map with ``engine``."""
    from knowloc import attribute

    prompt, answer = QUERIES[model_name]
    if engine == "knowloc":
        return lambda: attribute(model, (prompt, answer), "ig", n_steps=n_steps, progress=False).scores
    if engine in LOOPS:
        return lambda: loop_attribute(model, prompt, answer, n_steps, tuned=engine == "loop-tuned")
    if engine == "knowledge-neurons":
        return knowledge_neurons_runner(model, prompt, answer, n_steps, kn_site)
    raise SystemExit(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")


def _emit(rec: dict[str, Any]) -> None:
    print(json.dumps(rec), flush=True)


def serve(model_name: str, engine: str, n_steps: int, scores_out: Path | None, kn_site: Path) -> None:
    """Worker process: load the model, warm up, then time one run per ``run`` line read from
    stdin (one JSON line each) until ``done``, which saves the scores and reports memory."""
    import torch

    try:
        model = build_model(model_name)
        rss_model, peak_after_load = current_rss_bytes(), peak_rss_bytes()
        run = make_runner(model, model_name, engine, n_steps, kn_site)
        scores = run()  # warm-up
    except Exception as exc:  # noqa: BLE001 - reported to the parent, not raised
        _emit({"status": "failed", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]})
        return
    _emit({"status": "ready"})
    for line in sys.stdin:
        if line.strip() != "run":
            break
        gc.collect()
        busy0, c0, t0 = system_busy_seconds(), time.process_time(), time.perf_counter()
        scores = run()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        busy1 = system_busy_seconds()
        other = None  # share of the machine's CPU used by *other* processes meanwhile
        if busy0 is not None and busy1 is not None:
            other = max(0.0, (busy1 - busy0) - cpu) / (wall * (os.cpu_count() or 1))
        _emit({"seconds": wall, "cpu_seconds": cpu, "other_cpu_load": other})
    if scores_out is not None:
        np.save(scores_out, scores.detach().float().cpu().numpy())
    _emit(
        {
            "status": "ok",
            "peak_rss_bytes": peak_rss_bytes(),
            "model_rss_bytes": rss_model,
            "load_peak_rss_bytes": peak_after_load,
            "n_layers": model.n_layers,
            "d_mlp": model.d_mlp,
            "seq_len": len(model.encode_prompt(QUERIES[model_name][0])),
            "n_steps": n_steps,
            "torch_threads": torch.get_num_threads(),
        }
    )


# ----------------------------------------------------------------------------- parent
@dataclass
class Result:
    model: str
    engine: str
    status: str
    reason: str | None = None
    seconds: float | None = None
    times: list[float] = field(default_factory=list)
    peak_rss_bytes: int | None = None
    model_rss_bytes: int | None = None
    load_peak_rss_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return (self.peak_rss_bytes or 0) / GIB

    @property
    def model_gib(self) -> float:
        return (self.model_rss_bytes or 0) / GIB

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def not_run(self) -> str:
        """``skipped (why)`` for an absent optional engine, ``not run (why)`` for a failure."""
        return f"{'skipped' if self.status == 'skipped' else 'not run'} ({self.reason})"


class Worker:
    """One (model, engine) worker process, driven line by line."""

    def __init__(self, model: str, engine: str, args: argparse.Namespace, scores_out: Path | None):
        self.model, self.engine, self.timeout = model, engine, args.timeout
        self.result = Result(model, engine, "running")
        self.cpu_times: list[float] = []
        self.loads: list[float] = []
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--worker", model, engine,
            "--steps", str(args.steps), "--kn-site", str(args.kn_site),
        ]  # fmt: skip
        if scores_out is not None:
            cmd += ["--scores-out", str(scores_out)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        print(f"  loading {model} / {engine} ...", file=sys.stderr, flush=True)
        # lives as long as the worker; its last line explains a crash
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            text=True, env=env,
        )  # fmt: skip
        rec = self._read()
        if rec is not None and rec.get("status") != "ready":
            self._fail(rec.get("reason", "worker failed"))

    @property
    def alive(self) -> bool:
        return self.result.status == "running"

    def _fail(self, reason: str) -> None:
        self.result.status, self.result.reason = "failed", reason
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()

    def _read(self) -> dict[str, Any] | None:
        """The worker's next JSON line (other output is skipped), or None after failing it.
        A watchdog kills a worker that stays silent for ``--timeout`` seconds."""
        assert self.proc.stdout is not None
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            self.proc.kill()

        watchdog = threading.Timer(self.timeout, kill)
        watchdog.start()
        try:
            while line := self.proc.stdout.readline():
                if line.startswith("{"):
                    return json.loads(line)
        finally:
            watchdog.cancel()
        if fired.is_set():
            self._fail(f"timed out after {self.timeout} s")
        else:
            self.stderr.seek(0)
            tail = (self.stderr.read().strip().splitlines() or ["no output"])[-1]
            self._fail(f"worker exit {self.proc.wait()}: {tail}")
        return None

    def _send(self, line: str) -> bool:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._fail("worker exited")
            return False
        return True

    def time_once(self) -> None:
        if self.alive and self._send("run"):
            rec = self._read()
            if rec is not None:
                self.result.times.append(rec["seconds"])
                self.cpu_times.append(rec["cpu_seconds"])
                if rec["other_cpu_load"] is not None:
                    self.loads.append(rec["other_cpu_load"])

    def finish(self) -> Result:
        if self.alive and self._send("done"):
            rec = self._read()
            if rec is not None:
                keys = {"peak_rss_bytes", "model_rss_bytes", "load_peak_rss_bytes"}
                for k in keys:
                    setattr(self.result, k, rec.get(k))
                self.result.status = "ok"
                self.result.seconds = statistics.median(self.result.times)
                self.result.extra = {k: v for k, v in rec.items() if k not in keys | {"status"}}
                self.result.extra["cpu_seconds"] = statistics.median(self.cpu_times)
                self.result.extra["cpu_times"] = self.cpu_times
                self.result.extra["other_cpu_load"] = max(self.loads) if self.loads else None
                self.proc.wait()
                self.stderr.close()
        return self.result


def measure(model: str, args: argparse.Namespace, tmp: Path) -> tuple[list[Result], dict[str, Path]]:
    """All engines of one model, timed in interleaved rounds: every round runs each engine
    once (in a rotating order), so that all engines see the same drift of the machine's
    speed. The workers load one after another and wait, idle, while another one runs.
    An optional engine that is not installed gets a ``skipped`` result and no worker."""
    paths = {e: tmp / f"{model}-{e}.npy" for e in args.engines if e in ("knowloc", *LOOPS)}
    skipped: dict[str, Result] = {}
    for e in args.engines:
        reason = skip_reason(e, args.kn_site)
        if reason is not None:
            print(f"  skipping {model} / {e}: {reason}", file=sys.stderr, flush=True)
            skipped[e] = Result(model, e, "skipped", reason)
    workers = [Worker(model, e, args, paths.get(e)) for e in args.engines if e not in skipped]
    for r in range(args.repeats if workers else 0):
        print(f"  {model}: round {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
        order = workers[r % len(workers) :] + workers[: r % len(workers)]
        for w in order:
            w.time_once()
    finished = {w.engine: w.finish() for w in workers}
    results = [skipped[e] if e in skipped else finished[e] for e in args.engines]
    ok = {r.engine for r in results if r.ok}
    return results, {e: path for e, path in paths.items() if e in ok}


def max_relative_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| over the whole map (elementwise ratios blow up near zero)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a64 - b64).max() / max(np.abs(b64).max(), np.finfo(np.float64).tiny))


def paired_ratio(slow: Result, fast: Result) -> float:
    """Median over rounds of slow/fast (the same round: the same state of the machine)."""
    return statistics.median(a / b for a, b in zip(slow.times, fast.times))


def fmt_s(x: float | None) -> str:
    return "-" if x is None else (f"{x:.2f}" if x < 10 else f"{x:.1f}")


def report(
    results: list[Result], agreement: dict[str, float | None], args: argparse.Namespace
) -> None:
    print(
        f"\nIG attribution, {args.steps} steps, all layers, 1 query; median of {args.repeats} "
        f"runs after 1 warm-up; {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
    )
    head = (
        f"{'model':<19} {'engine':<24} {'s/query':>8}  {'runs (s)':<17} {'cpu s':>6} "
        f"{'other load':>10} {'peak GiB':>8} {'model GiB':>9} {'peak-model':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        if r.ok:
            runs = " ".join(fmt_s(t) for t in r.times)
            other = r.extra.get("other_cpu_load")
            other_s = "-" if other is None else f"{100 * other:.0f}%"
            print(
                f"{r.model:<19} {ENGINE_LABELS[r.engine]:<24} {fmt_s(r.seconds):>8}  {runs:<17} "
                f"{fmt_s(r.extra.get('cpu_seconds')):>6} {other_s:>10} "
                f"{r.peak_gib:>8.2f} {r.model_gib:>9.2f} {r.peak_gib - r.model_gib:>10.2f}"
            )
        else:
            print(f"{r.model:<19} {ENGINE_LABELS[r.engine]:<24} {'-':>8}  {r.not_run}")
    print(
        "s/query: median wall time; cpu s: median process CPU time per query; other load: share "
        "of the machine's CPU used by other processes while timing (timings are only "
        "trustworthy near 0%); peak: ru_maxrss of the worker; model: its RSS after loading"
    )
    print()
    for key, diff in agreement.items():
        model, engine = key.split("/")
        label = ENGINE_LABELS[engine]
        if diff is None:
            print(f"{model}: agreement knowloc vs {label}: not checked (a run failed)")
        else:
            tol = AGREEMENT_TOL[engine]
            verdict = "OK" if diff < tol else "MISMATCH"
            print(
                f"{model}: agreement knowloc vs {label}: max rel diff {diff:.2e} "
                f"(tol {tol:.0e}) {verdict}"
            )
    print()
    by = {(r.model, r.engine): r for r in results}
    for model in dict.fromkeys(r.model for r in results):
        ours, loop, tuned, kn = (
            by.get((model, "knowloc")),
            by.get((model, "loop")),
            by.get((model, "loop-tuned")),
            by.get((model, "knowledge-neurons")),
        )
        ours_ok = ours is not None and ours.ok
        parts = []
        for r in (ours, tuned, loop):
            if r is None:
                continue
            label = ENGINE_LABELS[r.engine]
            if not r.ok:
                parts.append(f"{label} {r.not_run}")
                continue
            part = f"{label} {fmt_s(r.seconds)} s/query (peak {r.peak_gib:.1f} GiB)"
            if r is tuned and ours_ok:
                part += f", {paired_ratio(r, ours):.1f}x knowloc"
            parts.append(part)
        if ours_ok and loop is not None and loop.ok:  # the measure: vs the loop tools run
            parts.append(f"ratio {paired_ratio(loop, ours):.1f}x")
        print(f"{model}: " + " | ".join(parts))
        if kn is not None:
            if kn.ok and ours is not None and ours.ok:
                print(
                    f"{model}: knowledge-neurons {fmt_s(kn.seconds)} s/query (peak "
                    f"{kn.peak_gib:.1f} GiB; scores not comparable: hooks the up-projection "
                    f"output) | ratio {paired_ratio(kn, ours):.1f}x"
                )
            elif kn.ok:
                print(
                    f"{model}: knowledge-neurons {fmt_s(kn.seconds)} s/query (peak {kn.peak_gib:.1f} GiB)"
                )
            else:
                print(f"{model}: knowledge-neurons {kn.not_run}")


def source_fingerprint() -> dict[str, str | None]:
    """Git commit and sha256 of the engine source measured (the working tree may be dirty)."""
    import hashlib

    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "HEAD"],
                check=False,
                capture_output=True,
                text=True,
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    src = REPO / "src" / "knowloc" / "attribution.py"
    digest = hashlib.sha256(src.read_bytes()).hexdigest() if src.exists() else None
    return {"git_commit": commit, "attribution_py_sha256": digest}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    ap.add_argument("--steps", type=int, default=20, help="IG integration steps")
    ap.add_argument("--json", type=Path, default=None, help="save the results to this file")
    ap.add_argument(
        "--kn-site",
        type=Path,
        default=DEFAULT_KN_SITE,
        help="--target directory holding knowledge-neurons==0.0.2",
    )
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per worker")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "ENGINE"), help=argparse.SUPPRESS)
    ap.add_argument("--scores-out", type=Path, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        model, engine = args.worker
        serve(model, engine, args.steps, args.scores_out, args.kn_site)
        return 0

    fingerprint = source_fingerprint()  # of the engine source as the workers start
    results: list[Result] = []
    agreement: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory(prefix="knowloc-bench-") as tmp:
        for model in args.models:
            res, paths = measure(model, args, Path(tmp))
            results += res
            for loop in LOOPS:
                if "knowloc" in args.engines and loop in args.engines:
                    agreement[f"{model}/{loop}"] = (
                        max_relative_diff(np.load(paths["knowloc"]), np.load(paths[loop]))
                        if "knowloc" in paths and loop in paths
                        else None
                    )
    report(results, agreement, args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "n_steps": args.steps,
            "repeats": args.repeats,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "knowloc_source": fingerprint,
            "agreement_max_rel_diff": agreement,
            "agreement_tol": AGREEMENT_TOL,
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nresults saved to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
