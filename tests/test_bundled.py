"""The bundled digits models: layout, size, tables, the Hub code path, and the demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from diffusers import DDPMScheduler

from analytic_sampler.demo import DEMO_METHODS, run_demo
from analytic_sampler.pretrained import BUNDLED_DIR, BUNDLED_MODELS, load_pretrained
from analytic_sampler.table import VarianceTable

from conftest import tiny_unet

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


def test_demo_writes_grid_and_table(tmp_path):
    result = run_demo("digits-ddpm-linear", str(tmp_path), steps=(5,), num_images=20)
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "results.md").is_file()
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["method"] for r in rows] == list(DEMO_METHODS) and all(np.isfinite(r["fd_digits"]) for r in rows)
    assert result["fd_digits_train_vs_heldout"] > 0


def test_demo_estimates_a_table_for_a_model_that_ships_none(tmp_path):
    model_dir = tmp_path / "model"
    tiny_unet(channels=1).save_pretrained(model_dir / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(model_dir / "scheduler")
    result = run_demo(str(model_dir), str(tmp_path / "out"), steps=(5,), num_images=10)
    assert load_pretrained(str(model_dir)).table is None  # the table goes to the output folder, not the model's
    saved = VarianceTable.load(tmp_path / "out" / "table")
    assert saved.counts.tolist() == [100] * 1000 and len(result["results"]) == len(DEMO_METHODS)
