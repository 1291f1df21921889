import json
import os

import huggingface_hub
import numpy as np
import pytest
from diffusers import DDPMScheduler

import analytic_sampler.table as table_module
from analytic_sampler.schedule import alphas_cumprod_from_config, schedule_fingerprint
from analytic_sampler.table import VarianceTable

N = 50
ABAR = alphas_cumprod_from_config({"num_train_timesteps": N, "beta_schedule": "linear"})


def draws(n=40, seed=0):
    """Draws m[t, i] and a mask of the ones taken: all, except at timesteps 3 and 7."""
    m = np.random.default_rng(seed).uniform(0.2, 1.0, size=(N, n))
    taken = np.ones((N, n), dtype=bool)
    taken[[3, 7]] = False
    return m, taken


def table_from(m, taken, **kwargs):
    """A table from draws m of ||eps||^2/d and, from the same draws, e = (1.2 - m)^2 of ||x0 - x0_hat||^2/d."""
    e = (1.2 - m) ** 2
    sums = [(v * taken).sum(1) for v in (m, m**2, e, e**2)]
    return VarianceTable.from_sums(*sums[:2], taken.sum(1), ABAR, *sums[2:], **{"x0_clip": (-1, 1), **kwargs})


@pytest.fixture
def table():
    return table_from(*draws(), provenance={"model_id": "user/model", "seed": 0})


def assert_same(a, b):
    for key in ("ms_eps", "stderr", "x0_mse", "x0_mse_stderr", "counts", "alphas_cumprod"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert (a.data_range, a.x0_clip, a.fingerprint, a.provenance) == (b.data_range, b.x0_clip, b.fingerprint, b.provenance)


def test_statistics_and_properties(table):
    m = draws()[0]
    np.testing.assert_allclose(table.ms_eps[0], m[0].mean(), rtol=1e-12)
    np.testing.assert_allclose(table.stderr[0], m[0].std(ddof=1) / np.sqrt(m.shape[1]), rtol=1e-9)
    e = (1.2 - m[0]) ** 2
    np.testing.assert_allclose(table.x0_mse[0], e.mean(), rtol=1e-12)
    np.testing.assert_allclose(table.x0_mse_stderr[0], e.std(ddof=1) / np.sqrt(m.shape[1]), rtol=1e-9)
    assert np.isnan(table.x0_mse[3]) and table.has_x0_mse and table.x0_clip == (-1.0, 1.0)
    assert np.isnan(table.ms_eps[3]) and np.isnan(table.stderr[7]) and table.counts[3] == 0
    assert table.num_train_timesteps == N and table.estimated.sum() == N - 2
    assert table.fingerprint == schedule_fingerprint(ABAR)
    assert repr(table).startswith("VarianceTable(N=50, estimated=48, draws/timestep=40-40")
    assert "model_id='user/model'" in repr(table)


def test_save_load_round_trip(tmp_path, table):
    table.save(tmp_path / "t")
    assert sorted(os.listdir(tmp_path / "t")) == ["variance_table.json", "variance_table.safetensors"]
    assert_same(VarianceTable.load(tmp_path / "t"), table)
    table.data_range = None
    table.save(tmp_path / "u")
    assert_same(VarianceTable.load(str(tmp_path), subfolder="u"), table)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, table):
    """A Hub cache holding user/repo at one commit, tables in a subfolder; offline mode on."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--user--repo"
    table.save(repo / "snapshots" / commit / "tables")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return huggingface_hub.hf_hub_download(*args, **kwargs)

    monkeypatch.setattr(table_module, "hf_hub_download", spy)
    return commit, calls


def test_load_from_hub_cache_offline(offline_cache, table):
    commit, calls = offline_cache
    assert_same(VarianceTable.load("user/repo", subfolder="tables"), table)
    assert {c[0][1] for c in calls} == {"variance_table.json", "variance_table.safetensors"}
    assert all(c[1]["subfolder"] == "tables" for c in calls)
    assert_same(VarianceTable.load("user/repo", subfolder="tables", revision=commit), table)


def test_hub_errors(offline_cache):
    with pytest.raises(ValueError, match="could not get user/repo/other/variance_table.json from the Hugging Face Hub"):
        VarianceTable.load("user/repo", subfolder="other")
    with pytest.raises(ValueError, match="neither a local folder nor a valid Hub repo id"):
        VarianceTable.load("no/such/folder")


def test_push_to_hub_uploads_both_files(monkeypatch, table):
    log = {}

    class FakeApi:
        def __init__(self, token=None):
            log["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            log["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, path_in_repo, commit_message):
            log["upload"] = (repo_id, path_in_repo, commit_message, sorted(os.listdir(folder_path)))
            log["table"] = VarianceTable.load(folder_path)
            return "commit-info"

    monkeypatch.setattr(table_module, "HfApi", FakeApi)
    assert table.push_to_hub("user/repo", subfolder="tables", private=True, token="tok") == "commit-info"
    assert log["token"] == "tok" and log["create"] == ("user/repo", True, True)
    assert log["upload"] == ("user/repo", "tables", "Upload variance table",
                             ["variance_table.json", "variance_table.safetensors"])
    assert_same(log["table"], table)


def test_corrupted_and_missing_files(tmp_path, table):
    folder = table.save(tmp_path / "t")
    arrays, meta = os.path.join(folder, "variance_table.safetensors"), os.path.join(folder, "variance_table.json")
    blob = open(arrays, "rb").read()
    with open(arrays, "wb") as f:
        f.write(blob[:-16] + b"\0" * 16)
    with pytest.raises(ValueError, match=r"variance_table.safetensors: checksum does not match.*download it again"):
        VarianceTable.load(folder)
    with open(arrays, "wb") as f:
        f.write(b"garbage")
    record = json.load(open(meta))
    record["arrays_sha256"] = table_module._sha256(arrays)
    json.dump(record, open(meta, "w"))
    with pytest.raises(ValueError, match=r"variance_table.safetensors: unreadable safetensors file.*re-estimate"):
        VarianceTable.load(folder)
    with open(meta, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=r"variance_table.json: not valid JSON"):
        VarianceTable.load(folder)
    os.remove(arrays)
    with pytest.raises(ValueError, match=r"variance_table.safetensors: file not found"):
        VarianceTable.load(folder)


def test_mismatched_metadata(tmp_path, table):
    folder = table.save(tmp_path / "t")
    meta = os.path.join(folder, "variance_table.json")
    record = json.load(open(meta))
    json.dump({**record, "fingerprint": "N50-0000"}, open(meta, "w"))
    with pytest.raises(ValueError, match=r"variance_table.safetensors: fingerprint 'N50-0000' does not match"):
        VarianceTable.load(folder)
    json.dump({**record, "num_train_timesteps": 60}, open(meta, "w"))
    with pytest.raises(ValueError, match=r"array 'ms_eps' missing or not float64\[60\]"):
        VarianceTable.load(folder)
    json.dump({**record, "format_version": 99}, open(meta, "w"))
    with pytest.raises(ValueError, match=r"table format version 99, this package reads versions \(1, 2, 3, 4\); "):
        VarianceTable.load(folder)


def test_check_schedule(table):
    assert table.check_schedule(DDPMScheduler(num_train_timesteps=N)) is table
    assert table.check_schedule(ABAR.astype(np.float32)) is table
    cosine = DDPMScheduler(num_train_timesteps=N, beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match=r"estimated for schedule N50-\w+, the scheduler uses N50-\w+; estimate a"):
        table.check_schedule(cosine)
    with pytest.raises(ValueError, match=r"the scheduler uses N1000-"):
        table.check_schedule(DDPMScheduler(num_train_timesteps=1000))


def test_invalid_arrays():
    m, taken = draws()
    ms, counts = m.mean(1), taken.sum(1)
    with pytest.raises(ValueError, match="ms_eps has 10 entries but the schedule has num_train_timesteps=50"):
        VarianceTable(ms[:10], ms, counts, ABAR)
    ms[5] = np.nan
    with pytest.raises(ValueError, match=r"ms_eps is NaN/inf at 1 needed timestep\(s\) \(5\)"):
        VarianceTable(ms, ms, counts, ABAR)
    with pytest.raises(ValueError, match="counts must be 50 non-negative integers"):
        VarianceTable(ms, ms, counts[:-1], ABAR)
    with pytest.raises(ValueError, match=r"data_range=\(1.0, -1.0\) must be \(low, high\)"):
        VarianceTable(m.mean(1), ms, counts, ABAR, data_range=(1.0, -1.0))


def test_merge_equals_pooled_estimate():
    m, taken = draws()
    first = taken.copy()
    first[10:20, 15:] = False  # an uneven split of the draws at timesteps 10..19
    a = table_from(m, first, provenance={"model_id": "x", "seed": 0})
    b = table_from(m, taken & ~first, provenance={"model_id": "x", "seed": 1})
    pooled, merged = table_from(m, taken), a.merge(b)
    np.testing.assert_array_equal(merged.counts, pooled.counts)
    np.testing.assert_allclose(merged.ms_eps, pooled.ms_eps, rtol=1e-12)
    np.testing.assert_allclose(merged.stderr, pooled.stderr, rtol=1e-9)
    np.testing.assert_allclose(merged.x0_mse, pooled.x0_mse, rtol=1e-12)
    np.testing.assert_allclose(merged.x0_mse_stderr, pooled.x0_mse_stderr, rtol=1e-9)
    old = VarianceTable(b.ms_eps, b.stderr, b.counts, ABAR)  # a table without x0_mse
    assert not a.merge(old).has_x0_mse and np.allclose(a.merge(old).ms_eps, merged.ms_eps, rtol=1e-12, equal_nan=True)
    assert merged.provenance["model_id"] == "x" and "seed" not in merged.provenance
    assert [p["seed"] for p in merged.provenance["merged_from"]] == [0, 1]
    with pytest.raises(ValueError, match=r"cannot merge tables with data_range \(-1.0, 1.0\) and None"):
        a.merge(VarianceTable(a.ms_eps, a.stderr, a.counts, ABAR, data_range=None))
    with pytest.raises(ValueError, match="estimated for schedule"):
        a.merge(VarianceTable(a.ms_eps[:10], a.stderr[:10], a.counts[:10], ABAR[:10]))


def test_format_1_table_loads_without_x0_mse(tmp_path, table):
    """Tables saved before x0_mse existed still load; asking them for the residual moment names the fix."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "old"
    table.save(folder)
    arrays = load_file(folder / table_module.ARRAYS_NAME)
    save_file({k: arrays[k] for k in ("ms_eps", "stderr", "counts", "alphas_cumprod")}, folder / table_module.ARRAYS_NAME)
    meta = json.load(open(folder / table_module.META_NAME))
    del meta["x0_clip"]
    meta.update(format_version=1, arrays_sha256=table_module._sha256(str(folder / table_module.ARRAYS_NAME)))
    json.dump(meta, open(folder / table_module.META_NAME, "w"))
    old = VarianceTable.load(folder)
    np.testing.assert_array_equal(old.ms_eps, table.ms_eps)
    assert np.all(np.isnan(old.x0_mse)) and not old.has_x0_mse and old.x0_clip is None
    with pytest.raises(ValueError, match=r"needs x0_mse.*analytic-sampler precompute MODEL --data DATA --out DIR"):
        old.require_x0_mse()
    assert table.require_x0_mse() is table.x0_mse


def test_channel_arrays_are_checked_on_build_and_load(tmp_path, table):
    """Per-channel arrays come all together with one shape (C, N); a saved table whose channel array is damaged
    is refused as corrupted."""
    from safetensors.numpy import load_file, save_file

    m, taken = draws()
    ms, counts = m.mean(1), taken.sum(1)
    rows = np.tile(ms, (2, 1))
    with pytest.raises(ValueError, match="per-channel arrays come together"):
        VarianceTable(ms, ms, counts, ABAR, channel_ms_eps=rows)
    with pytest.raises(ValueError, match=r"channel_stderr has shape \(3, 50\); it must be \(channels, 50\)"):
        VarianceTable(ms, ms, counts, ABAR, channel_ms_eps=rows, channel_stderr=np.tile(ms, (3, 1)),
                      channel_x0_mse=rows, channel_x0_mse_stderr=rows)
    full = VarianceTable(ms, ms, counts, ABAR, channel_ms_eps=rows, channel_stderr=rows, channel_x0_mse=rows,
                         channel_x0_mse_stderr=rows)
    folder = tmp_path / "c"
    full.save(folder)
    assert VarianceTable.load(folder).num_channels == 2
    arrays = load_file(folder / table_module.ARRAYS_NAME)
    arrays["channel_x0_mse"] = arrays["channel_x0_mse"][:1]
    save_file(arrays, folder / table_module.ARRAYS_NAME)
    meta = json.load(open(folder / table_module.META_NAME))
    meta["arrays_sha256"] = table_module._sha256(str(folder / table_module.ARRAYS_NAME))
    json.dump(meta, open(folder / table_module.META_NAME, "w"))
    with pytest.raises(ValueError, match=r"array 'channel_x0_mse' missing or not float64\[2, 50\]"):
        VarianceTable.load(folder)
