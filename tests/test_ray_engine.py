"""``label --engine ray`` (issue 25): one Ray task per shard gives the bytes of one process on a cluster of two
nodes, a worker killed mid-shard is run again by Ray (or by running the same command), tasks ask for GPUs and custom
resources, a request no node can hold and a node that does not see the folder are refused in one line, Ray Client
addresses work (or name the extra), and without Ray the engine is refused in one line.

The tests that need Ray share one cluster of two nodes on this machine per module (``ray.cluster_utils.Cluster``: a
head of 1 CPU, a second node of 1 CPU, 1 logical GPU and a resource only it has); the CLI runs in subprocesses
that reach it through ``--ray-address`` (each run a Ray job of its own, as on a real cluster), or in this process,
which is connected to it (the engine then uses that connection).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from test_parts import ENV, _cli, assert_same_set, inputs, label_args  # noqa: F401 (the fixture)
from transferset.format.parts import part_lock_name

HAVE_RAY = importlib.util.find_spec("ray") is not None
HAVE_CLIENT = importlib.util.find_spec("grpc") is not None  # Ray Client (ray://) needs ray[client]
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install 'transferset[ray]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine for this module: a head of 1 CPU and no GPU (with a Ray Client server when grpc
    is installed), and a second node of 1 CPU, 1 logical GPU and a resource ``second`` only it has. Its GCS
    ``address``, ``client`` address (``ray://...``, or None) and the ``nodes`` (``Cluster``); this process is
    connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    environ = dict(os.environ)
    head = {"num_cpus": 1, "num_gpus": 0, "include_dashboard": False}
    if HAVE_CLIENT:
        head["ray_client_server_port"] = _free_port()
    nodes = Cluster(initialize_head=True, head_node_args=head)
    try:
        nodes.add_node(num_cpus=1, num_gpus=1, resources={"second": 1})
        ray.init(address=nodes.address, log_to_driver=False, configure_logging=False)
        nodes.wait_for_nodes()
        client = f"ray://127.0.0.1:{head['ray_client_server_port']}" if HAVE_CLIENT else None
        yield SimpleNamespace(address=nodes.address, client=client, nodes=nodes)
    finally:
        ray.shutdown()
        nodes.shutdown()
        os.environ.clear()  # Ray sets RAY_AUTH_MODE, PYTHONBREAKPOINT, ... here: not for the tests after these
        os.environ.update(environ)


@pytest.fixture(scope="module")
def four_shards(inputs, tmp_path_factory):
    """The 600 rows of ``inputs`` in 4 shards of 150 (4 tasks), labelled by one process: ``(work, ref)``."""
    work, _ = inputs
    ref = tmp_path_factory.mktemp("ray4") / "one"
    assert _cli(label_args(work, ref, "--shard-size", "150")) == 0
    return work, ref


def _ray_args(work: Path, out: Path, *more: str) -> list[str]:
    return label_args(work, out, "--shard-size", "150", "--engine", "ray", *more)


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
def test_ray_tasks_write_the_bytes_of_one_process_on_two_nodes(cluster, four_shards, slow_shards, tmp_path, capsys):
    # shards of 1,200 rows: a task of 150 rows could end before the second node had started a worker, and Ray
    # then ran every task on the head, one after another (seen once in a suite run, after label's start-up got
    # 0.65 s shorter)
    work, ref = slow_shards
    out = tmp_path / "ray"
    p = _popen(label_args(work, out, "--shard-size", "1200", "--engine", "ray", "--ray-address", cluster.address))
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-3000:]
    # the head holds one task at a time: Ray sends the others to the second node
    assert "4 Ray task(s) in" in stdout and "on 2 nodes wrote" in stdout, stdout
    assert "the set is complete: 4800 rows in 4 shards" in stdout, stdout
    assert_same_set(ref, out)
    assert not list(out.glob(".ray-driver-*"))  # the driver's mark goes with it
    # in a process connected to Ray already, the engine uses that connection and leaves it; a custom resource only
    # the second node has sends every task there
    import ray

    work4, ref4 = four_shards
    capsys.readouterr()
    assert _cli(_ray_args(work4, tmp_path / "here", "--ray-resources", "second=1")) == 0
    assert "on 1 node wrote" in capsys.readouterr().out
    assert ray.is_initialized()
    assert_same_set(ref4, tmp_path / "here")


@needs_ray
def test_ray_gpus_are_asked_for_and_a_request_no_node_holds_is_refused(cluster, four_shards, tmp_path, capsys):
    work, _ = four_shards
    # 2 shards: Ray runs each GPU task in a worker process of its own (max_calls=1), started for it
    ref = tmp_path / "one"
    assert _cli(label_args(work, ref, "--shard-size", "300")) == 0
    # each task holds the second node's logical GPU; this onnxruntime has no CUDA provider (or the machine no
    # driver): under --device auto the tasks label on the CPU, as label does, and the line says so
    two = ["--shard-size", "300", "--engine", "ray", "--ray-gpus"]
    assert _cli(label_args(work, tmp_path / "auto", *two, "1", "--device", "auto")) == 0
    line = capsys.readouterr().out
    assert "on 1 node (2 of them on the CPU, though each held 1 Ray GPU: no CUDA provider" in line, line
    assert_same_set(ref, tmp_path / "auto")
    # --device cuda makes it an error: every task fails in one line, naming the cause
    assert _cli(label_args(work, tmp_path / "cuda", *two, "0.5", "--device", "cuda")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 of 2 Ray task(s) failed: shard 0: device cuda: " in err[0], err
    assert "no CUDA provider (pip install onnxruntime-gpu)" in err[0] or "no usable CUDA GPU" in err[0], err
    # more than any node has, at once (Ray would queue the tasks forever), or after --ray-wait
    too_many = ("--ray-gpus asks for 1 CPU, 2 GPU per task, but no node of the Ray cluster (2 live) has that (the "
                "most one has: 1 CPU, 1 GPU); Ray would queue the tasks forever; ask for less")
    for more, code, words in ((["--ray-gpus", "2"], 1, too_many),
                              (["--ray-resources", "nvme=1", "--ray-wait", "1"], 1, "none joined in 1 s"),
                              (["--ray-resources", "nvme"], 2, "--ray-resources 'nvme': expected NAME=AMOUNT"),
                              (["--device", "cuda"], 2, "--device cuda with --engine ray needs --ray-gpus")):
        assert _cli(_ray_args(work, tmp_path / "none", *more)) == code, more
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


@pytest.mark.slow  # a third node started mid-run
@needs_ray
def test_ray_wait_lets_a_node_that_can_hold_the_tasks_join(cluster, four_shards, tmp_path):
    """As an autoscaler would: the tasks ask for a resource no node has; a node that has it joins while the driver
    waits (--ray-wait), and the run ends with the bytes of one process, every task on that node."""
    work, ref = four_shards
    p = _popen(_ray_args(work, tmp_path / "ts", "--ray-address", cluster.address, "--ray-resources", "late=1",
                         "--ray-wait", "120"))
    time.sleep(3)
    assert p.poll() is None, p.communicate()
    late = cluster.nodes.add_node(num_cpus=1, resources={"late": 1})
    try:
        stdout, stderr = p.communicate(timeout=180)
    finally:
        cluster.nodes.remove_node(late)
    assert p.returncode == 0 and "on 1 node wrote" in stdout, stdout + stderr[-3000:]
    assert_same_set(ref, tmp_path / "ts")


def _private_mounts() -> bool:
    """Whether this process may give a child a mount namespace of its own (root, or a user namespace)."""
    with tempfile.TemporaryDirectory() as where:
        try:
            return subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {shlex.quote(where)}"],
                                  capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False


@needs_ray
@pytest.mark.skipif(not _private_mounts(), reason="needs `unshare -m` (a mount namespace) to hide a folder")
def test_tasks_that_do_not_see_the_drivers_folder_fail_in_one_line(cluster, four_shards, tmp_path):
    """The driver runs in a mount namespace of its own with a tmpfs over the output folder's parent: it sees a
    folder the nodes do not (a driver off the shared filesystem, as a Ray Client on a laptop)."""
    work, _ = four_shards
    hidden = tmp_path / "driver-only"
    hidden.mkdir()
    out = hidden / "ts"
    args = label_args(work, out, "--shard-size", "300", "--engine", "ray", "--ray-address", cluster.address)
    driver = shlex.join([sys.executable, "-m", "transferset", *args])
    cmd = f"mount -t tmpfs none {shlex.quote(str(hidden))} && exec {driver}"
    env = {**ENV, **{k: v for k, v in os.environ.items() if k.startswith("RAY_")}}
    p = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, env=env, timeout=120)
    line = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "2 of 2 Ray task(s) failed: shard 0: out " in line, p.stderr[-3000:]
    assert "does not see the driver's output folder there (no .ray-driver-" in line, line
    assert line.endswith("and 1 more; no shard was labelled: fix that, then run the same command"), line
    assert not out.exists()  # the tasks wrote no folder of their own


@pytest.mark.slow  # 14-16 s on the 2-core machine, under load; the first connection once took 47 s and failed
@needs_ray
@pytest.mark.skipif(not HAVE_CLIENT, reason="Ray Client needs grpc (pip install 'ray[client]')")
def test_a_ray_client_address_writes_the_same_bytes(cluster, four_shards, tmp_path):
    work, ref = four_shards
    p = _popen(_ray_args(work, tmp_path / "ts", "--ray-address", cluster.client))
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0 and "4 Ray task(s) in" in stdout, stdout + stderr[-3000:]
    assert_same_set(ref, tmp_path / "ts")


@needs_ray
def test_a_ray_client_address_without_grpc_names_the_extra(four_shards, tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setitem(sys.modules, "grpc", None)  # as with `pip install ray` (no client extra)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # this process is connected to the module's cluster
    work, _ = four_shards
    assert _cli(_ray_args(work, tmp_path / "ts", "--ray-address", "ray://127.0.0.1:1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a Ray Client address needs Ray's client extra: pip install 'ray[client]'" in err[0], err


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
    authentication on the clusters it starts, and a driver given an address must be told); this process's own
    PYTHONPATH after the repository's (where grpc for Ray Client may have been put)."""
    env = {**ENV, **{k: v for k, v in os.environ.items() if k.startswith("RAY_")},
           "PYTHONPATH": os.pathsep.join(filter(None, (ENV["PYTHONPATH"], os.environ.get("PYTHONPATH"))))}
    return subprocess.Popen([sys.executable, "-m", "transferset", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@needs_ray
def test_a_worker_killed_mid_shard_is_run_again(cluster, slow_shards, tmp_path):
    work, ref = slow_shards
    out = tmp_path / "ray"
    args = label_args(work, out, "--shard-size", "1200", "--engine", "ray", "--ray-address", cluster.address)
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


def test_the_device_a_task_falls_back_to_or_fails_on(monkeypatch):
    """What a Ray task given a GPU does where onnxruntime lacks the CUDA provider, or the node a driver: ``auto``
    labels on the CPU, ``cuda`` fails in one line naming which is missing (no Ray needed)."""
    import onnxruntime

    from transferset import devices
    from transferset.errors import TransferSetError

    for providers, gpus, why in ((["CPUExecutionProvider"], 1, "cuda: this onnxruntime has no CUDA provider (pip "
                                                                "install onnxruntime-gpu); use cpu or auto"),
                                 (["CUDAExecutionProvider", "CPUExecutionProvider"], 0,
                                  "cuda: no usable CUDA GPU here; use cpu or auto")):
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: providers)
        monkeypatch.setattr(devices, "cuda_device_count", lambda: gpus)
        assert devices.ort_providers("auto") == (["CPUExecutionProvider"], None)
        with pytest.raises(TransferSetError) as e:
            devices.ort_providers("cuda")
        assert str(e.value) == f"device {why}"
