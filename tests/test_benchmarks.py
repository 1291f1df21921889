"""Smoke runs of the benchmarks in --quick mode: they finish and write their files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cost  # noqa: E402
import fingerprint  # noqa: E402
import per_channel  # noqa: E402
import steps  # noqa: E402
import threads  # noqa: E402
import throughput  # noqa: E402
import trajectory  # noqa: E402


@pytest.mark.slow
def test_steps_quick(tmp_path):
    steps.main(["--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "steps.json").read_text())
    assert [m["model"] for m in result["models"]] == ["digits-ddpm-linear", "digits-iddpm-cosine"]
    cosine = result["models"][1]
    assert {r["variance"] for r in cosine["nll"]} == {"btilde", "beta", "analytic", "residual", "learned"}
    assert "Improved DDPM (learned)" in {r["method"] for r in cosine["fd"]}
    assert (tmp_path / "steps.md").is_file() and (tmp_path / "steps_digits-ddpm-linear.png").is_file()


def test_cost_quick(tmp_path):
    result = cost.main(["--quick", "--out", str(tmp_path)])
    assert all(row["same_cost"] for row in result["dp"] if row["naive_s"] is not None)
    assert (tmp_path / "cost.md").is_file()


@pytest.mark.slow
def test_trajectory_quick(tmp_path):
    result = trajectory.main(["--quick", "--out", str(tmp_path), "--cache", str(tmp_path / "tables")])
    model = result["models"][0]
    wanted = {("even", "analytic"), ("residual DP", "residual"), ("paper DP", "analytic")}
    assert {(r["trajectory"], r["variance"]) for r in model["nll"]} >= wanted
    assert len(model["checks"]) == 2 and (tmp_path / "tables" / "digits-ddpm-linear-m10-s0").is_dir()
    assert "Checks:" in (tmp_path / "trajectory.md").read_text()


@pytest.mark.slow
def test_throughput_quick(tmp_path):
    """One process and, where the machine has two cores, two under torchrun; every option but compile (too slow)."""
    result = throughput.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert [r["option"] for r in result["moments"]] == ["default", "noise_on_device", "bfloat16"]
    assert all(r["pairs_per_s"] > 0 and r["forward_images_per_s"] > 0 for r in result["moments"])
    counts = [r["processes"] for r in result["processes"]]
    assert counts[0] == 1 and counts == sorted(set(counts)) and all(r["pairs_per_s"] > 0 for r in result["processes"])
    assert "torch" in result["versions"]
    assert "against the number of processes" in (tmp_path / "throughput_cpu.md").read_text()


def test_per_channel_small(tmp_path):
    """Differing channels: the per-channel bound is below the scalar one; equal channels: the two coincide."""
    result = per_channel.main(["--steps", "3", "--num-samples", "200", "--out", str(tmp_path)])
    differ, equal = result["channels differ"][0], result["channels equal"][0]
    assert differ["per-channel bpd"] < differ["scalar bpd"] - 0.2
    # one code path, but the log / exp of sigma^2 run on (C, 1, 1) or (1, 1, 1) tensors: equal to float64 rounding
    assert equal["per-channel bpd"] == pytest.approx(equal["scalar bpd"], rel=1e-12, abs=0)
    assert (tmp_path / "per_channel.md").is_file()


@pytest.mark.slow
def test_threads_quick(tmp_path):
    """Each configuration runs the real command once, in a fresh process, and is timed."""
    result = threads.main(["--quick", "--out", str(tmp_path)])
    (level,) = result["levels"]
    assert level["busy"] == 0 and [r["config"] for r in level["runs"]] == list(threads.CONFIGS)
    assert all(r["seconds"] > 0 for r in level["runs"]) and result["cores"] >= 1
    assert "| busy loops | load | torch defaults | command defaults |" in (tmp_path / "threads.md").read_text()


def test_fingerprint_quick(tmp_path):
    """Both sides measured in one run, on the same model; the fingerprint far under its 10% bound."""
    result = fingerprint.main(["--quick", "--repeats", "1", "--out", str(tmp_path)])
    assert result["fingerprint_best_s"] > 0 and result["estimate"]["seconds_per_batch"] > 0
    assert result["share"] < result["bound"]
    assert "of that precompute" in (tmp_path / "fingerprint_cpu.md").read_text()


@pytest.mark.slow
def test_samplers_quick(tmp_path):
    """Every cell of one (model, K) from the same noise: each has its paired difference to the best cell; the checks
    with a second table and the defaults against DDIM are there."""
    import samplers

    result = samplers.main(["--quick", "--out", str(tmp_path), "--cache", str(tmp_path / "cache")])
    cells = result["models"][0]["cells"]
    shipped = [c for c in cells if c["table"] == "shipped"]
    assert {c["trajectory"] for c in shipped} == set(samplers.KINDS)
    assert min(c["diff_to_best"] for c in shipped) == 0 and all(c["diff_stderr"] >= 0 for c in shipped)
    assert any(c["table"] == "second" and "vs_shipped" in c for c in cells)
    assert any(c["table"] == "defaults" and "vs_ddim" in c for c in cells)
    assert "sample-quality trajectory" in (tmp_path / "samplers.md").read_text()

@pytest.mark.slow
def test_solver_v3_tail_quick(tmp_path):
    """Every v3 trajectory of the tail study runs K model calls on both bundled models; each cell is paired with the
    best peer cell of its (model, seed)."""
    import solver_v3_tail

    result = solver_v3_tail.main(["--quick", "--out", str(tmp_path), "--cache", str(tmp_path / "cache")])
    for model in result["models"]:
        rows = model["rows"]
        v3 = [r for r in rows if r["method"] == solver_v3_tail.V3]
        assert {r["spacing"] for r in v3} >= {"fitted", "stop at 70", "jump from 50"}
        assert all(len(r["timesteps"]) == solver_v3_tail.K for r in v3)
        assert [r["timesteps"][-1] for r in v3 if r["spacing"].startswith("jump")] == [1] * len(solver_v3_tail.JUMPS)
        assert min(r["fd_diff_to_best_peer"] for r in rows if r["method"] in solver_v3_tail.PEERS) == 0
    assert "jump from 50" in (tmp_path / "solver_v3_tail.md").read_text()


@pytest.mark.slow
def test_solver_v3_final_order_quick(tmp_path):
    """lower_order_final on and off on the bundled statistics: both orders of every trajectory up to K = 10 get a
    reference error with its standard error."""
    import solver_v3_final_order

    result = solver_v3_final_order.main(["--quick", "--out", str(tmp_path)])
    assert {r["order"] for r in result["rows"]} == {2, 3} and all(len(r["timesteps"]) <= 10 for r in result["rows"])
    assert all(r[f"lower_order_final={f}"][0] > 0 for r in result["rows"] for f in (False, True))
    assert "lower_order_final" in (tmp_path / "solver_v3_final_order.md").read_text()
