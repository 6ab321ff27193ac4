"""Sampling pipelines: the latent diffusion pipeline and the samplers it can use."""

from .pipeline_latent_diffusion import OUTPUT_TYPES, SAMPLERS, LatentDiffusionPipeline, make_scheduler

__all__ = ["LatentDiffusionPipeline", "make_scheduler", "SAMPLERS", "OUTPUT_TYPES"]
