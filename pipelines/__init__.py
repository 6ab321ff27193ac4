"""Sampling pipelines: the latent diffusion pipeline and the samplers it can use."""

# diffusers loads a component class named in model_index.json only from a module already imported:
# importing the model module here lets pipeline folders with a DCNv4 U-Net load.
import unet_dcnv4.unet  # noqa: F401

from .pipeline_latent_diffusion import OUTPUT_TYPES, SAMPLERS, LatentDiffusionPipeline, make_scheduler

__all__ = ["LatentDiffusionPipeline", "make_scheduler", "SAMPLERS", "OUTPUT_TYPES"]
