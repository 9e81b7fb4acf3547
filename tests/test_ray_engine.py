"""``label --engine ray`` (issue 25): one Ray task per shard on a local Ray cluster gives the bytes of one process.

Ray is an optional extra: without it the engine is refused in one line naming the extra, and the Ray test skips.
"""

from __future__ import annotations

import importlib.util

import pytest

from test_parts import _cli, _run, assert_same_set, inputs, label_args  # noqa: F401 (the fixture)

HAVE_RAY = importlib.util.find_spec("ray") is not None


@pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install 'transferset[ray]')")
def test_ray_tasks_write_the_bytes_of_one_process(inputs, tmp_path):
    work, _ = inputs
    ref, out = tmp_path / "one", tmp_path / "ray"
    assert _cli(label_args(work, ref, "--shard-size", "150")) == 0  # 4 shards: 4 tasks
    p = _run(label_args(work, out, "--shard-size", "150", "--engine", "ray", "--ray-cpus", "1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "4 Ray task(s)" in p.stdout and "the set is complete: 600 rows in 4 shards" in p.stdout, p.stdout
    assert_same_set(ref, out)


@pytest.mark.skipif(HAVE_RAY, reason="ray is installed")
def test_ray_engine_without_ray_names_the_extra(inputs, tmp_path, capsys):
    work, _ = inputs
    assert _cli(label_args(work, tmp_path / "ts", "--engine", "ray")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'transferset[ray]'" in err[0], err
    assert not (tmp_path / "ts").exists() or not any((tmp_path / "ts").iterdir())
