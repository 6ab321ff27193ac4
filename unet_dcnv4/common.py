"""What several modules of the package use, below all of them (it imports none of them): the precisions a run
or a sampler may use, the seed of each random stream, and how to tell that the Hugging Face Hub is out of reach.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch

__all__ = ["PRECISIONS", "derive_seed", "hub_offline", "transport_errors"]

# mixed_precision of training and sampling: the dtype each name computes in.
PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def derive_seed(seed: int, purpose: str, *keys: int) -> int:
    """The seed of one random stream of a run, mixed from (seed, purpose, keys) by numpy's `SeedSequence`.

    Streams of different seeds, purposes or keys are independent: unlike `seed + epoch`, seed 1 does not replay
    the streams of seed 0 one epoch later.

    Args:
        seed: the run's seed, an int >= 0.
        purpose: names the stream ("data", "noise", ...).
        keys: ints >= 0 that pick one stream of the purpose (an epoch, a process rank, a step).

    Returns:
        An int in [0, 2**63), for `torch.Generator.manual_seed`.
    """
    for name, value in (("seed", seed), *((f"keys[{i}]", k) for i, k in enumerate(keys))):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not isinstance(purpose, str) or not purpose:
        raise ValueError(f"purpose must be a non-empty string, got {purpose!r}")
    sequence = np.random.SeedSequence(int(seed), spawn_key=(zlib.crc32(purpose.encode()), *map(int, keys)))
    return int(sequence.generate_state(1, dtype=np.uint64)[0]) >> 1


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off ($HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")


def transport_errors() -> tuple[type[Exception], ...]:
    """The connection errors of the Hub's HTTP client beside OSError: huggingface_hub speaks HTTP through httpx,
    whose connection errors are not OSErrors."""
    try:
        import httpx
    except ImportError:
        return ()
    return (httpx.TransportError,)
