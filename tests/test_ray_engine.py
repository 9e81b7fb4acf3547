"""``label --engine ray`` (issue 25): one Ray task per shard gives the bytes of one process, a worker killed
mid-shard is run again by Ray (or by running the same command), and without Ray the engine is refused in one line.

The tests that need Ray share one local Ray instance (2 CPUs) per module; the CLI runs in subprocesses that reach
it through ``--ray-address``, so each run is a Ray job of its own, as on a real cluster.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_parts import ENV, _cli, assert_same_set, inputs, label_args  # noqa: F401 (the fixture)
from transferset.format.parts import part_lock_name

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install 'transferset[ray]')")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance for this module (2 CPUs, no dashboard): its address. The tests' drivers read
    RAY_AUTH_MODE from the environment while it runs (:func:`_popen`)."""
    import ray

    environ = dict(os.environ)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        os.environ.clear()  # Ray sets RAY_AUTH_MODE, PYTHONBREAKPOINT, ... here: not for the tests after these
        os.environ.update(environ)


@pytest.fixture(scope="module")
def slow_shards(inputs, tmp_path_factory):
    """The same teachers over 2,400 rows (4,800 with the view), 4 shards of 1,200: long enough to be caught writing."""
    work = tmp_path_factory.mktemp("ray")
    rng = np.random.default_rng(1)
    np.save(work / "x.npy", rng.integers(0, 256, size=(2400, 8, 8), dtype=np.uint8))
    np.save(work / "y.npy", rng.integers(0, 5, size=2400))
    for name in ("t0.onnx", "t1.onnx"):
        (work / name).write_bytes((inputs[0] / name).read_bytes())
    ref = work / "one"
    assert _cli(label_args(work, ref, "--shard-size", "1200")) == 0
    return work, ref


@needs_ray
def test_ray_tasks_write_the_bytes_of_one_process(cluster, inputs, tmp_path):
    work, _ = inputs
    ref, out = tmp_path / "one", tmp_path / "ray"
    assert _cli(label_args(work, ref, "--shard-size", "150")) == 0  # 4 shards: 4 tasks
    p = _popen(label_args(work, out, "--shard-size", "150", "--engine", "ray", "--ray-address", cluster))
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-3000:]
    assert "4 Ray task(s)" in stdout and "the set is complete: 600 rows in 4 shards" in stdout, stdout
    assert_same_set(ref, out)
    # in a process that started Ray itself, the engine uses that instance and leaves it running
    import ray

    assert _cli(label_args(work, tmp_path / "here", "--shard-size", "150", "--engine", "ray")) == 0
    assert ray.is_initialized()
    assert_same_set(ref, tmp_path / "here")


def _kill_mid_shard(out: Path, driver: subprocess.Popen, shards: int) -> str:
    """SIGKILL the Ray worker writing a shard of ``out``: frozen first (SIGSTOP), then killed only if its shard's
    temporary file is still there, so the kill surely lands mid-shard. The shard's name."""
    def state(p: Path) -> tuple:
        st = p.stat()
        return p.name, st.st_ino, st.st_ctime_ns, st.st_size

    stale = {state(p) for p in out.glob(".tmp-shard-*.h5")}  # debris of a run killed before: nobody writes it
    deadline = time.monotonic() + 120
    while driver.poll() is None and time.monotonic() < deadline:
        for tmp in sorted(out.glob(".tmp-shard-*.h5")):
            k = int(tmp.name.removeprefix(".tmp-shard-").removesuffix(".h5"))
            try:
                pid = int((out / part_lock_name(k + 1, shards)).read_text())
                if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                    continue
                os.kill(pid, signal.SIGSTOP)
            except (OSError, ValueError):  # the lock just rewritten, or the worker gone
                continue
            try:
                mid_shard = state(tmp) not in stale
            except OSError:
                mid_shard = False
            if mid_shard:
                os.kill(pid, signal.SIGKILL)
                return tmp.name
            os.kill(pid, signal.SIGCONT)  # it renamed its shard before it stopped, or had not begun: not mid-shard
        time.sleep(0.002)
    raise AssertionError(f"no shard of {out} was caught being written")


def _popen(args: list[str]) -> subprocess.Popen:
    """The CLI as a Ray driver of its own; RAY_AUTH_MODE as the cluster was started with (Ray enables token
    authentication on the clusters it starts, and a driver given an address must be told)."""
    env = {**ENV, **{k: v for k, v in os.environ.items() if k.startswith("RAY_")}}
    return subprocess.Popen([sys.executable, "-m", "transferset", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@needs_ray
def test_a_worker_killed_mid_shard_is_run_again(cluster, slow_shards, tmp_path):
    work, ref = slow_shards
    out = tmp_path / "ray"
    args = label_args(work, out, "--shard-size", "1200", "--engine", "ray", "--ray-address", cluster)
    # no retries: the run stops with one line; what was listed stays
    p = _popen(args + ["--ray-retries", "0"])
    _kill_mid_shard(out, p, 4)
    stdout, stderr = p.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert p.returncode == 1 and "1 of 4 Ray task(s) failed: shard " in lines[-1], stderr[-3000:]
    assert "(after 0 retries); the other shards are listed: run the same command" in lines[-1], lines[-1]
    assert not (out / "manifest.json").exists()
    # the same command with retries: a kill mid-shard again, Ray runs that task again, the folder is one process's
    p = _popen(args + ["--ray-retries", "2"])
    _kill_mid_shard(out, p, 4)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0 and "the set is complete: 4800 rows in 4 shards" in stdout.replace(",", ""), \
        stdout + stderr[-3000:]
    assert_same_set(ref, out)


def test_ray_engine_without_ray_names_the_extra(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as on a core install
    work, _ = inputs
    assert _cli(label_args(work, tmp_path / "ts", "--engine", "ray")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'transferset[ray]'" in err[0], err
    assert not (tmp_path / "ts").exists() or not any((tmp_path / "ts").iterdir())
