"""The collectives and failure handling of runtime/distributed.py, with real ranks: processes on this
machine joined by MLX's ring backend over localhost (free ports), each checked against numpy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlx_sora.runtime import distributed
from mlx_sora.runtime.distributed import (
    EXIT_FAILED,
    RankGroup,
    ranks_on_this_host,
    share_cpu_threads,
    spawn_local_ranks,
)

WAIT = 240  # seconds a test waits for its ranks: generous, the machine is shared

COLLECTIVES = r'''
import json, sys
import mlx.core as mx
import numpy as np
from mlx_sora.runtime.distributed import all_to_all_sent, init_group

group = init_group(timeout=120)
R, r = group.size, group.rank
T, S, C = 7, 5, 3
full = np.arange(2 * T * S * C, dtype=np.float32).reshape(2, T, S, C)
def ranges(n):
    sizes = [n // R + (i < n % R) for i in range(R)]
    starts = np.cumsum([0] + sizes)
    return [(int(starts[i]), int(starts[i + 1])) for i in range(R)]
F, P = ranges(T), ranges(S)
mine = mx.array(full[:, F[r][0]:F[r][1]])
sent = group.bytes_sent
got = group.all_to_all([mine[:, :, p0:p1] for p0, p1 in P],
                       lambda o, d: (2, F[o][1] - F[o][0], P[d][1] - P[d][0], C), "test")
positions = np.array(mx.concatenate(got, axis=1))
to_positions_bytes = group.bytes_sent - sent
back = group.all_to_all([mx.array(positions)[:, f0:f1] for f0, f1 in F],
                        lambda o, d: (2, F[d][1] - F[d][0], P[o][1] - P[o][0], C), "test")
y = group.broadcast(mx.array(full) if r == 0 else None, full.shape, mx.float32, "test")
pieces = group.gather_to_root(mx.array(full[:1] + r) if r != 1 else None,
                              [(1 if q != 1 else 0, T, S, C) for q in range(R)], mx.float32, "test")
objects = group.gather_objects({"rank": r, "text": "x" * r}, "test")
group.agree(True, "test")
print(json.dumps({
    "positions": bool(np.array_equal(positions, full[:, :, P[r][0]:P[r][1]])),
    "frames": bool(np.array_equal(np.array(mx.concatenate(back, axis=2)), full[:, F[r][0]:F[r][1]])),
    "broadcast": bool(np.array_equal(np.array(y), full)),
    "gathered": None if pieces is None else [None if p is None else bool(np.array_equal(np.array(p), full[:1] + q))
                                             for q, p in enumerate(pieces)],
    "objects": objects, "to_positions_bytes": to_positions_bytes,
    "expected_bytes": all_to_all_sent(R, lambda o, d: 2 * (F[o][1] - F[o][0]) * (P[d][1] - P[d][0]) * C * 4)[r],
}))
'''


def run_ranks(tmp_path: Path, script: str, ranks: int, *args: str, timeout: float = WAIT) -> list[subprocess.CompletedProcess]:
    """Run ``script`` as ``ranks`` ranks; their exit codes and output (killed if they outlive ``timeout``)."""
    path = tmp_path / "rank_script.py"
    path.write_text(script)
    env = dict(os.environ, MLX_SORA_BLAS_CHECKED="1", MKL_NUM_THREADS="1", OMP_NUM_THREADS="1")
    processes = spawn_local_ranks([sys.executable, str(path), *args], ranks, tmp_path, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = []
    try:
        for p in processes:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


@pytest.mark.parametrize("ranks", [2, 3])
def test_collectives_equal_numpy(tmp_path, ranks):
    """all_to_all (uneven blocks, forwarded around the ring for 3 ranks), broadcast, gather_to_root,
    gather_objects and agree give what slicing one numpy array gives; each rank sends the bytes
    all_to_all_sent counts."""
    done = run_ranks(tmp_path, COLLECTIVES, ranks)
    for rank, result in enumerate(done):
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["positions"] and report["frames"] and report["broadcast"]
        assert report["objects"] == [{"rank": q, "text": "x" * q} for q in range(ranks)]
        if rank == 0:
            assert report["gathered"] == [True if q != 1 else None for q in range(ranks)]
        else:
            assert report["gathered"] is None
        assert report["to_positions_bytes"] == report["expected_bytes"]  # 2 ranks: one block each way


AGREE = r'''
import sys
from mlx_sora.runtime.distributed import RankFailure, init_group
group = init_group(timeout=120)
try:
    group.agree(group.rank != 1, "checking the plan")
except RankFailure as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
sys.exit(2 if group.rank == 1 else 0)
'''


def test_agree_names_the_rank_that_failed(tmp_path):
    done = run_ranks(tmp_path, AGREE, 2)
    assert done[1].returncode == 2  # the failing rank goes on to report its own error
    assert done[0].returncode == 1
    assert "rank 1 failed (checking the plan)" in done[0].stderr


HUNG = r'''
import sys, time
import mlx.core as mx
from mlx_sora.runtime.distributed import init_group
group = init_group(timeout=float(sys.argv[1]))
if group.rank == 1:
    time.sleep(600)  # alive, but never joins the collective
group.all_gather(mx.ones(4), "waiting for a hung rank")
'''


def test_hung_rank_ends_the_job_by_timeout(tmp_path):
    """A rank that is alive but never answers: the others stop after --rank-timeout with a message
    (the ring backend alone would wait forever)."""
    path = tmp_path / "hung.py"
    path.write_text(HUNG)
    env = dict(os.environ, MLX_SORA_BLAS_CHECKED="1")
    processes = spawn_local_ranks([sys.executable, str(path), "3"], 2, tmp_path, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        start = time.monotonic()
        _, err = processes[0].communicate(timeout=WAIT)
        assert processes[0].returncode == EXIT_FAILED
        assert "rank 0: waited more than 3 s for the other ranks (waiting for a hung rank)" in err
        assert "--rank-timeout" in err
        assert time.monotonic() - start < WAIT / 2
    finally:
        for p in processes:
            p.kill()
            p.wait()


def test_rank_that_never_connects_ends_by_timeout(tmp_path):
    """Rank 1 of 2 is never started: rank 0 stops with a message instead of waiting in accept()."""
    path = tmp_path / "lonely.py"
    path.write_text("from mlx_sora.runtime.distributed import init_group\ninit_group(timeout=3)\n")
    hostfile = tmp_path / "hostfile.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in distributed.free_ports(2)]))
    env = dict(os.environ, MLX_SORA_BLAS_CHECKED="1", MLX_RANK="0", MLX_HOSTFILE=str(hostfile))
    done = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == EXIT_FAILED
    assert "rank 0: the other ranks did not connect within 3 s" in done.stderr
    assert "mlx.launch" in done.stderr


def test_ranks_on_this_host_and_their_threads(tmp_path, monkeypatch):
    hostfile = tmp_path / "hostfile.json"
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["10.0.0.2:5000"], ["127.0.0.1:5001"]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    monkeypatch.setenv("MLX_RANK", "2")
    assert ranks_on_this_host() == 2
    for name in ("MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # set by the user: kept
    share_cpu_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert os.environ["MKL_NUM_THREADS"] == str(max(1, cores // 2))
    assert os.environ["OMP_NUM_THREADS"] == "7"
    monkeypatch.setenv("MLX_RANK", "1")
    assert ranks_on_this_host() == 1
    monkeypatch.delenv("MLX_HOSTFILE")
    assert ranks_on_this_host() == 1


def test_group_of_one_outside_a_launcher(monkeypatch):
    """Without mlx.launch every collective is the identity and nothing is sent."""
    import mlx.core as mx
    import numpy as np

    for name in ("MLX_HOSTFILE", "MLX_RANK"):
        monkeypatch.delenv(name, raising=False)
    group = distributed.init_group(timeout=30)
    assert (group.rank, group.size) == (0, 1)
    x = mx.arange(6).reshape(2, 3)
    assert np.array_equal(np.array(group.broadcast(x, x.shape, x.dtype, "test")), np.array(x))
    assert group.gather_objects({"a": 1}, "test") == [{"a": 1}]
    assert group.bytes_sent == 0


def test_rank_timeout_must_be_positive():
    import mlx.core as mx

    with pytest.raises(ValueError, match="--rank-timeout"):
        RankGroup(mx.distributed.init(), timeout=0)
