"""What the commands write: nothing replaced without --overwrite, files with ordinary permissions, reports that
read well (no machine paths, btilde apart in the NLL plot, a visible sample grid, honest table labels), and the
CPU threads they run on."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler
from PIL import Image

from analytic_sampler.commands import bench, runtime
from analytic_sampler.commands.cli import main
from analytic_sampler.evaluation.sampling import save_grid
from analytic_sampler.pretrained import load_pretrained
from analytic_sampler.table import VarianceTable


@pytest.fixture
def model(tmp_path) -> str:
    tiny_unet(channels=1).save_pretrained(tmp_path / "model" / "unet")
    DDPMScheduler(num_train_timesteps=20).save_pretrained(tmp_path / "model" / "scheduler")
    return str(tmp_path / "model")


def keep(path, text: str = "earlier results") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


@pytest.mark.parametrize(("argv", "existing", "listed"), [
    (["sample", "--out", "{d}/grid.png"], "grid.png",
     "--out {d}/grid.png already exists (from an earlier run); pass --overwrite to replace it, or choose another --out."),
    (["bench", "digits-ddpm-linear", "--data", "digits:train", "--eval-data", "digits:heldout", "--out", "{d}"],
     "bench.md", "--out {d} already holds bench.md (from an earlier run); pass --overwrite to replace them"),
    (["demo", "--out", "{d}"], "table/variance_table.safetensors",
     "--out {d} already holds table/variance_table.safetensors (from an earlier run); pass --overwrite"),
    (["precompute", "digits-ddpm-linear", "--data", "digits:train", "--out", "{d}"], "variance_table.json",
     "{d} already holds a variance table that does not load: {d}/variance_table.safetensors: file not found."),
])
def test_earlier_results_are_never_replaced_without_overwrite(tmp_path, argv, existing, listed):
    folder = tmp_path / "out"
    text = keep(folder / existing)
    with pytest.raises(SystemExit) as err:
        main([a.format(d=folder) for a in argv])
    assert f"error: {listed.format(d=folder)}" in str(err.value)
    assert (folder / existing).read_text() == text and len(list(folder.rglob("*.*"))) == 1


def test_sample_overwrites_when_asked_and_writes_a_visible_grid(model, tmp_path):
    table = tmp_path / "table"
    main(["precompute", model, "--fit-paths", "0",
          "--data", "digits:train", "--num-samples", "2", "--timesteps", "all", "--out",
          str(table)])
    assert not (tmp_path / "table.partial").exists()  # the checkpoint is removed once the table is saved
    out = tmp_path / "grid.png"
    keep(out)
    main(["sample", model, "--table", str(table), "--steps", "3", "--num-images", "64", "--out", str(out),
          "--overwrite"])
    assert Image.open(out).size == (8 * 73, 8 * 73)  # 8x8 tiles of 8x8 images, enlarged 8x: 584 px, not 73


def test_grids_of_large_images_keep_their_size(tmp_path):
    path = save_grid(torch.zeros(4, 3, 300, 300), tmp_path / "grid.png", nrow=2)
    assert Image.open(path).size == (603, 603)  # 2 x 300 + 3 separating lines, not enlarged


def test_tables_and_results_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        abar = np.linspace(0.99, 0.01, 10)
        VarianceTable(np.full(10, 0.5), np.full(10, 0.01), np.full(10, 3), abar).save(tmp_path / "t")
    finally:
        os.umask(old)
    for path in (tmp_path / "t").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def nll_result(model_name: str) -> dict:
    rows = [{"K": k, "trajectory": trajectory, "variance": variance, "bpd": bpd * (20 / k), "stderr": 0.01,
             "t_1": 0}
            for k in (10, 25) for trajectory in ("even", "optimal")
            for variance, bpd in (("btilde", 205.0), ("beta", 6.5), ("analytic", 5.3), ("residual", 5.1))]
    return {"model": model_name, "nll": rows, "sample_quality": {"rows": []}}


def test_nll_plot_puts_btilde_on_its_own_panel(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    seen = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: seen.update(
        {str(path): [(ax.get_title(), sorted(t.get_text() for t in ax.get_legend().get_texts())) for ax in fig.axes]}))
    bench.plot(nll_result("my-model"), tmp_path)
    (main_panel, main_labels), (side_panel, side_labels) = seen[str(tmp_path / "bench_nll.png")]
    assert main_panel == "my-model" and not any("btilde" in label for label in main_labels)
    assert len(main_labels) == 6 and side_labels == ["btilde (even)", "btilde (optimal)"]
    assert side_panel == "btilde: own scale (log)"


def test_reports_name_the_model_without_machine_paths(model):
    loaded = load_pretrained(model)
    assert loaded.name == "model" and not loaded.is_bundled
    bundled = load_pretrained("digits-ddpm-linear")
    assert bundled.name == "digits-ddpm-linear" and bundled.is_bundled
    text = bench.markdown({**nll_result(bundled.name), "steps": [10, 25], "table": "shipped with the model",
                           "table_samples_per_timestep": 200, "seed": 0, "eval_images": 297,
                           "sample_quality": {"skipped": "sample quality skipped", "rows": []}, "seconds_total": 1,
                           "device": "cpu", "python": "3", "versions": {"torch": "", "diffusers": "",
                                                                         "analytic_sampler": ""}, "date": ""})
    assert text.startswith("# bench: digits-ddpm-linear\n")


def test_bench_labels_a_table_by_where_it_came_from(model, tmp_path):
    loaded = load_pretrained(model)
    abar = loaded.scheduler.alphas_cumprod.double().numpy()
    ms = np.full(20, 0.5)
    VarianceTable(ms, ms * 0.01, np.full(20, 4), abar, x0_mse=ms * 0.1, x0_mse_stderr=ms * 0.001,
                  provenance={"data": "my_images/"}).save(os.path.join(model, "table"))
    _, label = bench.bench_table(load_pretrained(model), None, tmp_path)
    assert label == "the model's table/ folder (estimated on my_images/)"
    _, label = bench.bench_table(load_pretrained("digits-ddpm-linear"), None, tmp_path)
    assert label == "shipped with the model"


def test_loading_a_model_says_nothing_about_accelerate(model, capfd):
    load_pretrained(model)
    assert "accelerate" not in capfd.readouterr().err


def test_threads_default_to_the_cores_this_process_may_use(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime, "CGROUP_QUOTA_FILES", ())
    monkeypatch.setattr(runtime, "CGROUP_V1_FILES", (tmp_path / "no-quota", tmp_path / "no-period"))
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert runtime.available_cores() == 8 and runtime.thread_cap() is None  # the whole machine: torch's default
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3})
    assert runtime.thread_cap() == 2  # taskset / cpuset
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # docker --cpus 1.5
    monkeypatch.setattr(runtime, "CGROUP_QUOTA_FILES", (quota,))
    assert runtime.available_cores() == 2 and runtime.thread_cap() == 2
    quota.write_text("max 100000\n")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node 4 on 8 cores
    assert runtime.thread_cap() == 2


def test_threads_option_env_and_wait_policy(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        runtime.configure_threads(3)
        assert torch.get_num_threads() == 3 and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
        torch.set_num_threads(1)
        monkeypatch.setattr(runtime, "thread_cap", lambda: 2)
        runtime.configure_threads(None)  # OMP_NUM_THREADS set: the user's choice stands
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
        runtime.configure_threads(None)  # a cap never raises the count
        assert torch.get_num_threads() == 1 and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    finally:
        torch.set_num_threads(before)


def test_threads_reach_the_command(model, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    try:
        main(["precompute", model, "--fit-paths", "0",
              "--data", "digits:train", "--num-samples", "1", "--timesteps", "even:2",
              "--out", str(tmp_path / "t"), "--threads", "2"])
        assert torch.get_num_threads() == 2
        assert json.loads((tmp_path / "t" / "variance_table.json").read_text())["num_train_timesteps"] == 20
    finally:
        torch.set_num_threads(before)
