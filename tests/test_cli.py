"""The analytic-sampler command end to end on a tiny model folder in the Diffusers layout."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from analytic_sampler.cli import main
from analytic_sampler.table import VarianceTable

from conftest import tiny_unet


@pytest.fixture
def model_dir(tmp_path):
    tiny_unet(channels=1).save_pretrained(tmp_path / "model" / "unet")
    DDPMScheduler(num_train_timesteps=50).save_pretrained(tmp_path / "model" / "scheduler")
    torch.save(torch.rand(8, 1, 8, 8) * 2 - 1, tmp_path / "images.pt")
    return tmp_path


def test_precompute_resume_trajectory_sample(model_dir, capsys):
    model, table_dir = str(model_dir / "model"), model_dir / "table"
    args = ["precompute", model, "--data", str(model_dir / "images.pt"), "--out", str(table_dir),
            "--num-samples", "8", "--batch-size", "40"]
    main(args)
    first = VarianceTable.load(table_dir)
    assert first.counts.tolist() == [8] * 50 and (table_dir / "checkpoint.pt").exists()
    main(args)  # a finished checkpoint: resumes at the end, same table
    assert (VarianceTable.load(table_dir).ms_eps == first.ms_eps).all()

    capsys.readouterr()
    main(["trajectory", "--table", str(table_dir), "--steps", "5", "10"])
    report = json.loads(capsys.readouterr().out)
    assert len(report["5"]["optimal"]) == 5 and report["10"]["optimal_cost"] <= report["10"]["even_cost"] + 1e-12

    out = model_dir / "grid.png"
    main(["sample", model, "--table", str(table_dir), "--steps", "5", "--num-images", "4", "--out", str(out)])
    assert Image.open(out).size == (4 * (2 * 9 + 1), 4 * (2 * 9 + 1))


def test_errors_name_the_fix(model_dir):
    model = str(model_dir / "model")
    with pytest.raises(SystemExit, match="ships no variance table: run `analytic-sampler precompute"):
        main(["sample", model, "--steps", "5", "--out", str(model_dir / "x.png")])
    with pytest.raises(SystemExit, match="use digits:train, digits:heldout, a .pt/.npy file"):
        main(["precompute", model, "--data", "nowhere.txt", "--out", str(model_dir / "t")])
    torch.save(torch.rand(8, 1, 8, 8) * 4, model_dir / "bright.pt")
    with pytest.raises(SystemExit, match="error: data outside the declared range"):
        main(["precompute", model, "--data", str(model_dir / "bright.pt"), "--out", str(model_dir / "t"), "--num-samples", "8"])
