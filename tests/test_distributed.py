"""estimate_moments under torchrun (gloo, CPU): the table does not depend on the number of processes, and a run
killed on one rank resumes to the uninterrupted table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler

from analytic_sampler.table import VarianceTable

pytestmark = pytest.mark.slow  # every test launches torchrun or kills a run: 7-45 s each on 2 cores

SCRIPT = str(Path(__file__).with_name("distributed_estimate.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(args, nproc: int | None = None, check: bool = True) -> subprocess.CompletedProcess:
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    out = subprocess.run([sys.executable, *launcher, *args], env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def assert_same_table(a: Path, b: Path) -> None:
    ta, tb = VarianceTable.load(a), VarianceTable.load(b)
    for name in ("ms_eps", "stderr", "x0_mse", "x0_mse_stderr", "counts"):
        np.testing.assert_array_equal(getattr(ta, name), getattr(tb, name), err_msg=name)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    run([SCRIPT, str(out)])
    return out


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_table_equals_single_process_bit_for_bit(single, tmp_path, nproc):
    run([SCRIPT, str(tmp_path)], nproc=nproc)  # 23 batches: 2 and 3 processes leave a last round part-empty
    assert_same_table(single, tmp_path)
    assert {p.name for p in tmp_path.glob("checkpoint*.pt")} == {"checkpoint.pt"} | {
        f"checkpoint.rank{r}.pt" for r in range(1, nproc)}


def test_torchrun_solver_statistics_equal_single_process_bit_for_bit(tmp_path):
    from analytic_sampler.solver_statistics import SolverStatistics

    run([SCRIPT, str(tmp_path / "one"), "--statistics"])
    run([SCRIPT, str(tmp_path / "two"), "--statistics"], nproc=2)  # 10 batches of 16 pairs
    one, two = (SolverStatistics.load(tmp_path / name) for name in ("one", "two"))
    for name in ("l", "s", "b", "l_stderr", "s_stderr", "b_stderr"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name), err_msg=name)


def test_run_killed_on_one_rank_resumes_to_the_same_table(single, tmp_path):
    crashed = run([SCRIPT, str(tmp_path), "--crash-after", "5"], nproc=2, check=False)
    assert crashed.returncode != 0 and not (tmp_path / "variance_table.json").exists()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["next_batch"]
    assert 0 < saved < 23  # it stopped part-way, with a checkpoint
    run([SCRIPT, str(tmp_path)], nproc=2)
    assert_same_table(single, tmp_path)


def test_cli_precompute_under_torchrun(tmp_path):
    tiny_unet(channels=1).save_pretrained(tmp_path / "model" / "unet")
    DDPMScheduler(num_train_timesteps=20).save_pretrained(tmp_path / "model" / "scheduler")
    torch.save(torch.rand(6, 1, 8, 8) * 2 - 1, tmp_path / "images.pt")
    args = ["-m", "analytic_sampler", "precompute", str(tmp_path / "model"), "--fit-paths", "0",
            "--data", str(tmp_path / "images.pt"),
            "--num-samples", "6", "--batch-size", "16", "--device", "cpu", "--out"]
    run([*args, str(tmp_path / "one")])
    launched = run([*args, str(tmp_path / "two")], nproc=2)
    # rank 0 alone writes and reports: the table, the solver statistics, then the sample cost
    assert launched.stdout.count("saved to") == 3
    assert_same_table(tmp_path / "one", tmp_path / "two")
    assert not (tmp_path / "two.partial").exists()  # every rank removed its checkpoint after the save


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from /proc), children first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the launcher's workers through /proc")
@pytest.mark.parametrize("nproc", [None, 2])
def test_precompute_killed_with_sigkill_resumes_bit_identical(tmp_path, nproc):
    """kill -9 of a running `analytic-sampler precompute` (every process of a torchrun launch at once), then the
    same command again: it resumes from the checkpoint and writes the table of an uninterrupted run, bit for bit."""
    tiny_unet(channels=1).save_pretrained(tmp_path / "model" / "unet")
    DDPMScheduler(num_train_timesteps=20).save_pretrained(tmp_path / "model" / "scheduler")
    torch.save(torch.rand(400, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, tmp_path / "images.pt")
    args = ["-m", "analytic_sampler", "precompute", str(tmp_path / "model"), "--fit-paths", "0",
            "--data", str(tmp_path / "images.pt"),
            "--num-samples", "400", "--batch-size", "8", "--checkpoint-every", "5", "--device", "cpu", "--out"]
    run([*args, str(tmp_path / "whole")])  # 1000 batches, uninterrupted

    out, checkpoint = tmp_path / "killed", tmp_path / "killed.partial" / "checkpoint.pt"
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    job = subprocess.Popen([sys.executable, *launcher, *args, str(out)], env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not checkpoint.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    for pid in [job.pid, *descendants(job.pid)]:  # the launcher and its workers (in sessions of their own), mid-run
        os.kill(pid, signal.SIGKILL)
    job.wait()
    time.sleep(0.5)  # the workers' ends are reaped by init
    assert not (out / "variance_table.json").exists()
    saved = torch.load(checkpoint, weights_only=True)["next_batch"]
    assert 0 < saved < 1000  # killed part-way, after a checkpoint
    resumed = run([*launcher, *args, str(out)])
    assert f"resuming from {saved}/1000 batches" in resumed.stdout or nproc  # ranks resume from the least advanced
    assert "resuming from " in resumed.stdout and "nothing to do" not in resumed.stdout
    assert_same_table(tmp_path / "whole", out)
    assert not checkpoint.parent.exists()
