"""Tiny pipelines and helpers shared by the pipeline, sampling, comparison and wheel tests."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

from pipelines import LatentDiffusionPipeline, make_scheduler


def tiny_pipeline(num_class_embeds=None, sampler="ddim", seed=0, null_class=False,
                  class_counts=None) -> LatentDiffusionPipeline:
    """A pipeline small enough for CPU tests: 8x8x4 latents decoded to 16x16 RGB. With `null_class`, the unet has
    one more class embedding, the null class of classifier-free guidance."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=None if num_class_embeds is None else num_class_embeds + int(null_class),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.5,
    )
    scheduler = make_scheduler(sampler, DDPMScheduler(num_train_timesteps=100))
    pipe = LatentDiffusionPipeline(unet.eval(), vae.eval(), scheduler,
                                   null_class_label=num_class_embeds if null_class else None, class_counts=class_counts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, **kwargs):
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("batch_size", 2)
    return pipe(**kwargs).images


# Loads saved pipeline folders in a process that has imported nothing of this project, as a user's script
# would, and compares each one's images with those the saving process made. Prints the module each U-Net
# class came from and where unet_dcnv4 was imported from.
FRESH_LOAD = """
import sys
import numpy as np
import torch
from diffusers import DiffusionPipeline
assert not [m for m in sys.modules if m.split(".")[0] in ("unet_dcnv4", "pipelines")], "imported beforehand"
if sys.argv[1] == "--without-package":
    class NotInstalled:  # what the import system says when the package is not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "unet_dcnv4":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, NotInstalled())
    try:
        DiffusionPipeline.from_pretrained(sys.argv[2], trust_remote_code=True)
    except ImportError as err:
        print("ImportError:", err)
    sys.exit(0)
for folder in sys.argv[1:]:
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    np.testing.assert_array_equal(images, np.load(folder + "/expected.npy"))
    print(type(pipe).__name__, type(pipe.unet).__module__, type(pipe.unet).__name__)
print("unet_dcnv4 from", sys.modules["unet_dcnv4"].__file__)
"""


def load_in_fresh_process(args, cwd, env=None) -> str:
    """Run FRESH_LOAD with `args` in a new interpreter; returns its stdout (asserting it succeeded).
    Remote code goes to a module cache under cwd, not the user's."""
    env = dict(os.environ if env is None else env, HF_HOME=str(Path(cwd) / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", FRESH_LOAD, *map(str, args)], capture_output=True, text=True,
                            cwd=cwd, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def save_for_fresh_load(pipe, folder) -> None:
    """save_pretrained, plus the images FRESH_LOAD expects from the folder."""
    images = run_pipeline(pipe, output_type="np", num_inference_steps=2)
    pipe.save_pretrained(folder)
    np.save(Path(folder) / "expected.npy", images)
