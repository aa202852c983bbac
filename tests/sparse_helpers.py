"""What the sparsity tests share: an encoder run on clean and on noised-where-masked input."""

import timm
import torch
from torch import nn

from mwm.masking import upsample_cells
from mwm.pretrain.sparse import is_sparse


def clean_and_noised(enc, ctx, x, active, cell: int):
    """Features of ``enc`` on ``x`` and on ``x`` with strong noise in the pixels of masked
    ``cell``-px cells (mask ``active``), and the outputs of every channels-first sparse
    layer during the clean pass: ``(clean, noised, layer_outputs)``."""
    pixels = upsample_cells(active[:, 0], cell).unsqueeze(1)
    noisy = torch.where(pixels, x, x + 50 * torch.randn_like(x))
    outputs = []
    channels_first = [m for m in enc.modules() if is_sparse(m) and (
        isinstance(m, timm.layers.LayerNorm2d) or not isinstance(m, (nn.Linear, nn.LayerNorm)))]
    hooks = [m.register_forward_hook(lambda mod, i, o: outputs.append(o)) for m in channels_first]
    try:
        with ctx.active(active):
            clean = enc(x)
            n_layers = len(outputs)
            noised = enc(noisy)
    finally:
        for h in hooks:
            h.remove()
    return clean, noised, outputs[:n_layers]
