"""The bundled digits models: layout, size, tables, the Hub code path, and the demo."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_unet
from diffusers import DDPMScheduler

from analytic_sampler.commands.demo import DEMO_METHODS, DEMO_TABLE_SAMPLES, run_demo
from analytic_sampler.evaluation.baselines import FITTED
from analytic_sampler.fingerprint import weights_fingerprint
from analytic_sampler.pretrained import BUNDLED_DIR, BUNDLED_MODELS, load_pretrained
from analytic_sampler.solver_statistics import SolverStatistics
from analytic_sampler.table import VarianceTable

EXPECTED_VARIANCE = {"digits-ddpm-linear": "fixed_small", "digits-iddpm-cosine": "learned_range"}


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_bundled_model_loads_with_its_table(name):
    model = load_pretrained(name)
    assert model.scheduler.config.variance_type == EXPECTED_VARIANCE[name]
    assert model.unet.config.out_channels == (2 if EXPECTED_VARIANCE[name] == "learned_range" else 1)
    assert model.table is not None and model.table.estimated.all()
    model.table.check_schedule(model.scheduler)
    assert np.all((model.table.ms_eps > 0) & (model.table.ms_eps < 1.5))
    card = (BUNDLED_DIR / name / "README.md").read_text()
    assert "FD-digits" in card and (BUNDLED_DIR / name / "samples.png").is_file()
    stats = model.solver_statistics  # DPM-Solver-v3's, with its timesteps fitted for K = 3, 5, 7, 10
    assert stats is not None and sorted(map(int, stats.fitted_timesteps)) == [3, 5, 7, 10]
    stats.check_schedule(model.scheduler)
    assert stats.provenance["model_fingerprint"] == weights_fingerprint(model.unet)  # estimated on these weights
    assert "solver_statistics" in card


def test_shipped_weights_stay_under_20_mb():
    size = sum(f.stat().st_size for f in BUNDLED_DIR.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"bundled files take {size / 2**20:.1f} MB"


def test_bundled_model_loads_by_repo_id_from_an_offline_hub_cache(tmp_path):
    """The same from_pretrained code path a user's Hub model takes, with HF_HUB_OFFLINE=1."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--digits"
    shutil.copytree(BUNDLED_DIR / "digits-ddpm-linear", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from analytic_sampler.pretrained import load_pretrained\n"
        "m = load_pretrained('someone/digits')\n"
        "print(m.table.fingerprint, m.unet.config.out_channels, m.scheduler.config.variance_type)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    local = load_pretrained("digits-ddpm-linear")
    assert out.stdout.split() == [local.table.fingerprint, "1", "fixed_small"]


@pytest.mark.slow
def test_demo_writes_grid_and_table(tmp_path):
    from PIL import Image

    result = run_demo("digits-ddpm-linear", str(tmp_path), steps=(5, 8), num_images=20)
    for name in ("grid.png", "results.md", "results_nll.png", "results_fd.png"):
        assert (tmp_path / name).is_file()
    saved = json.loads((tmp_path / "results.json").read_text())
    quality = saved["sample_quality"]
    shipped = [m for m in DEMO_METHODS if m not in FITTED]  # the bundled tables carry no fitted timesteps (their
    # solver statistics carry DPM-Solver-v3's)
    assert [r["method"] for r in quality["rows"]] == shipped * 2 and quality["measure"] == "FD-digits"
    assert quality["not_applicable"] == [m for m in DEMO_METHODS if m in FITTED]
    assert all(np.isfinite(r["fd"]) and r["stderr"] > 0 for r in quality["rows"]) and quality["real_floor"]["fd"] > 0
    assert {(r["K"], r["trajectory"], r["variance"]) for r in saved["nll"]} >= {(5, "optimal", "residual"),
                                                                                 (8, "even", "analytic")}
    grid = Image.open(tmp_path / "grid.png")
    rows = 2 * len(shipped)  # one per method and K
    scale = math.ceil(512 / max(10 * (8 + 1) + 1, rows * (8 + 1) + 1))  # enlarged until the longer side is 512 px
    unlabelled = (10 * (8 + 1) + 1) * scale
    assert grid.height == (rows * (8 + 1) + 1) * scale and grid.width > unlabelled + 60  # a label margin
    assert result["table"] == "shipped with the model"
    ranked = {r["method"]: r for r in quality["rows"] if r["K"] == 5}
    assert min(r["diff_to_best"] for r in ranked.values()) == 0 and all(r["diff_stderr"] >= 0 for r in ranked.values())


def test_demo_size_options():
    """The default demo is K = 10 with 2000 samples per method; --full adds K = 25."""
    from analytic_sampler.commands.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.steps is None and args.num_images is None and not args.full
    assert build_parser().parse_args(["demo", "--full"]).full
    from analytic_sampler.commands import demo

    assert demo.DEMO_STEPS == (10,) and demo.DEMO_IMAGES == 2000 and demo.FULL_STEPS == (10, 25)


@pytest.mark.slow
def test_demo_estimates_a_table_for_a_model_that_ships_none(tmp_path):
    model_dir = tmp_path / "model"
    tiny_unet(channels=1).save_pretrained(model_dir / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(model_dir / "scheduler")
    result = run_demo(str(model_dir), str(tmp_path / "out"), steps=(5,), num_images=10)
    assert load_pretrained(str(model_dir)).table is None  # the table goes to the output folder, not the model's
    saved = VarianceTable.load(tmp_path / "out" / "table")
    assert saved.counts.tolist() == [DEMO_TABLE_SAMPLES] * 1000
    assert len(result["sample_quality"]["rows"]) == len(DEMO_METHODS)  # v3 on statistics estimated beside the table
    assert result["sample_quality"]["not_applicable"] == [] and result["solver_statistics"].startswith("estimated")
    assert set(SolverStatistics.load(tmp_path / "out" / "table").fitted_timesteps) == {"3", "5"}


@pytest.mark.slow
def test_demo_command_records_its_whole_time(tmp_path, capsys):
    from analytic_sampler.commands.cli import main

    main(["demo", "--steps", "4", "--num-images", "10", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seconds_command"] >= saved["seconds_total"] > 0
    assert "The whole command took" in (tmp_path / "results.md").read_text()
    assert "The whole command took" in capsys.readouterr().out
