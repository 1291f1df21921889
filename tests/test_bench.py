"""``analytic-sampler bench`` and ``nll`` on model folders the package has never seen, offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler
from PIL import Image

from analytic_sampler.commands.cli import main
from analytic_sampler.evaluation.frechet import FD_BOOTSTRAP, FrechetReference, frechet_with_stderr
from analytic_sampler.solver_statistics import SolverStatistics


def png_folder(folder, count: int, channels: int, seed: int) -> str:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (8, 8, channels), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(folder / f"{i:03d}.png")
    return str(folder)


def model_folder(root, channels: int) -> str:
    tiny_unet(channels=channels).save_pretrained(root / "model" / "unet")
    DDPMScheduler(num_train_timesteps=40).save_pretrained(root / "model" / "scheduler")
    return str(root / "model")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_bench_on_an_unseen_grey_model_writes_every_output(tmp_path, capsys):
    model = model_folder(tmp_path, 1)
    train, heldout = png_folder(tmp_path / "train", 24, 1, 0), png_folder(tmp_path / "heldout", 12, 1, 1)
    out = tmp_path / "report"
    main(["bench", model, "--data", train, "--eval-data", heldout, "--steps", "3", "5", "--out", str(out),
          "--table-samples", "4", "--solver-samples", "8", "--fd-samples", "16", "--batch-size", "64"])
    result = json.loads((out / "bench.json").read_text())
    assert result["table"].startswith("estimated here (4 images per timestep")
    assert result["solver_statistics"].startswith("estimated here (") and "K = 3, 5 on 32 paths" in \
        result["solver_statistics"]  # DPM-Solver-v3's statistics and fit, beside the table
    statistics = SolverStatistics.load(out / "table")
    assert statistics.num_samples == 8 and set(statistics.fitted_timesteps) == {"3", "5"}
    assert (out / "table" / "variance_table.json").is_file()  # the estimated table is kept beside the report
    rows = result["nll"]
    assert {"K", "trajectory", "variance", "bpd", "stderr"} <= set(rows[0])
    assert {(r["K"], r["trajectory"]) for r in rows} == {(3, "even"), (3, "optimal"), (5, "even"), (5, "optimal")}
    assert {r["variance"] for r in rows} == {"btilde", "beta", "analytic", "residual"}
    assert all(np.isfinite(r["bpd"]) and r["stderr"] > 0 and r["num_images"] == 12 for r in rows)
    quality = result["sample_quality"]
    assert quality["measure"] == "FD-digits" and quality["real_floor"]["num_images"] == 12
    assert {r["method"] for r in quality["rows"]} >= {"DDPM (btilde)", "Analytic-DDPM", "DDIM", "Analytic-DDIM"}
    assert all(r["num_samples"] == 16 and r["stderr"] > 0 for r in quality["rows"])
    assert {"device", "versions", "date"} <= set(result) and all("seconds" in r for r in rows + quality["rows"])
    # every deterministic row has its reference error, no stochastic one; the rows that read the table say so
    by_name = {(r["method"], r["K"]): r for r in quality["rows"]}
    for method in ("DDIM", "DPM-Solver++(2M)", "UniPC", "DPM-Solver++(2M) (fitted timesteps)", "DDIM (fitted timesteps)"):
        ref = by_name[(method, 5)]["ref_error"]
        assert ref["num_samples"] == 16 and ref["rms"] > 0 and ref["se"] > 0
    for method in ("DDPM (btilde)", "Analytic-DDPM", "Analytic-DDIM", "Euler ancestral"):
        assert by_name[(method, 5)]["ref_error"] is None
    assert by_name[("UniPC (fitted timesteps)", 3)]["uses_table"] and by_name[("Analytic-DDIM", 3)]["uses_table"]
    assert not by_name[("UniPC", 3)]["uses_table"] and quality["reference"]["steps"] == 40
    assert by_name[("DPM-Solver-v3", 5)]["timesteps"] == statistics.fitted_timesteps["5"]
    for name in ("bench.md", "bench_nll.png", "bench_fd.png"):
        assert (out / name).is_file()
    assert "| residual | optimal |" in capsys.readouterr().out

    # a second run reuses the table given with --table
    main(["bench", model, "--data", train, "--eval-data", heldout, "--steps", "3", "--out", str(tmp_path / "again"),
          "--table", str(out / "table"), "--fd-samples", "8", "--solver-samples", "0"])
    again = json.loads((tmp_path / "again" / "bench.json").read_text())
    assert again["table"] == "given" and "DPM-Solver-v3" in again["sample_quality"]["not_applicable"]


def test_bench_without_a_feature_extractor_says_why(tmp_path):
    model = model_folder(tmp_path, 3)
    train, heldout = png_folder(tmp_path / "train", 8, 3, 0), png_folder(tmp_path / "heldout", 6, 3, 1)
    out = tmp_path / "report"
    main(["bench", model, "--data", train, "--eval-data", heldout, "--steps", "3", "--out", str(out),
          "--table-samples", "2"])
    quality = json.loads((out / "bench.json").read_text())["sample_quality"]
    assert quality["rows"] == [] and "no feature extractor for 3x8x8 images" in quality["skipped"]
    assert "--inception PATH" in (out / "bench.md").read_text()


class FakeInception(torch.nn.Module):
    """The interface of NVIDIA's inception-2015-12-05.pt: uint8 (N, 3, H, W) in, pool features out."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = x.float() / 255.0
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), x.amax((2, 3))], 1)


def test_bench_with_a_local_inception_network(tmp_path):
    model = model_folder(tmp_path, 3)
    torch.jit.script(FakeInception()).save(str(tmp_path / "inception.pt"))
    train, heldout = png_folder(tmp_path / "train", 10, 3, 0), png_folder(tmp_path / "heldout", 6, 3, 1)
    out = tmp_path / "report"
    main(["bench", model, "--data", train, "--eval-data", heldout, "--steps", "3", "--out", str(out),
          "--table-samples", "2", "--inception", str(tmp_path / "inception.pt")])
    quality = json.loads((out / "bench.json").read_text())["sample_quality"]
    assert quality["measure"] == "Inception FID" and len(quality["rows"]) >= 4 and quality["num_samples"] == 10


def test_bench_refuses_bad_input_before_any_work(tmp_path):
    model = model_folder(tmp_path, 1)
    torch.save(torch.rand(4, 3, 8, 8) * 2 - 1, tmp_path / "rgb.pt")
    rgb, grey = str(tmp_path / "rgb.pt"), png_folder(tmp_path / "grey", 4, 1, 0)
    with pytest.raises(SystemExit, match="holds images of shape \\(4, 3, 8, 8\\) but the model takes .*1 channel"):
        main(["bench", model, "--data", rgb, "--eval-data", grey, "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--eval-data .* holds images of shape"):
        main(["bench", model, "--data", grey, "--eval-data", rgb, "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="steps \\[10, 25, 50, 100\\]: each K must be between 2 and the model's "
                                         "num_train_timesteps=40"):
        main(["bench", model, "--data", grey, "--eval-data", grey, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x" / "table").exists()
    with pytest.raises(SystemExit, match="--inception .*no such file"):
        main(["bench", model, "--data", grey, "--eval-data", grey, "--steps", "3", "--out", str(tmp_path / "x"),
              "--table-samples", "2", "--inception", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit):
        main(["bench", model, "--data", grey, "--eval-data", grey, "--steps", "1"])


def test_nll_command_on_an_unseen_model(tmp_path, capsys):
    model = model_folder(tmp_path, 1)
    heldout = png_folder(tmp_path / "heldout", 6, 1, 1)
    main(["nll", model, "--data", heldout, "--steps", "4", "--variance", "beta"])
    assert "bits/dim (beta variance, K=4, 6 images" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="ships no variance table: run `analytic-sampler precompute"):
        main(["nll", model, "--data", heldout, "--variance", "residual"])
    with pytest.raises(SystemExit, match="--timesteps '5,9,0'.*strictly descending"):
        main(["nll", model, "--data", heldout, "--variance", "beta", "--timesteps", "5,9,0"])


def test_frechet_reference_equals_the_sqrtm_formula():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    ref, other = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)), rng.standard_normal((300, 6)) + 0.3
    s1, s2 = np.cov(other, rowvar=False), np.cov(ref, rowvar=False)
    expected = np.sum((other.mean(0) - ref.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert FrechetReference.of(ref).distance(other) == pytest.approx(expected, rel=1e-8)


def test_bootstrap_stderr_shrinks_with_more_samples():
    rng = np.random.default_rng(0)
    reference = FrechetReference.of(rng.standard_normal((5000, 4)))
    small = frechet_with_stderr(rng.standard_normal((50, 4)), reference)[1]
    large = frechet_with_stderr(rng.standard_normal((2000, 4)), reference)[1]
    assert FD_BOOTSTRAP >= 50 and 0 < large < small / 3


def test_nll_rows_evaluate_the_full_chain_once(tmp_path):
    """At K = N the optimal trajectory is the even one: both rows come from one pass of model calls."""
    from analytic_sampler.commands.bench import nll_rows
    from analytic_sampler.estimation.moments import EstimateOptions, estimate_moments
    from analytic_sampler.pretrained import load_pretrained

    model = load_pretrained(model_folder(tmp_path, 1))
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    table = estimate_moments(model.unet, images, model.scheduler, num_samples=2,
                             options=EstimateOptions(progress=False))
    calls = []
    unet_forward = model.unet.forward
    model.unet.forward = lambda *a, **k: calls.append(1) or unet_forward(*a, **k)
    rows = nll_rows(model, table, images, [40], batch_size=4)
    even = {r["variance"]: r for r in rows if r["trajectory"] == "even"}
    optimal = {r["variance"]: r for r in rows if r["trajectory"] == "optimal"}
    assert set(even) == set(optimal) and len(calls) == 40
    assert all(even[v]["bpd"] == optimal[v]["bpd"] and even[v]["timesteps"] == list(range(39, -1, -1)) for v in even)


def test_bench_scores_an_adapter_in_its_nll_rows(tmp_path):
    """BenchOptions(eps_model=adapter): the NLL rows are the adapter's (here a shifted timestep convention), exactly as
    nll_bpd scores it; sample quality is skipped, said so; the estimated table's checkpoint is gone."""
    from analytic_sampler.adapter import EpsilonAdapter
    from analytic_sampler.commands.bench import BenchOptions, run_bench
    from analytic_sampler.evaluation.likelihood import NLLOptions, nll_bpd
    from analytic_sampler.pretrained import PretrainedModel
    from analytic_sampler.table import VarianceTable

    scheduler = DDPMScheduler(num_train_timesteps=40)
    model = PretrainedModel(tiny_unet(channels=1), scheduler, None, str(tmp_path / "model"))
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    shifted = EpsilonAdapter(model.unet, scheduler, timestep_shift=1)
    result = run_bench(model, images, images[:8], [3], tmp_path / "out",
                       BenchOptions(table_samples=4, batch_size=64, progress=False, eps_model=shifted))
    assert result["sample_quality"]["skipped"].startswith("sample quality skipped: the NLL rows score the eps_model")
    row = next(r for r in result["nll"] if r["trajectory"] == "even" and r["variance"] == "analytic")
    table = VarianceTable.load(tmp_path / "out" / "table")
    same = dict(ms_eps=table.ms_eps, batch_size=64, options=NLLOptions(ms_x0=table.ms_x0, progress=False))  # as bench
    assert table.ms_x0 is not None
    expected = nll_bpd(shifted, images[:8], scheduler, row["timesteps"], "analytic", **same)
    bare = nll_bpd(model.unet, images[:8], scheduler, row["timesteps"], "analytic", **same)
    assert row["bpd"] == expected.mean != bare.mean
    assert not (tmp_path / "out" / "table.partial").exists()
def test_bench_ranks_the_peers_from_the_same_initial_noise(tmp_path):
    """Diffusers' peers on the model's own config and Analytic-DPM's variants (plus a scheduler added by name) each
    give a row with its difference to the best row, its paired standard error and the timesteps it ran; every
    sampler starts from the same initial noise."""
    from analytic_sampler import EstimateOptions
    from analytic_sampler.commands.bench import BenchOptions, run_bench
    from analytic_sampler.estimation.solver_statistics import StatisticsOptions, estimate_solver_statistics
    from analytic_sampler.evaluation.baselines import BENCH_METHODS
    from analytic_sampler.pretrained import load_pretrained

    model = load_pretrained(model_folder(tmp_path, 1))
    train = torch.rand(24, 1, 8, 8) * 2 - 1
    first_inputs, forward = [], model.unet.forward

    def recording(sample, timestep, *args, **kwargs):
        if sample.shape[0] == 16:  # the FD cells' batch (the table's and the NLL's batches are larger)
            first_inputs.append(sample.clone())
        return forward(sample, timestep, *args, **kwargs)

    statistics = estimate_solver_statistics(model.unet, train, model.scheduler, StatisticsOptions(
        grid_points=6, num_samples=8, groups=2, batch_size=64), EstimateOptions(progress=False))
    model.unet.forward = recording
    result = run_bench(model, train, train[:12], [3], tmp_path / "out", BenchOptions(
        table_samples=4, fd_samples=16, batch_size=64, progress=False, schedulers=["EulerDiscreteScheduler"],
        solver_statistics=statistics))
    rows = result["sample_quality"]["rows"]
    assert [r["method"] for r in rows] == [*BENCH_METHODS, "EulerDiscreteScheduler"]
    best = min(rows, key=lambda r: r["fd"])
    for r in rows:
        assert r["best"] == best["method"] and r["diff_to_best"] == pytest.approx(r["fd"] - best["fd"])
        assert (r["diff_stderr"] == 0) == (r is best) and r["diff_stderr"] >= 0 and r["stderr"] > 0
    ran = {r["method"]: r["timesteps"] for r in rows}
    assert ran["DDIM"] == [26, 13, 0] and ran["DPM-Solver++(2M)"] == [30, 20, 10]  # each on the config's "leading"
    assert ran["Analytic-DDPM"] == [26, 13, 0] and ran["Analytic-DDPM (optimal trajectory)"][0] == 39
    v3 = next(r for r in rows if r["method"] == "DPM-Solver-v3")  # no fitted timesteps: its logsnr spacing
    assert ran["DPM-Solver-v3"][0] == 39 and v3["uses_table"] and v3["ref_error"]["rms"] > 0
    # one recorded model input per model call: split them into runs by the timesteps each row ran
    # then the reference solve of the deterministic rows' reference errors, from the same noise
    starts = np.cumsum([0] + [len(r["timesteps"]) for r in rows])
    initial = [first_inputs[i] for i in starts]
    assert len(first_inputs) == sum(len(r["timesteps"]) for r in rows) + result["sample_quality"]["reference"]["steps"]
    unit = [x / x.norm() for x in initial]  # Euler-type schedulers scale x_T: compare directions
    assert all(torch.allclose(u, unit[0], atol=1e-6) for u in unit)
    text = (tmp_path / "out" / "bench.md").read_text()
    assert "difference to the best row ± paired standard error" in text and "| best |" in text
    assert "every row here ends at t_1 = 0" in text


def test_bench_refuses_an_unknown_scheduler_name(tmp_path):
    model = model_folder(tmp_path, 1)
    grey = png_folder(tmp_path / "grey", 4, 1, 0)
    with pytest.raises(SystemExit, match="'HeunScheduler' is neither a compared sampler .* did you mean"):
        main(["bench", model, "--data", grey, "--eval-data", grey, "--steps", "3", "--out", str(tmp_path / "x"),
              "--table-samples", "2", "--scheduler", "HeunScheduler"])
    assert not (tmp_path / "x" / "table").exists()  # refused before the table is estimated
