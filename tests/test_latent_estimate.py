"""estimate_moments on a latent text-to-image pipeline: pixel images and prompts in, a latent table out."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_sd import tiny_images, tiny_sd_pipeline  # noqa: E402

from analytic_sampler import (  # noqa: E402
    AnalyticDPMScheduler,
    EpsilonAdapter,
    EstimateOptions,
    PipelineOptions,
    SolverStatistics,
    VarianceTable,
    estimate_moments,
)
from analytic_sampler.estimation.latents import encode_images, encode_prompts, read_captions  # noqa: E402

TIMESTEPS = [1, 301, 601, 901]
PROMPTS = ["a cat", "a dog", "a red house", "x", "a cat", "a tree", "blue", "two dots"]
QUIET = EstimateOptions(progress=False)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def images():
    return tiny_images(len(PROMPTS))


def estimate(model, data, scheduler=None, num_samples=8, batch_size=5, options=QUIET, **pipeline_options):
    """estimate_moments at ``TIMESTEPS``; ``pipeline_options``: the fields of :class:`PipelineOptions`."""
    return estimate_moments(model, data, scheduler, num_samples, TIMESTEPS, batch_size, options=options,
                            pipeline_options=PipelineOptions(**pipeline_options))


def by_hand(pipe, images, prompt_embeds, chunk=4):
    """The same estimate from latents and embeddings passed by hand to the UNet."""
    latents = encode_images(pipe, images, batch_size=chunk)
    options = EstimateOptions(data_range=None, model_kwargs={"encoder_hidden_states": prompt_embeds}, progress=False)
    return estimate(pipe.unet, latents, pipe.scheduler, num_samples=len(images), options=options)


def assert_same(a, b):
    for key in ("ms_eps", "stderr", "x0_mse", "x0_mse_stderr", "counts", "channel_ms_eps", "channel_x0_mse"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)


def test_pipeline_equals_latents_and_embeddings_by_hand(pipe, images):
    """Bit for bit: per-image prompts (conditional eps), and one prompt with guidance 7.5 (guided eps)."""
    table = estimate(pipe, images, prompt=PROMPTS, encode_batch_size=4)
    assert_same(table, by_hand(pipe, images, encode_prompts(pipe, PROMPTS, batch_size=4)))
    assert table.data_range is None and table.num_channels == 4 and table.guidance_scale is None
    assert table.provenance["vae_scaling_factor"] == pytest.approx(0.18215)
    assert table.provenance["latent"] == "mean" and table.provenance["prompt_source"] == "the prompt list"

    guided = estimate(pipe, images, prompt="a cat", guidance_scale=7.5, encode_batch_size=4)
    adapter = EpsilonAdapter(pipe.unet, pipe.scheduler, guidance_scale=7.5,
                             uncond_kwargs={"encoder_hidden_states": encode_prompts(pipe, [""])})
    latents = encode_images(pipe, images, batch_size=4)
    hand = estimate(adapter, latents, pipe.scheduler, options=EstimateOptions(
        data_range=None, model_kwargs={"encoder_hidden_states": encode_prompts(pipe, ["a cat"])}, progress=False))
    assert_same(guided, hand)
    assert guided.guidance_scale == 7.5 and guided.provenance["negative_prompt"] == ""
    assert not np.allclose(guided.ms_eps[TIMESTEPS], table.ms_eps[TIMESTEPS])  # guidance changes the moments


def test_encoding_is_the_vae_mean_times_scaling_and_the_pipelines_prompt_encoder(pipe, images):
    with torch.no_grad():
        mean = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    torch.testing.assert_close(encode_images(pipe, images, batch_size=3), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encode_prompts(pipe, PROMPTS, batch_size=3), embeds, rtol=1e-5, atol=1e-6)
    sampled = encode_images(pipe, images, latent="sample", seed=1)
    assert torch.equal(sampled, encode_images(pipe, images, latent="sample", seed=1))
    assert not torch.allclose(sampled, mean)


def test_each_image_and_prompt_is_encoded_once_and_memory_stays_bounded(pipe, images):
    """Every timestep of an image reuses its latent: 8 images in chunks of 2 are 4 VAE calls and 4 text-encoder
    calls, whatever the batch size, and at most the chunks of one batch are held."""
    from analytic_sampler.estimation import latents as latents_module

    calls = {"vae": 0, "text": 0}
    hooks = [pipe.vae.encoder.register_forward_hook(lambda *a: calls.__setitem__("vae", calls["vae"] + 1)),
             pipe.text_encoder.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))]
    held = []
    window = latents_module.PipelineSamples.window

    def spy(self, lo, hi):
        out = window(self, lo, hi)
        held.append(len(self._cache))
        return out

    try:
        latents_module.PipelineSamples.window = spy
        estimate(pipe, images, batch_size=3, prompt=PROMPTS, encode_batch_size=2)
    finally:
        latents_module.PipelineSamples.window = window
        for hook in hooks:
            hook.remove()
    assert calls == {"vae": 4, "text": 4}
    assert max(held) <= 2  # a batch of 3 pairs over 4 timesteps spans at most 2 images, at most 2 chunks


def test_interrupted_pipeline_estimate_resumes_bit_identical(pipe, images, tmp_path):
    full = estimate(pipe, images, prompt=PROMPTS, encode_batch_size=4)
    calls = {"n": 0}

    def fail_on_fourth_call(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("interrupted")

    hook = pipe.unet.register_forward_pre_hook(fail_on_fourth_call)
    path = tmp_path / "ckpt.pt"
    with pytest.raises(RuntimeError, match="interrupted"):
        estimate(pipe, images, options=EstimateOptions(checkpoint=path, checkpoint_every=2, progress=False),
                 prompt=PROMPTS, encode_batch_size=4)
    hook.remove()
    assert path.exists()
    resumable = EstimateOptions(checkpoint=path, progress=False)
    assert_same(full, estimate(pipe, images, options=resumable, prompt=PROMPTS, encode_batch_size=4))
    with pytest.raises(ValueError, match=r"belongs to another run \(prompts: '\w+' in the checkpoint, '\w+' now\)"):
        estimate(pipe, images, options=resumable, prompt="another prompt", encode_batch_size=4)


def test_a_streamed_data_set_resumes_only_when_named(pipe, images, tmp_path):
    """A DataLoader is streamed to the pipeline, not read up front: its checkpoint resumes only under a data_id;
    a folder is identified by its files (names, sizes, contents)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=4)
    path, prompt = tmp_path / "ckpt.pt", {"prompt": "a cat", "encode_batch_size": 4}
    unnamed, named_options = (EstimateOptions(checkpoint=path, progress=False, data_id=name)
                              for name in (None, "cats-v1"))
    with pytest.warns(UserWarning, match=r"will not resume this run if it is interrupted: the data are streamed from "
                                         r"a DataLoader / Dataset, not read up front: pass options=EstimateOptions\("
                                         r"data_id="):
        full = estimate(pipe, loader, options=unnamed, **prompt)
    with pytest.raises(ValueError, match=r"cannot be resumed: the data are streamed .*: pass options=EstimateOptions\("
                                         r"data_id='...'\) \(the same on every run\) to name it. Or delete it to "
                                         r"start afresh"):
        estimate(pipe, loader, options=unnamed, **prompt)
    path.unlink()
    named = estimate(pipe, loader, options=named_options, **prompt)
    assert named.provenance["data_id"] == "cats-v1" and named.provenance["run_key"]["data"] is None
    assert_same(named, full)
    assert_same(estimate(pipe, loader, options=named_options, **prompt), full)

    folder = write_folder(tmp_path / "images", images)
    in_folder = EstimateOptions(checkpoint=tmp_path / "folder.pt", progress=False)
    estimate(pipe, folder, options=in_folder, **prompt)
    first = sorted(folder.iterdir())[0]
    Image.open(first).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(first)  # same name, same kind of file
    with pytest.raises(ValueError, match=r"belongs to another run \(data: '\w+' in the checkpoint, '\w+' now\)"):
        estimate(pipe, folder, options=in_folder, **prompt)


def write_folder(folder, images):
    folder.mkdir()
    for i, image in enumerate(images):
        pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


def test_captions_from_an_image_folder(pipe, images, tmp_path):
    """``metadata.jsonl`` beside the images (Hugging Face imagefolder) is read by default; .txt and .csv too."""
    folder = write_folder(tmp_path / "images", images)
    rows = [{"file_name": f"{i:03d}.png", "text": p} for i, p in reversed(list(enumerate(PROMPTS)))]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_captions(folder / "metadata.jsonl", folder) == PROMPTS
    (tmp_path / "captions.txt").write_text("\n".join(PROMPTS) + "\n")
    assert read_captions(tmp_path / "captions.txt") == PROMPTS
    (tmp_path / "c.csv").write_text("file_name,caption\n" + "".join(f"{i:03d}.png,{p}\n" for i, p in enumerate(PROMPTS)))
    assert read_captions(tmp_path / "c.csv", folder) == PROMPTS

    from_folder = estimate(pipe, str(folder), encode_batch_size=4)
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(folder / f"{i:03d}.png"), dtype=np.float32))
                          for i in range(8)]).permute(0, 3, 1, 2) / 127.5 - 1
    listed = estimate(pipe, pixels, prompt=PROMPTS, encode_batch_size=4)
    np.testing.assert_array_equal(from_folder.ms_eps, listed.ms_eps)
    assert from_folder.provenance["prompt_source"] == f"captions: {folder / 'metadata.jsonl'}"

    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "000.png", "text": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"no caption for 7 image\(s\)"):
        estimate(pipe, str(folder))


def test_pipeline_input_errors_name_the_fix(pipe, images):
    with pytest.raises(ValueError, match="text-conditioned: pass prompt="):
        estimate(pipe, images)
    with pytest.raises(ValueError, match=r"gives 2 prompt\(s\) for num_samples=8"):
        estimate(pipe, images, prompt=["a", "b"])
    with pytest.raises(ValueError, match="either prompt .* or captions"):
        estimate(pipe, images, prompt="a", captions="c.txt")
    with pytest.raises(ValueError, match="need a pipeline with a VAE"):
        estimate(pipe.unet, images, pipe.scheduler, prompt="a")
    with pytest.raises(ValueError, match=r"latent='median'"):
        estimate(pipe, images, prompt="a", latent="median")
    with pytest.raises(ValueError, match="data outside the declared range"):
        estimate(pipe, images * 3, prompt="a")
    with pytest.raises(ValueError, match="data holds fewer than 8 images"):
        estimate(pipe, images[:5], prompt="a", encode_batch_size=4)
    with pytest.raises(ValueError, match="pass the model's noise schedule"):
        estimate(pipe.unet, images)


def test_pipelines_whose_prompt_encoder_returns_more_are_refused(pipe, images, monkeypatch):
    """An SDXL-type encode_prompt (four outputs; the UNet would also need added_cond_kwargs) names the way round."""
    monkeypatch.setattr(pipe, "encode_prompt", lambda *args, **kwargs: (None,) * 4)
    with pytest.raises(ValueError, match="SDXL-type pipelines need added_cond_kwargs"):
        estimate(pipe, images, prompt="a")


def test_captions_file_errors_name_the_fix(tmp_path, images):
    folder = write_folder(tmp_path / "images", images)
    with pytest.raises(FileNotFoundError, match="captions file .*nowhere.txt' not found"):
        read_captions(tmp_path / "nowhere.txt")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ValueError, match=r"use .txt \(one line per image\), .jsonl or .csv"):
        read_captions(tmp_path / "c.json")
    (tmp_path / "c.jsonl").write_text(json.dumps({"file_name": "000.png", "label": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1 needs 'file_name' and one of \('text', 'caption', 'prompt'\)"):
        read_captions(tmp_path / "c.jsonl", folder)
    (tmp_path / "c.jsonl").write_text(json.dumps({"file_name": "000.png", "text": "a"}) + "\n")
    with pytest.raises(ValueError, match="names image files; pass the image folder as data"):
        read_captions(tmp_path / "c.jsonl")


def test_table_used_at_another_guidance_scale_warns(pipe, images):
    guided = estimate(pipe, images, prompt="a cat", guidance_scale=7.5)
    config = pipe.scheduler.config
    with pytest.warns(UserWarning, match=r"estimated at guidance_scale=7.5, but the pipeline is sampling at guidance_scale=3"):
        AnalyticDPMScheduler.from_table(guided, config, guidance_scale=3.0)
    with pytest.warns(UserWarning, match=r"estimated without guidance"):
        AnalyticDPMScheduler.from_table(VarianceTable(**{**vars(guided), "provenance": {}}), config, guidance_scale=7.5)
    scheduler = AnalyticDPMScheduler.from_table(guided, config, guidance_scale=7.5)  # no warning
    assert scheduler.config.clip_sample is False and scheduler.table.data_range is None


def test_cli_precompute_for_a_pipeline_folder(pipe, images, tmp_path, monkeypatch, capsys):
    """``analytic-sampler precompute MODEL --data FOLDER --guidance-scale W`` stores the table in MODEL/table with its
    provenance; it equals the library call; bad combinations are refused."""
    from analytic_sampler.commands.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "tiny-sd"
    pipe.save_pretrained(model)
    folder = write_folder(tmp_path / "images", images)
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i:03d}.png", "text": p}) + "\n" for i, p in enumerate(PROMPTS)))
    main(["precompute", str(model), "--fit-paths", "0", "--data", str(folder), "--num-samples", "8",
          "--timesteps", "1,301,601,901", "--batch-size", "5", "--guidance-scale", "7.5", "--revision", "main",
          "--solver-grid", "4"])
    assert f"saved to {model / 'table'}" in capsys.readouterr().out
    statistics = SolverStatistics.load(model, subfolder="table")  # the default second pass: per latent channel
    assert statistics.feature_shape == (4, 1, 1) and statistics.provenance["guidance_scale"] == 7.5
    table = VarianceTable.load(model, subfolder="table")
    expected = estimate(pipe, str(folder), guidance_scale=7.5)
    assert_same(table, expected)
    record = table.provenance
    assert record["model_id"] == str(model) and record["revision"] == "main" and table.guidance_scale == 7.5
    assert record["prompt_source"] == f"captions: {folder / 'metadata.jsonl'}" and record["latent"] == "mean"
    assert record["vae_scaling_factor"] == pytest.approx(0.18215) and record["pipeline"] == "StableDiffusionPipeline"

    main(["precompute", str(model), "--fit-paths", "0",
          "--data", str(folder), "--num-samples", "2", "--timesteps", "901",
          "--prompt", "one prompt", "--out", str(tmp_path / "t2")])
    assert VarianceTable.load(tmp_path / "t2").provenance["prompt_source"] == "prompt: 'one prompt'"
    with pytest.raises(SystemExit, match="a latent pipeline reads a folder of images"):
        main(["precompute", str(model), "--data", "digits:train", "--prompt", "a", "--out", str(tmp_path / "t3")])
    with pytest.raises(SystemExit, match=r"holds 8 images but --num-samples is 9"):
        main(["precompute", str(model), "--data", str(folder), "--num-samples", "9", "--out", str(tmp_path / "t3")])
    with pytest.raises(SystemExit, match="are for latent text-to-image pipelines"):
        main(["precompute", "digits-ddpm-linear", "--data", "digits:train", "--prompt", "a", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="pass --out"):
        main(["precompute", "digits-ddpm-linear", "--data", "digits:train"])


def test_a_captions_file_of_another_length_is_refused_with_the_counts(images, tmp_path):
    folder = write_folder(tmp_path / "images", images)
    (tmp_path / "long.txt").write_text("\n".join(PROMPTS + ["one too many"]) + "\n")
    with pytest.raises(ValueError, match=r"long.txt has 9 lines but .*images holds 8 images; give one line per "
                       "image, in the order of the sorted file names"):
        read_captions(tmp_path / "long.txt", folder)
    (tmp_path / "short.txt").write_text("\n".join(PROMPTS[:5]) + "\n")
    with pytest.raises(ValueError, match=r"short.txt has 5 lines but .*images holds 8 images"):
        read_captions(tmp_path / "short.txt", folder)
    assert read_captions(tmp_path / "short.txt") == PROMPTS[:5]  # no folder to count against: read as it is


def test_cli_checks_prompts_before_loading_the_pipeline_and_sample_names_the_way(pipe, images, tmp_path,
                                                                                 monkeypatch):
    """The prompt errors name the command line's flags, are raised before the pipeline loads (a captions file of
    the wrong length too, even with --num-samples below both counts), and ``sample`` on a pipeline folder says how
    to sample one instead of Diffusers' error about its UNet's config."""
    from analytic_sampler import pretrained
    from analytic_sampler.commands.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "tiny-sd"
    pipe.save_pretrained(model)
    folder = write_folder(tmp_path / "images", images)
    monkeypatch.setattr(pretrained, "load_pipeline", lambda *a, **k: pytest.fail("the pipeline was loaded"))
    base = ["precompute", str(model), "--fit-paths", "0",
            "--data", str(folder), "--out", str(tmp_path / "t"), "--num-samples", "4"]
    with pytest.raises(SystemExit, match=r"has no captions \(metadata.jsonl or metadata.csv\) and the pipeline is "
                       r"text-conditioned: pass --prompt '...' \(one prompt for every image; --prompt '' for the "
                       r"unconditional model\) or --captions FILE"):
        main(base)
    (tmp_path / "captions.txt").write_text("\n".join(PROMPTS[:6]) + "\n")
    with pytest.raises(SystemExit, match=r"captions.txt has 6 lines but .*images holds 8 images"):
        main([*base, "--captions", str(tmp_path / "captions.txt")])
    assert not (tmp_path / "t").exists()
    with pytest.raises(SystemExit, match=r"'.*tiny-sd' holds a UNet2DConditionModel \(a latent or conditional "
                       r"pipeline\).*AnalyticDPMScheduler.from_table\(table, pipe.scheduler.config\)"):
        main(["sample", str(model), "--out", str(tmp_path / "x.png")])
