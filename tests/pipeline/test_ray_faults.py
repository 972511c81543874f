"""A Ray cluster that loses its only node mid-run (its raylet killed): the driver ends in
bounded time with one line naming how to resume, the finished units saved, and resuming
with the local executor finishes the run.

The cluster is a head node of its own (``ray start --head`` in a new session, a short
temporary directory); only the processes of that session are killed at the end.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow  # a cluster of its own, and Ray's node failure detection

NODE_WAIT_S = 5.0
BOUND_S = 120.0  # Ray notices the dead node in ~20 s, then NODE_WAIT_S


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Head:
    """A one-node Ray cluster started by ``ray start --head`` as the leader of a new session."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
        start = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
             "--node-ip-address=127.0.0.1", f"--port={self.port}", "--num-cpus=2",
             f"--temp-dir={tmp}", "--include-dashboard=false", "--disable-usage-stats"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.session = start.pid
        out, _ = start.communicate(timeout=180)
        assert start.returncode == 0, out[-2000:]
        self.address = f"127.0.0.1:{self.port}"

    def processes(self) -> list[psutil.Process]:
        """The cluster's processes (those of the session ``ray start`` led)."""
        found = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == self.session and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (psutil.Error, OSError):
                continue
        return found

    def workers(self) -> list[psutil.Process]:
        """The node's worker processes (``ray::Worker``, ``ray::IDLE``...)."""
        found = []
        for p in self.processes():
            try:
                if p.name().startswith("ray::") or " ".join(p.cmdline()).startswith("ray::"):
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def raylet(self) -> psutil.Process:
        (raylet,) = [p for p in self.processes() if p.name() == "raylet"]
        return raylet

    def stop(self) -> None:
        for p in self.processes():
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(self.processes(), timeout=30)


@pytest.fixture()
def head() -> Iterator[Head]:
    tmp = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))  # short: Ray's socket paths
    node = None
    try:
        node = Head(tmp)
        yield node
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# the knowloc command line, with a short wait for a live node (the default is a minute)
DRIVER = ("import functools, sys; import knowloc.pipeline.distributed as d; "
          f"d.RayConfig = functools.partial(d.RayConfig, node_wait_s={NODE_WAIT_S}, "
          "poll_s=0.5); from knowloc.cli import main; sys.argv[0] = 'knowloc'; "
          "sys.exit(main(sys.argv[1:]))")


def test_killed_raylet_ends_the_run_with_how_to_resume(head, tiny_dir, facts_file, tmp_path):
    run = tmp_path / "run"
    command = ["knowloc", "-q", "localize", "--model", str(tiny_dir), "--dataset",
               f"jsonl:{facts_file}", "--method", "ig,sig,amig", "--n-steps", "12",
               "--out", str(run)]
    ray_options = ["--executor", "ray", "--ray-address", head.address, "--workers", "1",
                   "--threads-per-worker", "1"]
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, *command[1:], *ray_options],
                              env=head.env, stderr=subprocess.PIPE, text=True)
    parts = run / "parts" / "queries"
    deadline = time.time() + 180
    while driver.poll() is None and time.time() < deadline:
        if parts.exists() and any(parts.glob("*.parquet")):
            break
        time.sleep(0.01)
    assert driver.poll() is None, f"the driver ended first: {driver.stderr.read()[-2000:]}"
    # the node goes: its raylet is killed, and its workers with it at once (Ray's workers
    # exit once they notice their raylet is gone; a fast run could otherwise finish on the
    # worker it already has before that)
    workers = head.workers()
    head.raylet().send_signal(signal.SIGKILL)
    for w in workers:
        try:
            w.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    killed = time.time()
    try:
        _, err = driver.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        driver.kill()
        pytest.fail(f"the driver still waits {BOUND_S:g} s after the raylet died: "
                    f"{driver.communicate()[1][-2000:]}")
    seconds = time.time() - killed
    assert driver.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("knowloc: error:")]
    assert len(errors) == 1 and errors[0] == err.rstrip("\n").splitlines()[-1], err[-3000:]
    line = errors[0]
    done = sorted(p.name for p in parts.glob("*.parquet"))
    total = 33 * 3
    assert 0 < len(done) < total
    local = [*command, "--executor", "local"]
    assert line.startswith("knowloc: error: localizing: the Ray cluster has had no live node "
                           f"that can host a worker (1 CPU(s), 0 GPU(s)) for {NODE_WAIT_S:g} s")
    assert (f"{total - len(done)} of {total} queries were not computed, the {len(done)} "
            f"finished ones are saved in {run}") in line
    assert f"resume on this machine with `{shlex.join(local)}`" in line
    assert f"or rerun `{shlex.join([*command, *ray_options])}` once the Ray cluster" in line
    print(f"the driver ended {seconds:.1f} s after the raylet was killed; "
          f"{len(done)} of {total} units were saved")

    mtimes = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    import torch

    from knowloc.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the run's workers had one thread (the run's thread rule)
    try:
        assert main(local[1:]) == 0
    finally:
        torch.set_num_threads(threads)
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")
            if p.name in mtimes} == mtimes  # the saved units were not computed again
    assert len(pd.read_parquet(run / "queries.parquet")) == total
