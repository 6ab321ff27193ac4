"""Shared fixtures: the devices an op check runs on (each check is written once; the CUDA run is skipped where
there is no GPU and carries the `cuda` marker)."""

from __future__ import annotations

import pytest
import torch

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                           pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device the compiled op runs on: the CPU always, CUDA where a GPU is visible."""
    return torch.device(request.param)
