"""Masked pretraining of timm encoders: SparK-style sparse emulation for CNNs, MAE for ViTs.

* :mod:`.sparse` — sparse emulation of CNN layers, the mask passed via a context;
* :mod:`.encoders` — timm backbones as hierarchical encoders;
* :mod:`.decoder` — SparK's light UNet decoder;
* :mod:`.spark` — the model: mask → encode → densify → decode → loss;
* :mod:`.mae` — MAE for timm VisionTransformers (the encoder sees the visible tokens only);
* :mod:`.export` — the encoder in timm's key space (safetensors) and its loader.

The names below are imported lazily (``from mwm.pretrain import SparKModel``) so that
importing the package stays cheap.
"""

from __future__ import annotations

_LAZY = {
    "SparKModel": "spark", "SparKOutput": "spark",
    "MAEModel": "mae", "MAEOutput": "mae",
    "SparseContext": "sparse", "sparsify": "sparse",
    "create_encoder": "encoders", "Encoder": "encoders",
    "LightDecoder": "decoder",
    "export_encoder": "export", "load_encoder": "export", "read_metadata": "export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
