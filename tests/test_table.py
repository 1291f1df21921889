import json
import os

import huggingface_hub
import numpy as np
import pytest
from diffusers import DDPMScheduler

import analytic_sampler.table as table_module
from analytic_sampler.fingerprint import file_sha256
from analytic_sampler.pretrained import BUNDLED_DIR
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
    record["arrays_sha256"] = file_sha256(arrays)
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


def edit_json(folder, drop=(), **changes):
    """Rewrite the table's JSON with ``changes`` and without the fields in ``drop``, as a hand edit would; return
    the record as it was."""
    path = os.path.join(folder, "variance_table.json")
    with open(path) as f:
        record = json.load(f)
    with open(path, "w") as f:
        json.dump({k: v for k, v in {**record, **changes}.items() if k not in drop}, f)
    return record


def rewrite_arrays(folder, arrays):
    """Replace the arrays file by ``arrays`` with the header it had, and record its new checksum."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = os.path.join(folder, table_module.ARRAYS_NAME)
    with safe_open(path, framework="numpy") as f:
        header = f.metadata()
    save_file(arrays, path, metadata=header)
    edit_json(folder, arrays_sha256=file_sha256(path))


def test_mismatched_metadata(tmp_path, table):
    folder = table.save(tmp_path / "t")
    record = edit_json(folder)
    edit_json(folder, fingerprint="N50-0000")
    with pytest.raises(ValueError, match=r"variance_table.json: fingerprint is \"N50-0000\" but was \"N50-\w+\" when "
                                         r"the table was written; the file was changed after the table was written"):
        VarianceTable.load(folder)
    edit_json(folder, num_train_timesteps=60, fingerprint=record["fingerprint"])
    with pytest.raises(ValueError, match=r"variance_table.json: num_train_timesteps is 60 but was 50 when the table "
                                         r"was written; the file was changed .* restore the file"):
        VarianceTable.load(folder)
    edit_json(folder, **{**record, "format_version": 99})
    with pytest.raises(ValueError, match=r"table format version 99, this package reads versions \(1, 2, 3, 4, 5, 6\); "
                                         r"upgrade"):
        VarianceTable.load(folder)


def test_provenance_is_covered_by_the_checksum(tmp_path, table):
    """A hand edit of any metadata field (data range, channels, provenance) is refused, naming the field; a deleted
    checksum is reported as missing."""
    folder = table.save(tmp_path / "t")
    record = edit_json(folder)
    edit_json(folder, data_range=[0.0, 1.0])
    with pytest.raises(ValueError, match=r"data_range is \[0.0, 1.0\] but was \[-1.0, 1.0\] when the table was "
                                         r"written"):
        VarianceTable.load(folder)
    edit_json(folder, **{**record, "provenance": {**record["provenance"], "model_id": "other/model", "seed": 3}})
    with pytest.raises(ValueError, match=r"provenance.model_id is \"other/model\" but was \"user/model\" when the "
                                         r"table was written; provenance.seed is 3 but was 0 when"):
        VarianceTable.load(folder)
    edit_json(folder, drop=("arrays_sha256",), **{**record, "provenance": record["provenance"]})
    with pytest.raises(ValueError, match=r"variance_table.json: its checksum 'arrays_sha256' \(of "
                                         r"variance_table.safetensors\) is missing; the file was changed"):
        VarianceTable.load(folder)
    edit_json(folder, **record)
    assert_same(VarianceTable.load(folder), table)


def test_format_3_table_loads_and_its_edits_are_named(tmp_path, table):
    """A table written before the metadata was covered (format 3, no copy in the header) still loads; an edited
    num_train_timesteps is named as a metadata problem, not as a missing array."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "v3"
    table.save(folder)
    save_file(load_file(folder / table_module.ARRAYS_NAME), folder / table_module.ARRAYS_NAME)  # no header copy
    edit_json(folder, format_version=3, arrays_sha256=file_sha256(folder / table_module.ARRAYS_NAME))
    assert_same(VarianceTable.load(folder), table)
    record = edit_json(folder)
    edit_json(folder, num_train_timesteps=60)
    with pytest.raises(ValueError, match=r"variance_table.json: it says num_train_timesteps=60 but "
                                         r"variance_table.safetensors holds 50 timesteps; the file was changed"):
        VarianceTable.load(folder)
    edit_json(folder, **{**record, "format_version": 4})
    with pytest.raises(ValueError, match=r"variance_table.safetensors: its header has no copy of the metadata"):
        VarianceTable.load(folder)


def reject(constant):
    raise ValueError(f"bare {constant} in JSON")


def test_saved_tables_are_strict_json(tmp_path, table):
    """No bare NaN / Infinity in any table file this package writes or ships; non-finite provenance values are
    written as null, numpy values as plain numbers."""
    odd_values = {"guidance": float("nan"), "ratio": np.float64(np.inf), "counts": np.arange(2), "scale": np.float32(2)}
    odd = VarianceTable(table.ms_eps, table.stderr, table.counts, ABAR, provenance=odd_values)
    merged = odd.merge(table)
    bundled = sorted(BUNDLED_DIR.glob("*/table/variance_table.json"))
    assert len(bundled) == 2
    for i, saved in enumerate([odd, merged, table_from(*draws())]):
        folder = saved.save(tmp_path / str(i))
        with open(os.path.join(folder, "variance_table.json")) as f:
            record = json.loads(f.read(), parse_constant=reject)
        assert record["format_version"] == table_module.FORMAT_VERSION
    assert record and VarianceTable.load(tmp_path / "0").provenance["guidance"] is None
    assert VarianceTable.load(tmp_path / "0").provenance["counts"] == [0, 1]
    assert VarianceTable.load(tmp_path / "0").provenance["scale"] == 2.0
    for path in bundled:
        with open(path) as f:
            json.loads(f.read(), parse_constant=reject)


def test_saved_files_have_ordinary_permissions(tmp_path, table):
    folder = table.save(tmp_path / "t")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("variance_table.json", "variance_table.safetensors"):
        assert os.stat(os.path.join(folder, name)).st_mode & 0o777 == 0o666 & ~umask
    assert sorted(os.listdir(folder)) == ["variance_table.json", "variance_table.safetensors"]  # no temporary left


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
    with pytest.raises(ValueError, match=r"cannot merge these tables: they differ in data_range \(\(-1.0, 1.0\) and "
                                         r"None\)\. Merge only estimates of one model with the same settings"):
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
    meta.update(format_version=1, arrays_sha256=file_sha256(str(folder / table_module.ARRAYS_NAME)))
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
    from safetensors.numpy import load_file

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
    rewrite_arrays(folder, arrays)
    with pytest.raises(ValueError, match=r"array 'channel_x0_mse' missing or not float64\[2, 50\]"):
        VarianceTable.load(folder)


@pytest.mark.parametrize("field, a, b", [
    ("model_fingerprint", "0123456789abcdef", "fedcba9876543210"),
    ("prediction_type", "epsilon", "v_prediction"),
    ("guidance_scale", None, 7.5),
    ("latent", None, "mean"),
    ("timestep_shift", 0, 1),
])
def test_merge_refuses_tables_of_other_models_or_settings(field, a, b):
    m, taken = draws()
    first = table_from(m, taken, provenance={"model_id": "x", "seed": 0, field: a})
    second = table_from(m, taken, provenance={"model_id": "x", "seed": 1, field: b})
    with pytest.raises(ValueError, match=rf"cannot merge these tables: they differ in {field} \({a!r} and {b!r}\)"):
        first.merge(second)


def test_merge_keeps_every_shared_provenance_field():
    m, taken = draws()
    shared = {"model_id": "x", "model_fingerprint": "0123456789abcdef", "prediction_type": "v_prediction",
              "guidance_scale": 7.5, "latent": "mean", "negative_prompt": ""}
    a = table_from(m, taken, provenance={**shared, "seed": 0, "run_key": {"seed": 0}})
    b = table_from(m, taken, provenance={**shared, "seed": 1, "run_key": {"seed": 1}})
    merged = a.merge(b)
    assert {k: merged.provenance[k] for k in shared} == shared and merged.guidance_scale == 7.5
    assert "seed" not in merged.provenance and "run_key" not in merged.provenance  # no single run's
    assert merged.merge(a).provenance["model_fingerprint"] == shared["model_fingerprint"]
    with pytest.raises(ValueError, match=r"they differ in data_range \(\(-1.0, 1.0\) and None\), latent \('mean' and "
                                         r"None\)\. Merge only"):
        a.merge(table_from(m, taken, data_range=None, provenance={**shared, "latent": None}))


def test_check_model_refuses_another_model_unless_forced():
    import torch
    from conftest import tiny_unet

    from analytic_sampler.adapter import EpsilonAdapter
    from analytic_sampler.fingerprint import weights_fingerprint

    m, taken = draws()
    unet = tiny_unet(channels=1)
    ms = np.tile(table_from(m, taken).ms_eps, (3, 1))
    rgb = VarianceTable(ms[0], ms[0], taken.sum(1), ABAR, channel_ms_eps=ms, channel_stderr=ms, channel_x0_mse=ms,
                        channel_x0_mse_stderr=ms, provenance={"model_id": "rgb-model"})
    with pytest.raises(ValueError, match=r"the variance table \(rgb-model\) does not belong to this model: it holds "
                                         r"moments of 3 channel\(s\), the model takes 1. Use the table estimated for "
                                         r"this model .*or pass force_table=True \(on the command line: "
                                         r"--force-table\)"):
        rgb.check_model(unet)
    with pytest.warns(UserWarning, match=r"takes 1; used anyway \(force\)"):
        assert rgb.check_model(unet, force=True) is rgb
    own = table_from(m, taken, provenance={"model_id": "mine", "model_fingerprint": weights_fingerprint(unet)})
    assert own.check_model(unet) is own and own.check_model(EpsilonAdapter(unet, ABAR)) is own
    assert own.check_model(tiny_unet(channels=1).half()) is own  # a float16 copy of the same weights
    with pytest.raises(ValueError, match=rf"it was estimated with weights {weights_fingerprint(unet)}, this model's "
                                         rf"are {weights_fingerprint(tiny_unet(seed=1))}"):
        own.check_model(tiny_unet(channels=1, seed=1))
    assert table_from(m, taken).check_model(tiny_unet(channels=1, seed=1))  # nothing recorded: nothing to check
    assert own.check_model(lambda x, t: torch.zeros_like(x)) is own  # no weights to compare
