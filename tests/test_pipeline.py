"""The latent diffusion pipeline with tiny random components: shapes, determinism, samplers, dtypes, save/load."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline

from pipeline_cases import load_in_fresh_process, run_pipeline, save_for_fresh_load, tiny_pipeline
from pipelines import SAMPLERS, LatentDiffusionPipeline, make_scheduler


def test_output_types_and_shapes():
    pipe = tiny_pipeline()
    images = run_pipeline(pipe, output_type="np")
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    latents = run_pipeline(pipe, output_type="latent")
    assert latents.shape == (2, 4, 8, 8)
    pil = run_pipeline(pipe, output_type="pil")
    assert len(pil) == 2 and pil[0].size == (16, 16)
    as_tuple = pipe(batch_size=2, num_inference_steps=3, output_type="np", return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="output_type"):
        run_pipeline(pipe, output_type="tensor")


def test_latents_are_unscaled_before_decoding():
    pipe = tiny_pipeline()
    latents = run_pipeline(pipe, output_type="latent")
    with torch.no_grad():
        expected = pipe.vae.decode(latents / 0.5).sample
    expected = (expected / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(run_pipeline(pipe, output_type="np"), expected, atol=1e-6)


def test_fixed_generator_is_deterministic_and_seed_matters():
    pipe = tiny_pipeline()
    a = run_pipeline(pipe, output_type="np")
    b = run_pipeline(pipe, output_type="np")
    c = run_pipeline(pipe, output_type="np", generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_per_image_generators_make_images_independent_of_the_batch():
    pipe = tiny_pipeline()
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    together = run_pipeline(pipe, batch_size=3, generator=gens([5, 6, 7]), output_type="np")
    alone = run_pipeline(pipe, batch_size=1, generator=gens([6]), output_type="np")
    np.testing.assert_allclose(together[1:2], alone, atol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_sampler_runs_and_keeps_the_training_schedule(sampler):
    train = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    scheduler = make_scheduler(sampler, train.config)
    assert scheduler.config.num_train_timesteps == 100
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
    pipe = tiny_pipeline(sampler=sampler)
    images = run_pipeline(pipe, output_type="np", num_inference_steps=4)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    np.testing.assert_array_equal(images, run_pipeline(pipe, output_type="np", num_inference_steps=4))


def test_samplers_never_clip_latents():
    """Latents have std ~1: clipping x0 to [-1, 1] at each step (DDPM/DDIM's pixel default) collapses samples."""
    train = DDPMScheduler(num_train_timesteps=50)  # clip_sample=True by default
    ddim = make_scheduler("ddim", train.config)
    ddim.set_timesteps(5)
    x0 = torch.full((1, 4, 2, 2), 3.0)
    t = ddim.timesteps[0]
    alpha = train.alphas_cumprod[t]
    sample = alpha.sqrt() * x0  # a noise-free latent at step t, the model predicting zero noise
    prev = ddim.step(torch.zeros_like(sample), t, sample).pred_original_sample
    torch.testing.assert_close(prev, x0)


def test_make_scheduler_rejects_unknown_names():
    with pytest.raises(ValueError, match="sampler name"):
        make_scheduler("heun", DDPMScheduler().config)
    with pytest.raises(TypeError, match="train_scheduler_config"):
        make_scheduler("ddim", 3)


def test_class_labels():
    pipe = tiny_pipeline(num_class_embeds=3)
    a = run_pipeline(pipe, output_type="np", class_labels=[0, 2])
    b = run_pipeline(pipe, output_type="np", class_labels=[1, 1])
    same = run_pipeline(pipe, output_type="np", class_labels=1)
    assert np.abs(a - b).max() > 1e-4
    np.testing.assert_array_equal(b, same)
    with pytest.raises(ValueError, match="class_labels are required"):
        run_pipeline(pipe, output_type="np")
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        run_pipeline(pipe, output_type="np", class_labels=[0, 3])
    with pytest.raises(ValueError, match="unconditional"):
        run_pipeline(tiny_pipeline(), output_type="np", class_labels=[0, 1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    pipe = tiny_pipeline()
    reference = run_pipeline(pipe, output_type="np")
    pipe.to(dtype)
    assert pipe.unet.dtype == dtype and pipe.vae.dtype == dtype
    images = run_pipeline(pipe, output_type="np")
    assert images.dtype == np.float32 and np.isfinite(images).all()
    assert np.abs(images - reference).max() < 0.1


def test_save_and_load_with_diffusion_pipeline(tmp_path):
    pipe = tiny_pipeline(num_class_embeds=3, sampler="dpmsolver++")
    expected = run_pipeline(pipe, output_type="np", class_labels=[0, 2])
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_latent_diffusion", "LatentDiffusionPipeline"]
    assert os.path.isfile(tmp_path / "pipeline_latent_diffusion.py")

    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "LatentDiffusionPipeline"
    assert type(loaded.scheduler).__name__ == "DPMSolverMultistepScheduler"
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run_pipeline(loaded, output_type="np", class_labels=[0, 2]), expected)

    direct = LatentDiffusionPipeline.from_pretrained(tmp_path)
    assert type(direct) is LatentDiffusionPipeline
    direct.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run_pipeline(direct, output_type="np", class_labels=[0, 2]), expected)


def test_dcnv4_unet_round_trips_through_the_pipeline_folder(tmp_path):
    from unet_dcnv4.unet import DCNv4UNet2DModel, build_unet

    pipe = tiny_pipeline()
    torch.manual_seed(0)
    pipe.register_modules(unet=build_unet("dcnv4", "tiny", sample_size=8).eval())
    expected = run_pipeline(pipe, output_type="np", num_inference_steps=2)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"] == ["unet_dcnv4.unet", "DCNv4UNet2DModel"]
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert isinstance(loaded.unet, DCNv4UNet2DModel)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run_pipeline(loaded, output_type="np", num_inference_steps=2), expected)


def test_saved_folders_load_in_a_fresh_process(tmp_path):
    """The loading line of docs/training.md works without importing unet_dcnv4 first, for a DCNv4 and a conv U-Net."""
    from unet_dcnv4.unet import build_unet

    save_for_fresh_load(tiny_pipeline(num_class_embeds=None), tmp_path / "conv")
    pipe = tiny_pipeline()
    torch.manual_seed(0)
    pipe.register_modules(unet=build_unet("dcnv4", "tiny", sample_size=8).eval())
    save_for_fresh_load(pipe, tmp_path / "dcnv4")
    out = load_in_fresh_process([tmp_path / "conv", tmp_path / "dcnv4"], cwd=tmp_path)
    assert "LatentDiffusionPipeline diffusers.models.unets.unet_2d UNet2DModel" in out
    assert "LatentDiffusionPipeline unet_dcnv4.unet DCNv4UNet2DModel" in out


def test_a_folder_without_the_package_says_to_install_it(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "conv")
    out = load_in_fresh_process(["--without-package", tmp_path / "conv"], cwd=tmp_path)
    assert out.strip() == ("ImportError: this latent diffusion pipeline needs the unet_dcnv4 package, which is "
                           "not installed: pip install the unet_dcnv4 checkout or wheel")


def test_guidance_is_one_batched_call_combining_conditional_and_null_predictions():
    pipe = tiny_pipeline(num_class_embeds=3, null_class=True)
    torch.nn.init.normal_(pipe.unet.class_embedding.weight)  # classes that differ, so the combination shows
    calls = []
    hook = pipe.unet.register_forward_hook(lambda module, args, kwargs, out: calls.append(
        (args[0].shape[0], kwargs["class_labels"].tolist())), with_kwargs=True)
    plain = run_pipeline(pipe, class_labels=[0, 2], output_type="latent", num_inference_steps=2)
    assert calls == [(2, [0, 2])] * 2
    calls.clear()
    guided = run_pipeline(pipe, class_labels=[0, 2], output_type="latent", num_inference_steps=2, guidance_scale=4.0)
    assert calls == [(4, [0, 2, 3, 3])] * 2
    hook.remove()
    assert not torch.allclose(plain, guided)

    # One step by hand: the scheduler steps with uncond + s * (cond - uncond).
    from diffusers.utils.torch_utils import randn_tensor

    guided = run_pipeline(pipe, class_labels=[0, 2], output_type="latent", num_inference_steps=1, guidance_scale=4.0)
    x = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    x = x * pipe.scheduler.init_noise_sigma
    pipe.scheduler.set_timesteps(1)
    t = pipe.scheduler.timesteps[0]
    with torch.no_grad():
        cond = pipe.unet(x, t, class_labels=torch.tensor([0, 2])).sample
        uncond = pipe.unet(x, t, class_labels=torch.tensor([3, 3])).sample
    expected = pipe.scheduler.step(uncond + 4.0 * (cond - uncond), t, x).prev_sample
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5)


def test_guidance_needs_the_null_class_and_the_null_class_is_not_a_class():
    pipe = tiny_pipeline(num_class_embeds=3)
    with pytest.raises(ValueError, match="guidance_scale 4.0 needs a class-conditional model trained with label"):
        run_pipeline(pipe, class_labels=0, guidance_scale=4.0)
    guided = tiny_pipeline(num_class_embeds=3, null_class=True)
    assert guided.num_classes == 3 and guided.unet.config.num_class_embeds == 4
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        run_pipeline(guided, class_labels=3)
    with pytest.raises(ValueError, match="guidance_scale must be a number >= 0"):
        run_pipeline(guided, class_labels=0, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="null_class_label must be the unet's last class embedding"):
        LatentDiffusionPipeline(guided.unet, guided.vae, guided.scheduler, null_class_label=1)


def test_null_class_and_class_counts_survive_save_and_load(tmp_path):
    pipe = tiny_pipeline(num_class_embeds=3, null_class=True, class_counts=[5, 1, 2])
    pipe.save_pretrained(tmp_path)
    for loaded in (LatentDiffusionPipeline.from_pretrained(tmp_path),
                   DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)):
        assert loaded.config.null_class_label == 3 and list(loaded.config.class_counts) == [5, 1, 2]
        assert loaded.num_classes == 3
