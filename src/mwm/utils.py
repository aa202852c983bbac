"""Small shared helpers: seeding, device selection and mixed precision."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so that a run is repeatable on CPU."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> "torch.device":  # noqa: F821
    """``auto`` → the first CUDA GPU if there is one, else CPU; anything else as given."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible. Use --device cpu.")
    return device


AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def native_bf16(device: "torch.device") -> bool:  # noqa: F821
    """Whether ``device`` computes bf16 in hardware (not emulated through fp32).

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and newer). CPU: AVX512-BF16 or AMX
    tiles (Cooper Lake, Sapphire Rapids, Zen 4 and newer). Other devices: False.
    """
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def resolve_amp(amp: str, device: "torch.device") -> "torch.dtype | None":  # noqa: F821
    """The autocast dtype for ``--amp`` on ``device``; ``None`` = no autocast (fp32).

    The one rule of every MWM trainer (pretrain, finetune, detect):

    * ``auto`` → bf16 where the device computes bf16 in hardware (:func:`native_bf16`: a
      CUDA GPU with bf16, a CPU with AVX512-BF16/AMX — 1.3–2.5x faster than fp32 on the
      project's CPU), else fp32. Never fp16: fp16 needs loss scaling, so it is opt-in.
    * ``bf16`` → bf16 on any device (emulated and slow where not native).
    * ``fp16`` → fp16, CUDA only (the trainers pair it with a gradient scaler).
    * ``none`` → fp32.
    """
    import torch

    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"--amp fp16 needs a CUDA GPU (device is {device}); "
                         "use --amp bf16 or none.")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
