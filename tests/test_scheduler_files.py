"""The scheduler's files: a small strict-JSON config, the table beside it, round trips through save_pretrained /
from_pretrained (a folder, a subfolder, the Hub cache offline, a pipeline), the way back to Diffusers' schedulers, and
loading saved pipelines in a fresh process, with and without this package."""

from __future__ import annotations

import dataclasses
import gc
import inspect
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hub_configs import SD_V1_5  # noqa: E402

from analytic_sampler.schedule import alphas_cumprod_from_config  # noqa: E402
from analytic_sampler.schedulers import table_file as scheduler_table  # noqa: E402
from analytic_sampler.schedulers.analytic_dpm import AnalyticDPMScheduler  # noqa: E402
from analytic_sampler.schedulers.analytic_table import TABLE_FILE  # noqa: E402
from analytic_sampler.schedulers.table_file import SchedulerTable, TableFileMixin  # noqa: E402
from analytic_sampler.table import VarianceTable  # noqa: E402

N, C = 1000, 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reject(name):
    raise ValueError(f"bare {name} in JSON")


def strict(path) -> dict:
    with open(path) as f:
        return json.loads(f.read(), parse_constant=reject)


def channel_table(seed: int = 0) -> np.ndarray:
    """(C, N) moments with unestimated timesteps (NaN) off the 10-step trajectory of SD v1.5's spacing."""
    rows = np.stack([np.linspace(0.2, 0.999, N) * (1 + 0.001 * (c + seed)) for c in range(C)])
    rows[:, 5::111] = np.nan
    return rows


def latent_scheduler(seed: int = 0, **options) -> AnalyticDPMScheduler:
    """Stable Diffusion v1.5's config with a per-channel latent table (C = 4, N = 1000)."""
    rows = channel_table(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set_alpha_to_one
        return AnalyticDPMScheduler.from_config(
            SD_V1_5, channel_ms_eps=rows, channel_x0_mse=rows * 0.1, channel_ms_x0=[1.0, 0.9, 1.1, 0.8],
            per_channel=True, data_range=None, clip_sample=False, **options,
        )


def assert_same_table(a: AnalyticDPMScheduler, b: AnalyticDPMScheduler) -> None:
    for name in ("ms_eps", "x0_mse", "channel_ms_eps", "channel_x0_mse", "channel_ms_x0"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)  # NaN where not estimated
    assert a.ms_x0 == b.ms_x0


def test_config_is_small_strict_json_and_the_table_lives_beside_it(tmp_path):
    scheduler = latent_scheduler()
    scheduler.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [TABLE_FILE, "scheduler_config.json"]
    assert os.path.getsize(tmp_path / "scheduler_config.json") < 4096
    config, table = strict(tmp_path / "scheduler_config.json"), strict(tmp_path / TABLE_FILE)
    assert not any(isinstance(v, list) and len(v) > 3 for v in config.values())  # no arrays, only the sample shape
    assert config["table_file"] == TABLE_FILE and config["table_sha256"] == table["sha256"]
    assert table["channel_ms_eps"][0][5] is None  # unestimated: null, not a bare NaN
    assert len(repr(scheduler)) < 1500
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path)
    assert_same_table(scheduler, loaded)
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    for s in (scheduler, loaded):
        s.set_timesteps(10)
    np.testing.assert_array_equal(scheduler.step_coefficients(1.0).sigma, loaded.step_coefficients(1.0).sigma)


def test_the_config_holds_options_and_the_table_the_models_settings(tmp_path):
    """At most 20 config keys, all of them options; the data range, the data's second moment, the sample shape, the
    prediction type and the schedule fingerprint are the table's, read from it, kept through a save and a copy of the
    config, and a config that contradicts the table's prediction type is refused."""
    keys = [name for name in inspect.signature(AnalyticDPMScheduler.__init__).parameters if name != "self"]
    assert len(keys) <= 20 and {"table_file", "table_sha256", "timestep_spacing"} <= set(keys)
    rows = np.stack([np.linspace(0.2, 0.999, N) * (1 + 0.01 * c) for c in range(C)])
    abar = alphas_cumprod_from_config(SD_V1_5)
    table = VarianceTable(rows.mean(0), np.full(N, 1e-3), np.full(N, 10), abar, data_range=None,
                          x0_mse=rows.mean(0) * 0.1, x0_mse_stderr=np.full(N, 1e-4), channel_ms_eps=rows,
                          channel_stderr=rows * 0 + 1e-3, channel_x0_mse=rows * 0.1,
                          channel_x0_mse_stderr=rows * 0 + 1e-4,
                          provenance={"prediction_type": "v_prediction", "sample_shape": [C, 8, 8],
                                      "channel_ms_x0": [1.0, 0.9, 1.1, 0.8]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set_alpha_to_one
        scheduler = AnalyticDPMScheduler.from_table(table, SD_V1_5, per_channel=True)
    state = ("ms_eps", "x0_mse", "channel_ms_eps", "channel_x0_mse", "ms_x0", "channel_ms_x0", "data_range",
             "table_fingerprint", "table_sample_shape", "trajectory")
    assert not set(state) & set(scheduler.config)
    scheduler.save_pretrained(tmp_path)
    for s in (scheduler, AnalyticDPMScheduler.from_pretrained(tmp_path), AnalyticDPMScheduler.from_config(
            scheduler.config, eta=0.0)):
        assert s.config.prediction_type == s.table.prediction_type == "v_prediction"
        assert (s.table.data_range, s.table.sample_shape, s.table.fingerprint) == (None, (C, 8, 8), table.fingerprint)
        assert s.ms_x0 == pytest.approx(0.95, rel=1e-12) and s.table.sha256 == scheduler.table.sha256
    with pytest.raises(ValueError, match="estimated reading the model's output as prediction_type='v_prediction', "
                                         "but the scheduler config \\(or prediction_type=\\) says 'epsilon'"):
        AnalyticDPMScheduler.from_config(scheduler.config, prediction_type="epsilon")


@dataclasses.dataclass(eq=False)
class GainTable(SchedulerTable):
    """The per-model state of a made-up scheduler: one array."""

    describes = "gain table"
    gain: np.ndarray | None = None

    def __post_init__(self):
        self.gain = np.array(self.gain, dtype=np.float64)
        super().__post_init__()


class GainScheduler(TableFileMixin, SchedulerMixin, ConfigMixin):
    """Another scheduler that holds per-model statistics as state, as the next solver will: the table plumbing only."""

    table_type, table_file_name, table_hint = GainTable, "gain_table.json", "GainScheduler.from_table(table)"

    @register_to_config
    def __init__(self, scale: float = 1.0, table_file: str = "gain_table.json", table_sha256: str | None = None):
        self.table = self.held_table(table_sha256)

    @classmethod
    def from_table(cls, table: GainTable, **options) -> GainScheduler:
        return cls(table_sha256=table.hold().sha256, **options)


def test_the_table_file_serves_any_scheduler(tmp_path):
    gains = GainTable(gain=np.array([[1.0, np.nan], [3.0, -0.0]]))
    scheduler = GainScheduler.from_table(gains, scale=2.0)
    scheduler.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["gain_table.json", "scheduler_config.json"]
    assert strict(tmp_path / "gain_table.json")["gain"] == [[1.0, None], [3.0, -0.0]]
    loaded = GainScheduler.from_pretrained(tmp_path)
    assert loaded.config.scale == 2.0 and loaded.table.sha256 == gains.sha256
    np.testing.assert_array_equal(loaded.table.gain, gains.gain)
    assert GainScheduler.from_config(scheduler.config).table is gains  # the same process holds it
    with pytest.raises(ValueError, match="GainScheduler needs the model's gain table: build it with "
                                         "GainScheduler.from_table"):
        GainScheduler()
    with pytest.raises(TypeError, match="table_file_name='gains.safetensors': use a .json name"):
        type("Weights", (GainScheduler,), {"table_file_name": "gains.safetensors"})


def test_a_config_with_infinite_options_is_saved_as_strict_json(tmp_path):
    """DPM-Solver's config has lambda_min_clipped = -inf, which json writes as a bare -Infinity: left out."""
    DPMSolverMultistepScheduler(num_train_timesteps=N).save_pretrained(tmp_path / "dpm")
    config = DPMSolverMultistepScheduler.load_config(tmp_path / "dpm")  # as a Hub repo's config is read
    scheduler = AnalyticDPMScheduler.from_config(config, ms_eps=np.linspace(0.2, 0.999, N))
    assert scheduler.config.lambda_min_clipped == -math.inf
    scheduler.save_pretrained(tmp_path)
    assert "lambda_min_clipped" not in strict(tmp_path / "scheduler_config.json")
    back = DPMSolverMultistepScheduler.from_config(AnalyticDPMScheduler.from_pretrained(tmp_path).config)
    assert back.config.lambda_min_clipped == -math.inf


def test_going_back_to_ddim_logs_little_and_carries_no_arrays():
    scheduler = latent_scheduler()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = diffusers_logging.get_logger("diffusers.configuration_utils")
    logger.addHandler(handler)
    try:
        ddim = DDIMScheduler.from_config(scheduler.config)
    finally:
        logger.removeHandler(handler)
    assert 0 < len(stream.getvalue()) < 1024
    assert not any(isinstance(v, (list, tuple)) and len(v) > 3 for k, v in ddim.config.items() if k[0] != "_")
    ddim.set_timesteps(10)
    assert ddim.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]  # SD's spacing, kept


def test_round_trip_through_a_subfolder_and_overrides(tmp_path):
    scheduler = latent_scheduler(eta=0.3)
    scheduler.save_pretrained(tmp_path / "model" / "scheduler")
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path / "model", subfolder="scheduler", eta=0.7)
    assert loaded.config.eta == 0.7 and loaded.config.per_channel
    assert_same_table(scheduler, loaded)
    other = latent_scheduler(seed=5)
    replaced = AnalyticDPMScheduler.from_pretrained(tmp_path / "model", subfolder="scheduler",
                                                    channel_ms_eps=other.channel_ms_eps,
                                                    channel_x0_mse=other.channel_x0_mse)
    np.testing.assert_array_equal(replaced.channel_ms_eps, other.channel_ms_eps)  # arrays passed win over the file


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hub cache holding user/repo (a scheduler in scheduler/) at two commits, main and v1; offline mode on."""
    commits = {"main": "0123456789abcdef0123456789abcdef01234567", "v1": "89abcdef0123456789abcdef0123456789abcdef"}
    repo = tmp_path / "hub" / "models--user--repo"
    (repo / "refs").mkdir(parents=True)
    schedulers = {}
    for seed, (ref, commit) in enumerate(commits.items()):
        schedulers[ref] = latent_scheduler(seed=seed)
        schedulers[ref].save_pretrained(repo / "snapshots" / commit / "scheduler")
        (repo / "refs" / ref).write_text(commit)
    for name, value in (("HF_HUB_OFFLINE", True), ("HF_HUB_CACHE", str(tmp_path / "hub"))):
        monkeypatch.setenv(name, str(int(value)) if value is True else value)
        monkeypatch.setattr(huggingface_hub.constants, name, value)
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return huggingface_hub.hf_hub_download(*args, **kwargs)

    monkeypatch.setattr(scheduler_table, "hf_hub_download", spy)
    return schedulers, commits, calls


def test_round_trip_through_the_hub_cache_offline(hub_cache, tmp_path):
    schedulers, commits, calls = hub_cache
    for ref in ("main", "v1"):
        loaded = AnalyticDPMScheduler.from_pretrained("user/repo", subfolder="scheduler", revision=ref)
        assert_same_table(schedulers[ref], loaded)
        (args, kwargs) = calls[-1]
        assert args == ("user/repo", TABLE_FILE) and kwargs["subfolder"] == "scheduler"
        assert kwargs["revision"] == commits[ref]  # the table of the config's own commit
    os.remove(tmp_path / "hub" / "models--user--repo" / "snapshots" / commits["main"] / "scheduler" / TABLE_FILE)
    with pytest.raises(ValueError, match=f"could not get user/repo/scheduler/{TABLE_FILE}, the table file the "
                                         "scheduler config refers to .*upload the whole scheduler folder"):
        AnalyticDPMScheduler.from_pretrained("user/repo", subfolder="scheduler")


def test_broken_folders_are_refused_naming_the_fix(tmp_path):
    latent_scheduler().save_pretrained(tmp_path / "a")
    latent_scheduler(seed=3).save_pretrained(tmp_path / "b")
    shutil.copy(tmp_path / "b" / TABLE_FILE, tmp_path / "a" / TABLE_FILE)
    with pytest.raises(ValueError, match="holds another variance table than the scheduler config beside it names"
                                         ".*mixes files"):
        AnalyticDPMScheduler.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / TABLE_FILE).write_text('{"format": "analytic-sampler scheduler table", "ms_eps": [NaN]}')
    with pytest.raises(ValueError, match="unreadable variance table file .*NaN.*save the scheduler again"):
        AnalyticDPMScheduler.from_pretrained(tmp_path / "a")
    os.remove(tmp_path / "a" / TABLE_FILE)
    with pytest.raises(ValueError, match=f"refers to the table file {TABLE_FILE}, which is not in the folder: "
                                         "copy the whole scheduler folder"):
        AnalyticDPMScheduler.from_pretrained(tmp_path / "a")


def test_a_config_finds_its_table_in_this_process_only():
    scheduler = latent_scheduler()
    copy = AnalyticDPMScheduler.from_config(scheduler.config, eta=0.0)  # the usual way to change an option
    assert copy.config.eta == 0.0 and copy.channel_ms_eps is scheduler.channel_ms_eps
    config = dict(scheduler.config)
    del scheduler, copy
    gc.collect()
    with pytest.raises(ValueError, match="refers to the variance table .* which this process does not hold: load the "
                                         "scheduler with AnalyticDPMScheduler.from_pretrained"):
        AnalyticDPMScheduler.from_config(config)


def test_configs_saved_with_the_arrays_inside_still_load(tmp_path):
    """Earlier versions wrote the table into scheduler_config.json (NaN as a bare NaN), with the trajectory as an
    option of its own."""
    ms = np.linspace(0.3, 0.99, N)
    ms[5] = np.nan
    old = {"_class_name": "AnalyticDPMScheduler", "_diffusers_version": "0.42.1", "num_train_timesteps": N,
           "beta_schedule": "linear", "ms_eps": ms.tolist(), "x0_mse": (ms * 0.1).tolist(), "trajectory": "even",
           "timestep_spacing": None, "eta": 0.5, "variance": "residual", "data_range": None, "clip_sample": False,
           "table_sample_shape": [1, 8, 8]}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "scheduler_config.json").write_text(json.dumps(old))
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path / "old")
    np.testing.assert_array_equal(loaded.ms_eps, ms)
    assert loaded.config.variance == "residual" and "ms_eps" not in loaded.config and "trajectory" not in loaded.config
    assert loaded.config.timestep_spacing == "linspace"  # the even trajectory is Diffusers' linspace spacing
    assert (loaded.table.data_range, loaded.table.sample_shape) == (None, (1, 8, 8))  # the table's, now
    loaded.save_pretrained(tmp_path / "new")
    assert sorted(os.listdir(tmp_path / "new")) == [TABLE_FILE, "scheduler_config.json"]
    strict(tmp_path / "new" / "scheduler_config.json")


def test_pipeline_round_trip(tmp_path):
    pipe = DDPMPipeline(unet=tiny_unet(channels=3), scheduler=DDPMScheduler(num_train_timesteps=N))
    rows = np.stack([np.linspace(0.2, 0.999, N)] * 3)
    pipe.scheduler = AnalyticDPMScheduler.from_config(pipe.scheduler.config, channel_ms_eps=rows, per_channel=True,
                                                      channel_ms_x0=[0.5] * 3)
    pipe.save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is AnalyticDPMScheduler
    assert_same_table(pipe.scheduler, loaded.scheduler)
    images = [p(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                output_type="np").images for p in (pipe, loaded)]
    np.testing.assert_array_equal(*images)


LOADER = textwrap.dedent("""
    import importlib.abc, json, sys
    from diffusers import DDIMScheduler, DiffusionPipeline

    class NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "analytic_sampler":
                raise ModuleNotFoundError(f"No module named {name!r}")

    def attempt(folder, **kwargs):
        try:
            pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)
            return type(pipe.scheduler).__name__
        except Exception as err:
            return f"error: {type(err).__name__}: {err}"[:300]

    shared, ours, by_package, earlier = sys.argv[1:5]
    other = lambda folder: {"scheduler": DDIMScheduler.from_pretrained(folder, subfolder="scheduler")}
    blocker = NotInstalled()
    sys.meta_path.insert(0, blocker)
    results = {
        "shared": attempt(shared),
        "shared, scheduler=": attempt(shared, **other(shared)),
        "ours": attempt(ours),
        "ours, scheduler=": attempt(ours, **other(ours)),
        "by package": attempt(by_package),
        "imported": "analytic_sampler" in sys.modules,
    }
    sys.meta_path.remove(blocker)
    import analytic_sampler
    results["ours after import analytic_sampler"] = attempt(ours)
    results["by package after import analytic_sampler"] = attempt(by_package)
    results["earlier version's save after import analytic_sampler"] = attempt(earlier)
    from analytic_sampler import AnalyticDPMScheduler
    results["ours after importing AnalyticDPMScheduler"] = attempt(ours)
    print(json.dumps(results))
""")


def test_saved_pipelines_in_a_fresh_process(tmp_path):
    """The recommended layout (the model's own scheduler in model_index.json, the table in table/) loads without
    this package, also with another scheduler passed; a pipeline saved with AnalyticDPMScheduler does not, even
    then (Diffusers resolves every library model_index.json names), and loads after a plain `import analytic_sampler`."""
    unet, ddpm = tiny_unet(channels=1), DDPMScheduler(num_train_timesteps=N)
    shared = DDPMPipeline(unet=unet, scheduler=ddpm)
    shared.save_pretrained(tmp_path / "shared")
    abar = alphas_cumprod_from_config(ddpm.config)
    table = VarianceTable(np.linspace(0.2, 0.999, N), np.full(N, 1e-3), np.full(N, 10), abar, x0_clip=(-1.0, 1.0),
                          provenance={"prediction_type": "epsilon"})
    table.save(tmp_path / "shared" / "table")
    ours = DDPMPipeline(unet=unet, scheduler=AnalyticDPMScheduler.from_table(table, ddpm.config))
    ours.save_pretrained(tmp_path / "ours")
    shutil.copytree(tmp_path / "ours", tmp_path / "by_package")
    index = json.loads((tmp_path / "by_package" / "model_index.json").read_text())
    assert index["scheduler"] == ["analytic_sampler.schedulers.analytic_dpm", "AnalyticDPMScheduler"]
    index["scheduler"] = ["analytic_sampler", "AnalyticDPMScheduler"]
    (tmp_path / "by_package" / "model_index.json").write_text(json.dumps(index))
    shutil.copytree(tmp_path / "ours", tmp_path / "earlier")  # saved by a version whose scheduler module was this one
    index["scheduler"] = ["analytic_sampler.scheduler", "AnalyticDPMScheduler"]
    (tmp_path / "earlier" / "model_index.json").write_text(json.dumps(index))
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    folders = [str(tmp_path / n) for n in ("shared", "ours", "by_package", "earlier")]
    run = subprocess.run([sys.executable, "-c", LOADER, *folders],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert results["shared"] == "DDPMScheduler" and results["shared, scheduler="] == "DDIMScheduler"
    for key in ("ours", "ours, scheduler=", "by package"):
        assert results[key].startswith("error: ValueError: analytic_sampler"), (key, results[key])
        assert "has not been imported" in results[key], (key, results[key])
    assert results["imported"] is False
    # A plain `import analytic_sampler` is enough, as in earlier versions.
    assert results["ours after import analytic_sampler"] == "AnalyticDPMScheduler"
    assert results["earlier version's save after import analytic_sampler"] == "AnalyticDPMScheduler"
    # Diffusers finds no loading method through the package's top-level module, imported or not.
    assert "does not seem to have any of the loading methods" in results["by package after import analytic_sampler"]
    assert results["ours after importing AnalyticDPMScheduler"] == "AnalyticDPMScheduler"
    # With the package: the table from the shared layout, on the pipeline's own scheduler config.
    loaded = DDPMPipeline.from_pretrained(tmp_path / "shared")
    loaded.scheduler = AnalyticDPMScheduler.from_table(VarianceTable.load(tmp_path / "shared", subfolder="table"),
                                                       loaded.scheduler.config)
    np.testing.assert_array_equal(loaded.scheduler.ms_eps, table.ms_eps)
