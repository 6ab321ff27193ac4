"""A diffusers `DiffusionPipeline` for latent diffusion (U-Net on VAE latents, then VAE decoding), with its samplers.

A saved folder carries a copy of this file and loads with `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)` in any process where the unet_dcnv4 package is installed, or with the installed
code through `LatentDiffusionPipeline.from_pretrained(folder)`.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    ImagePipelineOutput,
)
from diffusers.utils.torch_utils import randn_tensor

# The copy in a saved folder is imported on its own, before the components load. diffusers finds a
# component class named in model_index.json, such as ["unet_dcnv4.unet", "DCNv4UNet2DModel"], only in a
# module already imported: importing the installed model module here is what lets the folder load.
try:
    import unet_dcnv4.unet  # noqa: F401
except ModuleNotFoundError as err:
    if (err.name or "").split(".")[0] != "unet_dcnv4":  # missing here, not missing inside it
        raise
    raise ImportError("this latent diffusion pipeline needs the unet_dcnv4 package, which is not installed: "
                      "pip install the unet_dcnv4 checkout or wheel") from err

SAMPLERS = ("ddim", "dpmsolver++", "euler")
OUTPUT_TYPES = ("pil", "np", "latent")
_MODULE_NAME = os.path.splitext(os.path.basename(__file__))[0]


def make_scheduler(name, train_scheduler_config):
    """Build a sampling scheduler from the noise schedule the model was trained with.

    Args:
        name: one of "ddim", "dpmsolver++" (second-order multistep, data prediction) or "euler".
        train_scheduler_config: the training scheduler's config (a dict, a diffusers config, or a scheduler whose
            `.config` is used), e.g. a `DDPMScheduler`'s; betas, timesteps and prediction type carry over.

    Returns:
        A diffusers scheduler.
    """
    config = getattr(train_scheduler_config, "config", train_scheduler_config)
    if not hasattr(config, "keys"):
        raise TypeError(
            "train_scheduler_config must be a scheduler or its config dict, "
            f"got {type(train_scheduler_config).__name__}"
        )
    if name == "ddim":
        # Latents are not bounded to [-1, 1]; clipping x0 there would shrink every sample towards grey.
        return DDIMScheduler.from_config(config, clip_sample=False)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    raise ValueError(f"sampler name must be one of {SAMPLERS}, got {name!r}")


class LatentDiffusionPipeline(DiffusionPipeline):
    """Unconditional or class-conditional latent diffusion, with classifier-free guidance for models trained with
    label dropout.

    Args:
        unet: a `UNet2DModel` (or `DCNv4UNet2DModel`) predicting noise (or v) on latents of shape
            (B, unet.config.in_channels, sample_size, sample_size).
        vae: an `AutoencoderKL`; latents are divided by `vae.config.scaling_factor` (and shifted by
            `vae.config.shift_factor` where the VAE has one) before decoding, the inverse of how they were encoded.
        scheduler: any diffusers scheduler sharing the training noise schedule (see `make_scheduler`).
        null_class_label: the class embedding trained as "no class" (label dropout), the unet's last; None when the
            model has none (then guidance is refused).
        class_counts: images per class in the training set (the default class mix of samples for FID), or None.
    """

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet, vae, scheduler, null_class_label: int | None = None, class_counts: list[int] | None = None):
        super().__init__()
        num_classes = unet.config.num_class_embeds
        if null_class_label is not None and (num_classes is None or null_class_label != num_classes - 1):
            last = None if num_classes is None else num_classes - 1
            raise ValueError(f"null_class_label must be the unet's last class embedding ({last}), got {null_class_label}")
        if class_counts is not None and len(class_counts) != self._real_classes(unet, null_class_label):
            raise ValueError(f"class_counts must hold one count per class "
                             f"({self._real_classes(unet, null_class_label)}), got {len(class_counts)}")
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)
        self.register_to_config(null_class_label=null_class_label,
                                class_counts=None if class_counts is None else [int(c) for c in class_counts])

    @staticmethod
    def _real_classes(unet, null_class_label) -> int | None:
        num_classes = unet.config.num_class_embeds
        if num_classes is None:
            return None
        return num_classes - (null_class_label is not None)

    def check_guidance_scale(self, guidance_scale: float) -> None:
        """Raise ValueError unless this pipeline can sample with `guidance_scale` (1.0 always; other scales need
        the null class of a model trained with label dropout)."""
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
        if guidance_scale != 1.0 and self.config.null_class_label is None:
            raise ValueError(f"guidance_scale {guidance_scale} needs a class-conditional model trained with label "
                             "dropout (class_dropout_prob > 0, which adds the null class); this one has no null class")

    @property
    def num_classes(self) -> int | None:
        """The classes a sample can be asked for (the null class of classifier-free guidance excluded)."""
        return self._real_classes(self.unet, self.config.null_class_label)

    def save_pretrained(self, save_directory, **kwargs):
        """Save like any diffusers pipeline, plus a copy of this file named in `model_index.json`."""
        super().save_pretrained(save_directory, **kwargs)
        shutil.copyfile(__file__, os.path.join(save_directory, f"{_MODULE_NAME}.py"))
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        # A [module, class] pair is how diffusers finds a pipeline class that the folder itself carries.
        index["_class_name"] = [_MODULE_NAME, type(self).__name__]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load_config(cls, *args, **kwargs):
        """Read `model_index.json`; when loading through this class, name the class itself, not the folder's copy."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = config["_class_name"][1]
        return loaded

    def _class_label_tensor(self, class_labels, batch_size: int) -> torch.Tensor | None:
        num_classes = self.num_classes
        if num_classes is None:
            if class_labels is not None:
                raise ValueError("class_labels were given, but the unet is unconditional (num_class_embeds is None)")
            return None
        if class_labels is None:
            raise ValueError(f"class_labels are required: the unet is conditioned on {num_classes} classes")
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"class_labels must hold 1 or batch_size={batch_size} labels, got {labels.numel()}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_labels must lie in [0, {num_classes}), got {labels.tolist()}")
        return labels.to(self._execution_device)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        class_labels: int | list[int] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Sample images.

        Args:
            batch_size: number of images B.
            generator: a generator, or a list of B generators (one per image, so that each image depends only on its
                own generator); CPU generators give the same noise on every device.
            num_inference_steps: denoising steps.
            class_labels: for a class-conditional unet, one label for all images or B labels; None otherwise.
            guidance_scale: classifier-free guidance scale s: the prediction is uncond + s * (cond - uncond), the
                conditional and null-class predictions from one batched unet call. 1.0 is plain conditional
                sampling (one unet call at the batch size). Needs a model trained with label dropout.
            output_type: "pil" (list of PIL images), "np" (float array (B, H, W, 3) in [0, 1]) or "latent"
                (the final latents (B, C, h, w), still scaled, not decoded).
            return_dict: return an `ImagePipelineOutput` rather than a tuple.

        Returns:
            `ImagePipelineOutput(images=...)`, or `(images,)` when return_dict is False.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator must be one generator or a list of batch_size={batch_size}, "
                             f"got a list of {len(generator)}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        self.check_guidance_scale(guidance_scale)
        guided = guidance_scale != 1.0
        device = self._execution_device
        labels = self._class_label_tensor(class_labels, batch_size)
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.config.null_class_label)])  # (2B,)

        # 1. Initial noise, kept in fp32 so that the scheduler's arithmetic does not depend on the model's dtype.
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, height, width)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents * self.scheduler.init_noise_sigma

        # 2. Timesteps.
        self.scheduler.set_timesteps(num_inference_steps, device=device)

        # 3. Denoising loop.
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t).to(self.unet.dtype)
            if guided:
                model_input = torch.cat([model_input, model_input])  # (2B, C, h, w): conditional, then null class
            model_output = self.unet(model_input, t, class_labels=labels).sample
            if guided:
                cond, uncond = model_output.float().chunk(2)
                model_output = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(model_output.float(), t, latents, generator=generator).prev_sample

        if output_type == "latent":
            images = latents
        else:
            # 4. Undo the latent scaling and decode.
            latents = latents / self.vae.config.scaling_factor
            shift = getattr(self.vae.config, "shift_factor", None)
            if shift is not None:
                latents = latents + shift
            decoded = self.vae.decode(latents.to(self.vae.dtype)).sample
            images = (decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

