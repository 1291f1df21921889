"""What the command line does with the inputs a newcomer really gives it: mistyped paths, data folders with other
files in them, broken or differently coloured images. Each gets a message that names the problem and the fix."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler
from huggingface_hub import constants
from PIL import Image

from analytic_sampler import hub
from analytic_sampler.commands.cli import main
from analytic_sampler.estimation.data import iter_batches


@pytest.fixture
def model(tmp_path) -> str:
    tiny_unet(channels=1).save_pretrained(tmp_path / "model" / "unet")
    DDPMScheduler(num_train_timesteps=20).save_pretrained(tmp_path / "model" / "scheduler")
    return str(tmp_path / "model")


def pngs(folder, count: int = 4, mode: str = "L", size: int = 8):
    folder.mkdir(parents=True, exist_ok=True)
    shape = {"L": (size, size), "RGB": (size, size, 3), "RGBA": (size, size, 4)}[mode]
    for i in range(count):
        Image.fromarray(np.full(shape, 30 * i, np.uint8), mode).save(folder / f"{i:02d}.png")
    return folder


def test_missing_data_paths_name_their_option_and_where_they_looked(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grey = str(pngs(tmp_path / "grey"))
    with pytest.raises(SystemExit, match=r"--data 'trian/': no such file or folder \(looked in "
                       f"{tmp_path / 'trian'}\\); use digits:train"):
        main(["nll", model, "--data", "trian/", "--variance", "beta"])
    with pytest.raises(SystemExit, match=r"error: --eval-data 'heldout': no such file or folder \(looked in "):
        main(["bench", model, "--data", grey, "--eval-data", "heldout", "--steps", "3", "--out", "report"])
    assert not (tmp_path / "report").exists()


def test_a_table_name_that_is_neither_local_nor_on_the_hub_says_both(model, tmp_path, monkeypatch):
    """``tables/nope`` with no ``tables/`` folder is a valid Hub repo id: the Hub is asked (offline here), and the
    error says that no local folder of that name exists either, and how to mean one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match=r"--table 'tables/nope' is no local folder \(looked in .*tables/nope; write "
                       r"./tables/nope to mean one\) and did not load as a Hub repo id: could not get"):
        main(["trajectory", "--table", "tables/nope"])


@pytest.mark.parametrize("argv", [["trajectory", "--table", "tables/nope"], ["sample", "models/nope", "--steps", "3"]])
def test_an_unreachable_hub_fails_at_once_without_retries(tmp_path, monkeypatch, capsys, argv):
    """Online mode, but the Hub's host refuses connections (a closed local port stands in for no network): the name
    is looked up in the cache only, so the error comes at once, not after huggingface_hub's 25 s of retries."""
    monkeypatch.chdir(tmp_path)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub._reachable.cache_clear()
    started = time.perf_counter()
    with pytest.raises(SystemExit, match=f"looked in {tmp_path}/{argv[1] if argv[0] == 'sample' else argv[2]}"):
        main(argv)
    assert time.perf_counter() - started < 5
    assert "Retrying" not in capsys.readouterr().err
    hub._reachable.cache_clear()


def test_the_hub_probe_trusts_a_proxy(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    hub._reachable.cache_clear()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert not hub.hub_unreachable()  # behind a proxy no direct connection is tried
    monkeypatch.delenv("HTTPS_PROXY")
    for name in ("https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert hub.hub_unreachable()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.hub_unreachable()
    hub._reachable.cache_clear()


def test_stray_files_in_a_data_folder_are_skipped_with_one_warning(model, tmp_path):
    folder = pngs(tmp_path / "images")
    (folder / "README.md").write_text("my digits")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    (folder / "metadata.jsonl").write_text("")  # captions beside the images: expected, no warning for them
    (folder / "more").mkdir()
    with pytest.warns(UserWarning, match=r"skipping what is not an image file \(.DS_Store, README.md, more/\)") as seen:
        images = torch.cat(list(iter_batches(str(folder), 16, channels=1)))
    assert images.shape == (4, 1, 8, 8) and len([w for w in seen if "skipping" in str(w.message)]) == 1
    with pytest.warns(UserWarning, match="skipping what is not an image file"):
        main(["precompute", model, "--fit-paths", "0",
              "--data", str(folder), "--num-samples", "4", "--timesteps", "even:3",
              "--out", str(tmp_path / "table")])
    assert (tmp_path / "table" / "variance_table.json").is_file()


def test_a_broken_image_is_named_and_an_imageless_folder_refused(model, tmp_path):
    folder = pngs(tmp_path / "images")
    (folder / "02.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"error: .*images/02.png is not a readable image \(cannot identify image "
                       r"file .*\); replace or remove the file"):
        main(["nll", model, "--data", str(folder), "--variance", "beta"])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "03.png")
    (folder / "03.png").write_bytes((folder / "03.png").read_bytes()[:40])  # truncated: fails while decoding
    (folder / "02.png").unlink()
    with pytest.raises(SystemExit, match=r"images/03.png is not a readable image"):
        main(["nll", model, "--data", str(folder), "--variance", "beta"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README").write_text("")
    with pytest.raises(SystemExit, match=r"no images \(.png, .*\) in folder .*empty \(it holds only README\); point "
                       "data at a folder of image files"):
        main(["nll", model, "--data", str(empty), "--variance", "beta"])


@pytest.mark.parametrize(("mode", "channels", "says"), [
    ("RGB", 1, "converting RGB images to L for 1 channel(s) (first: 00.png); colour is lost"),
    ("L", 3, "converting L images to RGB for 3 channel(s) (first: 00.png); the grey level is repeated in R, G and B"),
    ("RGBA", 3, "converting RGBA images to RGB for 3 channel(s) (first: 00.png); the alpha channel is dropped"),
])
def test_colour_conversions_are_said_once(tmp_path, mode, channels, says):
    folder = pngs(tmp_path / "images", mode=mode)
    with pytest.warns(UserWarning) as seen:
        images = torch.cat(list(iter_batches(str(folder), 2, channels=channels)))
    assert images.shape == (4, channels, 8, 8)
    assert [str(w.message) for w in seen] == [f"folder {folder}: {says}."]


def test_matching_images_read_without_a_warning(tmp_path, recwarn):
    torch.cat(list(iter_batches(str(pngs(tmp_path / "grey")), 4, channels=1)))
    torch.cat(list(iter_batches(str(pngs(tmp_path / "rgb", mode="RGB")), 4, channels=3)))
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_inception_path_is_checked_before_the_table_is_estimated(model, tmp_path):
    grey = str(pngs(tmp_path / "grey"))
    out = tmp_path / "report"
    with pytest.raises(SystemExit, match=r"--inception '.*missing.pt': no such file"):
        main(["bench", model, "--data", grey, "--eval-data", grey, "--steps", "3", "--out", str(out),
              "--inception", os.fspath(tmp_path / "missing.pt")])
    assert not out.exists()
