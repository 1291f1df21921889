"""The command line's tables: the checkpoint beside the model folder, never inside what is uploaded; a table refuses
a model it was not estimated for unless --force-table."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from analytic_sampler.commands.cli import main
from analytic_sampler.table import VarianceTable


def model_folder(path, seed: int = 0):
    tiny_unet(channels=1, seed=seed).save_pretrained(path / "unet")
    DDPMScheduler(num_train_timesteps=20).save_pretrained(path / "scheduler")
    return path


@pytest.fixture
def world(tmp_path):
    model_folder(tmp_path / "model")
    model_folder(tmp_path / "other", seed=1)
    torch.save(torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, tmp_path / "images.pt")
    return tmp_path


def precompute(world, *extra):
    main(["precompute", str(world / "model"), "--fit-paths", "0",
          "--data", str(world / "images.pt"), "--num-samples", "4",
          "--batch-size", "16", *extra])


def uploaded(folder) -> list[str]:
    """What ``HfApi.upload_folder(folder_path=folder)`` would upload: every file but the default ignores."""
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS))


def test_the_checkpoint_of_a_model_folder_lives_beside_it(world):
    """precompute MODEL writes MODEL/table; its checkpoint waits in MODEL.partial/table/, so that uploading the
    model folder never takes it along; it is removed after the write unless --keep-checkpoint."""
    precompute(world, "--keep-checkpoint")
    checkpoint = world / "model.partial" / "table" / "checkpoint.pt"
    assert checkpoint.is_file()
    text = (world / "model" / "table" / "variance_table.json").read_text()
    json.loads(text, parse_constant=lambda constant: pytest.fail(f"bare {constant} in the table's JSON"))
    assert uploaded(world / "model") == [
        "scheduler/scheduler_config.json", "table/solver_statistics.json", "table/solver_statistics.safetensors",
        "table/variance_table.json", "table/variance_table.safetensors",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    for name in ("variance_table.json", "variance_table.safetensors"):
        (world / "model" / "table" / name).unlink()
    precompute(world)  # resumes from the kept checkpoint, writes the table, removes the checkpoint and its folders
    assert VarianceTable.load(world / "model" / "table").counts.max() == 4
    assert not (world / "model.partial").exists()


def test_a_table_refuses_another_model_unless_forced(world, capsys):
    precompute(world)
    table = str(world / "model" / "table")
    with pytest.raises(SystemExit, match=r"error: the variance table \(.*model\) does not belong to this model: it was "
                                         r"estimated with weights \w+, this model's are \w+ .*\(on the command line: "
                                         r"--force-table\) to use it anyway"):
        main(["sample", str(world / "other"), "--table", table, "--steps", "3", "--num-images", "2", "--out",
              str(world / "x.png")])
    with pytest.raises(SystemExit, match="does not belong to this model"):
        main(["nll", str(world / "other"), "--table", table, "--data", str(world / "images.pt"), "--steps", "3"])
    with pytest.raises(SystemExit, match="does not belong to this model"):
        main(["bench", str(world / "other"), "--table", table, "--data", str(world / "images.pt"), "--eval-data",
              str(world / "images.pt"), "--steps", "3", "--out", str(world / "bench")])
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"does not belong to this model: .*; used anyway \(force\)"):
        main(["nll", str(world / "other"), "--table", table, "--data", str(world / "images.pt"), "--steps", "3",
              "--force-table"])
    assert "bits/dim" in capsys.readouterr().out


def test_a_model_retrained_in_place_refuses_its_stale_table(world):
    """The table in MODEL/table was estimated before the weights changed: sampling with it is refused."""
    precompute(world)
    tiny_unet(channels=1, seed=2).save_pretrained(world / "model" / "unet")
    with pytest.raises(SystemExit, match="does not belong to this model: it was estimated with weights"):
        main(["sample", str(world / "model"), "--steps", "3", "--num-images", "2", "--out", str(world / "x.png")])
    precompute(world, "--overwrite")  # re-estimated for the new weights
    main(["sample", str(world / "model"), "--steps", "3", "--num-images", "2", "--out", str(world / "x.png")])
    assert (world / "x.png").is_file()
