"""Bad input on the model-loading paths gets a clear error that names the fix, at once and offline."""

from __future__ import annotations

import re
import time
from pathlib import Path

import diffusers
import huggingface_hub.constants
import pytest
from diffusers import DDPMScheduler

from analytic_sampler import AnalyticDPMScheduler
from analytic_sampler.pretrained import BUNDLED_MODELS, load_pretrained, looks_like_path

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize(
    "name, is_path",
    [("digits-ddpm-lineer", False), ("someone/model", False), ("./model", True), ("~/model", True),
     ("/abs/model", True), ("model/", True), ("a/b/c", True), ("my model/x", True), ("tables\\x", True)],
)
def test_what_looks_like_a_path(name, is_path):
    assert looks_like_path(name) is is_path


def test_local_folder_name_looks_like_a_path_when_its_first_part_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("tables/x")
    (tmp_path / "tables").mkdir()
    assert looks_like_path("tables/x")


@pytest.mark.parametrize("name", ["digits-ddpm-lineer", "digits_iddpm_cosine", "mymodel"])
def test_unknown_model_name_fails_at_once_listing_the_bundled_models(name):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="is not a bundled model.*, a local folder or a Hub repo id") as info:
        load_pretrained(name)
    assert time.perf_counter() - start < 0.5  # no network retries
    message = str(info.value)
    assert all(bundled in message for bundled in BUNDLED_MODELS)
    assert "a local folder with unet/ and scheduler/ subfolders" in message and "Hub repo id 'owner/name'" in message
    if name.startswith("digits"):
        assert re.search(r"did you mean 'digits-(ddpm-linear|iddpm-cosine)'\?", message)


@pytest.mark.parametrize("name", ["./missing", "~/no-such-analytic-model", "missing/", "a/b/c", "models/x"])
def test_missing_local_path_is_no_such_folder_not_a_repo_id(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=f"no such folder: {re.escape(repr(name))}.*local folder with unet/"):
        load_pretrained(name)
    assert time.perf_counter() - start < 0.5


def test_folder_without_unet_and_scheduler_is_refused(tmp_path):
    (tmp_path / "scheduler").mkdir()
    with pytest.raises(ValueError, match="is not a model folder: it has no unet/; pass a bundled model"):
        load_pretrained(tmp_path)


def test_uncached_repo_id_offline_names_the_repo_and_the_fix(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"cannot load Hub repo 'someone/not-cached' \(HF_HUB_OFFLINE is set") as info:
        load_pretrained("someone/not-cached")
    assert time.perf_counter() - start < 10  # the cache lookup only, no network
    assert "`hf download someone/not-cached`" in str(info.value) and BUNDLED_MODELS[0] in str(info.value)


def test_repo_id_the_hub_does_not_have_names_the_repo_and_the_fix(monkeypatch):
    def not_found(*args, **kwargs):
        raise OSError("someone/typo is not a valid model identifier listed on 'https://huggingface.co/models'")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(diffusers.UNet2DModel, "from_pretrained", not_found)
    with pytest.raises(ValueError, match=r"cannot load Hub repo 'someone/typo' \(OSError: .*not a valid model") as info:
        load_pretrained("someone/typo")
    assert "Check the repo id, the revision and your connection" in str(info.value)


def test_negative_ms_eps_is_refused():
    config = DDPMScheduler(num_train_timesteps=10).config
    with pytest.raises(ValueError, match=r"ms_eps has negative entries \(min -0.1\), but it is a mean square"):
        AnalyticDPMScheduler.from_config(config, ms_eps=[0.5] * 9 + [-0.1])


def test_readme_quick_start_runs_as_written(tmp_path, monkeypatch):
    section = README.read_text().split("\n## Quick start\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # the snippet writes tables/my-model
    namespace: dict = {}
    exec(compile(code, f"{README} (Quick start)", "exec"), namespace)
    assert len(namespace["images"]) == 1 and (tmp_path / "tables" / "my-model").is_dir()
    assert namespace["pipe"].scheduler.trajectory[0] == 999
