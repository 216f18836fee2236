"""Seeding and device selection, so the same inputs and seed give the same numbers on CPU."""

from __future__ import annotations

import os
import random

import numpy as np

from pertbench.errors import ConfigError


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and PyTorch global generators; return a fresh NumPy Generator.

    Library code should prefer passing explicit generators (``np.random.default_rng(seed)``,
    ``torch.Generator``); this function exists for third-party code that uses global state.
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 (seeds third-party code using global state)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    try:
        import torch
    except ImportError:  # torch is a hard dependency, but keep data-only use light
        pass
    else:
        torch.manual_seed(seed)
    return np.random.default_rng(seed)


def resolve_device(device: str = "auto") -> str:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N" | "mps"`` into a concrete torch device string.

    ``auto`` uses CUDA when available, else CPU. Asking for CUDA without a GPU is an error
    rather than a silent fallback, because timings and numerics would differ from what the
    user asked for.
    """
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device '{device}' was requested but no CUDA GPU is available; use --device cpu or auto"
            )
        return device
    if device == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(
                "device 'mps' was requested but is not available; use --device cpu or auto"
            )
        return device
    if device == "cpu":
        return device
    raise ConfigError(f"unknown device '{device}'; choose auto, cpu, cuda, cuda:N or mps")
