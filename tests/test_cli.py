"""The analytic-sampler command end to end on a tiny model folder in the Diffusers layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler
from PIL import Image

from analytic_sampler.commands.cli import main
from analytic_sampler.evaluation.likelihood import predicted_transitions_bpd
from analytic_sampler.table import VarianceTable
from analytic_sampler.trajectory import TrajectoryDP


@pytest.fixture
def model_dir(tmp_path):
    tiny_unet(channels=1).save_pretrained(tmp_path / "model" / "unet")
    DDPMScheduler(num_train_timesteps=50).save_pretrained(tmp_path / "model" / "scheduler")
    torch.save(torch.rand(8, 1, 8, 8) * 2 - 1, tmp_path / "images.pt")
    return tmp_path


def test_precompute_resume_trajectory_sample(model_dir, capsys):
    model, table_dir = str(model_dir / "model"), model_dir / "table"
    checkpoint = model_dir / "table.partial" / "checkpoint.pt"  # beside the table folder, not in it
    args = ["precompute", model, "--fit-paths", "0", "--data", str(model_dir / "images.pt"), "--out", str(table_dir),
            "--num-samples", "8", "--batch-size", "40"]
    main([*args, "--keep-checkpoint"])
    first = VarianceTable.load(table_dir)
    assert first.counts.tolist() == [8] * 50 and checkpoint.exists()
    assert sorted(p.name for p in table_dir.iterdir()) == ["solver_statistics.json", "solver_statistics.safetensors",
                                                            "variance_table.json", "variance_table.safetensors"]
    written = (table_dir / "variance_table.safetensors").read_bytes()
    capsys.readouterr()
    main(args)  # the same settings: nothing to do, nothing written
    assert "already holds the table of these settings (the same weights, data and options); nothing to do" in \
        capsys.readouterr().out
    assert (table_dir / "variance_table.safetensors").read_bytes() == written
    for name in ("variance_table.json", "variance_table.safetensors"):
        (table_dir / name).unlink()  # as if the run had died after its last checkpoint, before the write
    main(args)  # the finished checkpoint resumes at the end: the same table, then the checkpoint goes
    assert "resuming from 10/10 batches" in capsys.readouterr().out
    assert (VarianceTable.load(table_dir).ms_eps == first.ms_eps).all()
    assert not checkpoint.exists() and not checkpoint.parent.exists()
    with pytest.raises(SystemExit, match=r"error: .*table already holds a variance table of another run \(seed: 0 in "
                                         r"the table, 1 now\); pass overwrite=True \(on the command line: "
                                         r"--overwrite\) to replace it, or choose another folder \(--out\)"):
        main([*args, "--seed", "1"])
    assert (VarianceTable.load(table_dir).ms_eps == first.ms_eps).all()
    main([*args, "--seed", "1", "--overwrite"])
    assert VarianceTable.load(table_dir).provenance["seed"] == 1
    main([*args, "--overwrite"])  # back to seed 0: bit-identical to the first run
    assert (VarianceTable.load(table_dir).ms_eps == first.ms_eps).all()

    capsys.readouterr()
    main(["trajectory", "--table", str(table_dir), "--steps", "5", "10", "--json", str(model_dir / "traj.json")])
    printed = capsys.readouterr().out
    assert "predicted bits/dim of the K-1 transitions" in printed and "8 samples per timestep" in printed
    report = json.loads((model_dir / "traj.json").read_text())
    assert len(report["5"]["residual DP"]["timesteps"]) == 5
    dp = TrajectoryDP(first.alphas_cumprod, None, 10, x0_mse=first.x0_mse)
    for k in ("5", "10"):  # the residual DP minimises exactly the residual-variance prediction of the fitted moment
        assert report[k]["residual DP"]["timesteps"] == dp.path(int(k))
        fitted = {name: predicted_transitions_bpd(first.alphas_cumprod, row["timesteps"], dp.moment)[0]
                  for name, row in report[k].items()}
        assert fitted["residual DP"] <= min(fitted.values()) + 1e-9

    out = model_dir / "grid.png"
    main(["sample", model, "--table", str(table_dir), "--steps", "5", "--num-images", "4", "--out", str(out)])
    assert Image.open(out).size == (27 * (2 * 9 + 1), 27 * (2 * 9 + 1))  # enlarged 27x: 513 px, at least 512


def test_errors_name_the_fix(model_dir):
    model = str(model_dir / "model")
    with pytest.raises(SystemExit, match="ships no variance table: run `analytic-sampler precompute"):
        main(["sample", model, "--steps", "5", "--out", str(model_dir / "x.png")])
    with pytest.raises(SystemExit, match="use digits:train, digits:heldout, a .pt/.npy file"):
        main(["precompute", model, "--data", "nowhere.txt", "--out", str(model_dir / "t")])
    torch.save(torch.rand(8, 1, 8, 8) * 4, model_dir / "bright.pt")
    with pytest.raises(SystemExit, match="error: data outside the declared range"):
        main(["precompute", model, "--data", str(model_dir / "bright.pt"), "--out", str(model_dir / "t"), "--num-samples", "8"])


def _png_folder(folder, n: int, size: int):
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.full((size, size), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return str(folder)


def test_image_folder_data_and_new_output_folders(model_dir):
    model, table_dir = str(model_dir / "model"), model_dir / "new" / "table"
    data = _png_folder(model_dir / "pngs", 6, 8)
    main(["precompute", model, "--fit-paths", "0",
          "--data", data, "--out", str(table_dir), "--num-samples", "6", "--timesteps", "all"])
    assert VarianceTable.load(table_dir).counts.tolist() == [6] * 50  # every image of the folder
    out = model_dir / "no" / "dir" / "x.png"
    main(["sample", model, "--table", str(table_dir), "--steps", "5", "--num-images", "2", "--out", str(out)])
    assert out.is_file()


def test_data_of_the_wrong_shape_is_refused_before_any_work(model_dir):
    model, out = str(model_dir / "model"), model_dir / "t"
    data = _png_folder(model_dir / "big", 3, 12)
    with pytest.raises(SystemExit, match=r"shape \(3, 1, 12, 12\) but the model takes \(N, C, H, W\) = \(N, 1, 8, 8\)"):
        main(["precompute", model, "--data", data, "--out", str(out)])
    torch.save(torch.rand(4, 3, 8, 8), model_dir / "rgb.pt")
    with pytest.raises(SystemExit, match=r"shape \(4, 3, 8, 8\) but .* give it 8x8 images with 1 channel\(s\)"):
        main(["precompute", model, "--data", str(model_dir / "rgb.pt"), "--out", str(out)])
    with pytest.raises(SystemExit, match="holds 8 images but --num-samples is 1000; pass --num-samples 8 or more"):
        main(["precompute", model, "--data", str(model_dir / "images.pt"), "--out", str(out)])
    assert not out.exists()


def test_device_without_cuda_is_refused_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["sample", "--device", "cuda"])
    assert "argument --device: CUDA is not available; use --device cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["precompute", "x", "--data", "digits:train", "--out", "t", "--device", "gpu"])
    assert "argument --device: 'gpu' is not a torch device; use cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_counts_must_be_positive(value, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--num-images", value])
    assert f"argument --num-images: {value!r} is not a positive integer; pass 1 or more" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["even:x", "10,abc", "50", "-1,3", "3,3", "even:1", ""])
def test_malformed_timesteps_list_the_accepted_forms(model_dir, spec):
    with pytest.raises(SystemExit, match=r"is not one of the accepted forms: all, even:K with 2 <= K <= 50, or a"):
        main(["precompute", str(model_dir / "model"), "--fit-paths", "0",
              "--data", "digits:train", "--out", str(model_dir / "t"),
              f"--timesteps={spec}"])


def test_missing_paths_are_not_hub_repo_ids(model_dir, monkeypatch):
    monkeypatch.chdir(model_dir)
    (model_dir / "tables").mkdir()
    for table in ("tables/linear", "./linear"):
        with pytest.raises(SystemExit, match=f"error: no such folder: '{table}'.*--out folder of `analytic-sampler"):
            main(["trajectory", "--table", table])
    with pytest.raises(SystemExit, match="error: no such folder: './model2'"):
        main(["sample", "./model2"])
    with pytest.raises(SystemExit, match="error: 'digits-ddpm-lineer' is not a bundled model \\(did you mean"):
        main(["sample", "digits-ddpm-lineer"])


def test_output_paths_are_checked_before_sampling(model_dir):
    (model_dir / "file.txt").write_text("")
    with pytest.raises(SystemExit, match="error: --out 'grid' is not an image file name; end it in .png"):
        main(["sample", "--out", "grid"])
    with pytest.raises(SystemExit, match="error: cannot create the output folder .*file.txt.*; choose another --out"):
        main(["demo", "--out", str(model_dir / "file.txt" / "demo")])


def test_trajectory_warns_on_a_noisy_table_and_needs_x0_mse(tmp_path, capsys):
    from analytic_sampler.schedule import alphas_cumprod_from_config

    abar = alphas_cumprod_from_config({"num_train_timesteps": 100})
    ms, x0 = (1 - abar) / (abar * 0.3 + 1 - abar), 0.3 * (1 - abar) / (abar * 0.3 + 1 - abar)
    counts = np.full(100, 2)
    # 2 draws per timestep with a huge spread: the DP's predicted gain is within noise
    noisy = VarianceTable.from_sums(ms * 2, ms**2 * 2 + 1.0, counts, abar, x0 * 2, x0**2 * 2 + 50.0)
    noisy.save(tmp_path / "noisy")
    main(["trajectory", "--table", str(tmp_path / "noisy"), "--steps", "5"])
    out = capsys.readouterr().out
    assert "2 samples per timestep" in out and "warning: at K=5 the residual DP's predicted gain over the even " \
        "trajectory is under 3 standard errors" in out and "precompute --num-samples" in out
    VarianceTable(ms, np.full(100, 1e-3), counts, abar).save(tmp_path / "old")  # no x0_mse, as format 1
    main(["trajectory", "--table", str(tmp_path / "old"), "--steps", "5"])
    out = capsys.readouterr().out
    assert "this table has no x0_mse, so no bound can be predicted" in out and "analytic-sampler precompute" in out
    assert "K=5 paper DP: [99," in out


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["sample", "--help"], ["bench"],
                                  ["sample", "--num-images", "0"], ["nll", "--bogus"],
                                  ["sample", "--device", "cuda", "--steps", "x"]])
def test_help_and_argument_errors_import_neither_torch_nor_diffusers(argv):
    """``--help`` and argument errors answer at once: torch and diffusers are imported only by the commands."""
    probe = ("import sys\nfrom analytic_sampler.commands.cli import main\ntry:\n    main(sys.argv[1:])\n"
             "except SystemExit as err:\n    code = err.code\n"
             "print([m for m in ('torch', 'diffusers') if m in sys.modules], code)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", probe, *argv], check=False, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.stdout.strip().splitlines()[-1] == f"[] {0 if argv[-1] == '--help' else 2}", done.stderr


def test_sample_trajectory_from_precompute_to_any_scheduler(model_dir, capsys):
    """precompute's second pass stores the sample cost (its model calls stated); trajectory --for samples prints the
    DP's trajectory, which runs on DPM-Solver++ as custom timesteps; a table without it names the command."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from analytic_sampler.sample_trajectory import sample_quality_trajectory

    model, table_dir = str(model_dir / "model"), model_dir / "table"
    main(["precompute", model, "--fit-paths", "0",
          "--data", str(model_dir / "images.pt"), "--out", str(table_dir), "--num-samples", "4",
          "--paths", "0"])
    capsys.readouterr()
    with pytest.raises(SystemExit, match="no sample cost.*analytic-sampler precompute MODEL --data DATA --out DIR"):
        main(["trajectory", "--table", str(table_dir), "--for", "samples", "--steps", "4"])
    main(["precompute", model, "--data", str(model_dir / "images.pt"), "--out", str(table_dir), "--sample-cost-only",
          "--candidates", "20"])
    assert "sample cost (for `trajectory --for samples`): 8 paths x 20 candidate timesteps = 160 model calls" in \
        capsys.readouterr().out
    table = VarianceTable.load(table_dir)
    assert table.path_samples == 8 and table.provenance["sample_cost"]["model_calls"] == 160
    assert table.counts.tolist() == [4] * 50  # the moments are kept
    main(["precompute", model, "--data", str(model_dir / "images.pt"), "--out", str(table_dir), "--sample-cost-only",
          "--candidates", "20"])
    assert "already holds the sample cost of these settings; nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"already holds a sample cost of other settings \(candidates: 20 in the "
                                         r"table, 30 now; model_calls: 160 in the table, 240 now\); pass overwrite"):
        main(["precompute", model, "--data", str(model_dir / "images.pt"), "--out", str(table_dir),
              "--sample-cost-only", "--candidates", "30"])
    assert VarianceTable.load(table_dir).path_timesteps.size == 20  # refused: nothing written
    main(["precompute", model, "--data", str(model_dir / "images.pt"), "--out", str(table_dir), "--sample-cost-only",
          "--candidates", "30", "--overwrite"])
    assert VarianceTable.load(table_dir).provenance["sample_cost"]["candidates"] == 30
    main(["precompute", model, "--data", str(model_dir / "images.pt"), "--out", str(table_dir), "--sample-cost-only",
          "--candidates", "20", "--overwrite"])
    assert not (model_dir / "table.partial").exists()  # the checkpoint is removed after the write
    capsys.readouterr()
    main(["trajectory", "--table", str(table_dir), "--for", "samples", "--steps", "4", "6", "--json",
          str(model_dir / "s.json")])
    printed = capsys.readouterr().out
    report = json.loads((model_dir / "s.json").read_text())
    assert report["4"]["timesteps"] == sample_quality_trajectory(table, 4)
    assert "do not compare with trajectories" in printed
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=50)
    scheduler.set_timesteps(timesteps=report["6"]["timesteps"])
    assert scheduler.timesteps.tolist() == report["6"]["timesteps"]
    grid = model_dir / "samples.png"
    main(["sample", model, "--table", str(table_dir), "--steps", "4", "--trajectory", "samples", "--num-images", "2",
          "--out", str(grid)])
    assert f"trajectory: {sample_quality_trajectory(table, 4)}" in capsys.readouterr().out and grid.is_file()
    main(["sample", model, "--table", str(table_dir), "--steps", "4", "--num-images", "2", "--out", str(grid),
          "--overwrite"])
    trailing = DDIMScheduler(num_train_timesteps=50, timestep_spacing="trailing")
    trailing.set_timesteps(4)
    assert f"trajectory: {trailing.timesteps.tolist()}" in capsys.readouterr().out  # the default spacing
    with pytest.raises(SystemExit):
        main(["precompute", model, "--data", str(model_dir / "images.pt"), "--paths", "-1"])
    assert "argument --paths: '-1' is not a non-negative integer; pass 0 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no variance table in .* to add the sample cost to"):
        main(["precompute", model, "--data", str(model_dir / "images.pt"), "--out", str(model_dir / "empty"),
              "--sample-cost-only"])


def test_nll_states_the_end_of_its_trajectory(model_dir, capsys):
    model = str(model_dir / "model")
    main(["nll", model, "--data", str(model_dir / "images.pt"), "--variance", "beta", "--timesteps", "49,20,5"])
    assert "this trajectory ends at t_1 = 5: bits/dim compare only with trajectories that end at the same t_1 (" in \
        capsys.readouterr().out

