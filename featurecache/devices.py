"""Which device ``--device`` means: the one decision behind it for extraction, heads, fine-tuning and torchrun."""

from __future__ import annotations

from featurecache.errors import FeaturecacheError


def resolve_device(device: str) -> str:
    """``auto`` is CUDA when there is one, else the CPU; ``cuda[:N]`` without CUDA and unknown names are refused."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FeaturecacheError(f"--device {device} asked for, but CUDA is not available here; use --device cpu")
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):  # mps: Apple's GPU, for the heads and fine-tuning
        raise FeaturecacheError(f"unknown device {device!r}; choose auto, cpu, cuda[:N] or mps")
    return device
