"""unet_dcnv4: Deformable Convolution v4 as a building block for latent-diffusion U-Nets.

The names below load on first access, so `import unet_dcnv4.ops` stays free of diffusers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "dcnv4": "unet_dcnv4.ops",
    "DCNv4": "unet_dcnv4.modules",
    "DCNv4Conv2d": "unet_dcnv4.modules",
    "DCNv4UNet2DModel": "unet_dcnv4.unet",
    "UNET_SIZES": "unet_dcnv4.unet",
    "build_unet": "unet_dcnv4.unet",
    "model_report": "unet_dcnv4.unet",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'unet_dcnv4' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
