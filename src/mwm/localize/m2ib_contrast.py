"""The prompt-contrastive M2IB objective's pieces: contrast prompts, the prompt's
log-softmax among them, and the presence score (``docs/m2ib.md``, "Prompt-contrastive
objective"). :mod:`mwm.localize.m2ib` uses them and re-exports the public ones.

The contrastive text term is τ times the log-softmax of the prompt t among
{t, c_1 .. c_K} (the prompt inside the log-sum-exp: bounded above by 0, saturating once
the prompt clearly wins, and equal to τ times the presence score). Contrast lists of
different lengths are padded and masked, so a batch equals its images one at a time.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .vlm import VLMAdapter

#: ``M2IBConfig.objective``: the published cosine to the prompt, or the prompt-contrastive
#: log-softmax.
OBJECTIVES = ("published", "contrastive")
#: Images embedded together by :func:`presence_scores` (one forward each, no gradients).
PRESENCE_BATCH = 32


def per_image_prompts(prompts, n: int) -> list:
    """One prompt (a string or an ensemble list) per image; a single string for all."""
    if isinstance(prompts, str):
        prompts = [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise DataError(f"M2IB: {n} images but {len(prompts)} prompts; give one prompt "
                        "(or prompt list) per image, or one string for all.")
    return prompts


def check_objective(objective: str, contrast) -> None:
    """The contrastive objective needs contrast prompts; the published one must not get
    them (silently ignoring them would let a user believe they shaped the maps)."""
    if objective == "contrastive" and contrast is None:
        raise DataError("M2IB: objective 'contrastive' needs contrast prompts: give the "
                        "findings the prompt must win against, e.g. other lesions and a "
                        "normal-anatomy prompt (contrast=['normal brain', 'cyst'], or one "
                        "list per image), or use objective 'published'.")
    if objective != "contrastive" and contrast is not None:
        raise DataError(f"M2IB: contrast prompts were given but objective is {objective!r}, "
                        "which does not use them; set objective 'contrastive' (--objective "
                        "contrastive) or leave the contrast prompts out.")


def contrast_lists(contrast, prompts: Sequence, keys: Sequence) -> list[list[str]]:
    """Each image's contrast strings: ``contrast`` is one list of strings for every image
    or one list per image. Duplicates count once; strings of the image's own prompt (or
    ensemble) are dropped. An image left without a contrast is an error naming it."""
    n = len(prompts)
    if isinstance(contrast, str) or not isinstance(contrast, Sequence):
        raise DataError(f"M2IB: contrast prompts must be a list of strings or one list per "
                        f"image, got {contrast!r}")
    contrast = list(contrast)
    if all(isinstance(c, str) for c in contrast):
        per_image = [contrast] * n
    elif all(isinstance(c, Sequence) and not isinstance(c, str) for c in contrast):
        if len(contrast) != n:
            raise DataError(f"M2IB: {n} images but {len(contrast)} contrast lists; give one "
                            "list per image, or one list of strings for all.")
        per_image = [list(c) for c in contrast]
    else:
        raise DataError("M2IB: contrast prompts must be all strings (one list for every "
                        "image) or all lists (one per image), not a mix.")
    out = []
    for key, prompt, items in zip(keys, prompts, per_image):
        if not all(isinstance(c, str) and c.strip() for c in items):
            raise DataError(f"M2IB: image {key!r}: every contrast prompt must be a non-empty "
                            f"string, got {items!r}")
        own = {prompt} if isinstance(prompt, str) else set(prompt)
        kept = [c for c in dict.fromkeys(items) if c not in own]
        if not items:
            raise DataError(f"M2IB: image {key!r} has no contrast prompts; give at least one "
                            "other finding or a normal-anatomy prompt.")
        if not kept:
            raise DataError(f"M2IB: image {key!r} has no contrast prompt other than its own "
                            f"prompt {prompt!r}; give at least one other finding or a "
                            "normal-anatomy prompt.")
        out.append(kept)
    return out


def contrast_embeddings(adapter: VLMAdapter, lists: Sequence[Sequence[str]]
                        ) -> tuple[Tensor, Tensor]:
    """((N, K, D) normalized embeddings, (N, K) bool mask): image i's contrasts padded to
    the longest list K; padded rows are zeros with mask False. Each distinct string is
    encoded once (the adapter's cache)."""
    distinct = list(dict.fromkeys(c for items in lists for c in items))
    table = adapter.embed_prompts(distinct)                               # (U, D)
    row = {c: i for i, c in enumerate(distinct)}
    k = max(len(items) for items in lists)
    index = torch.zeros(len(lists), k, dtype=torch.long)
    mask_nk = torch.zeros(len(lists), k, dtype=torch.bool)
    for i, items in enumerate(lists):
        index[i, :len(items)] = torch.tensor([row[c] for c in items])
        mask_nk[i, :len(items)] = True
    index, mask_nk = index.to(table.device), mask_nk.to(table.device)
    return table[index] * mask_nk[..., None], mask_nk


def prompt_log_softmax(emb_bsd: Tensor, text_bd: Tensor, contrast_bkd: Tensor,
                       mask_bk: Tensor, temperature: float) -> Tensor:
    """(B, S) log-softmax of the prompt among {prompt} ∪ contrasts, logits cos / τ.

    ``emb_bsd``: normalized image embeddings (S per image); padded contrasts (mask
    False) get a logit of -inf, so they weigh nothing and a batch equals its images one
    at a time. The prompt itself is in the denominator: the score is at most 0."""
    cos_t = (emb_bsd * text_bd[:, None]).sum(-1)                          # (B, S)
    cos_c = torch.einsum("bsd,bkd->bsk", emb_bsd, contrast_bkd)          # (B, S, K)
    cos_c = cos_c.masked_fill(~mask_bk[:, None], float("-inf"))
    logits = torch.cat([cos_t[..., None], cos_c], dim=-1) / temperature
    return logits[..., 0] - torch.logsumexp(logits, dim=-1)


def presence_scores(adapter: VLMAdapter, images: Sequence[np.ndarray],
                    prompts: Sequence[str | Sequence[str]] | str,
                    contrast: Sequence[str] | Sequence[Sequence[str]], *,
                    temperature: float = 0.1) -> np.ndarray:
    """(N,) float64: for each whole image (no bottleneck), the log-softmax of its prompt
    among {prompt} ∪ its contrasts (:func:`prompt_log_softmax`, logits cos / τ).

    At most 0; higher = the prompt fits the image better than every contrast; about
    −log(K + 1) when the image does not tell them apart. ``prompts`` and ``contrast``
    as in :func:`~mwm.localize.m2ib.saliency_maps`. One batched forward per :data:`PRESENCE_BATCH`
    images, without gradients."""
    images = list(images)
    prompts = per_image_prompts(prompts, len(images))
    if contrast is None:
        check_objective("contrastive", None)
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float))
                                             and math.isfinite(temperature) and temperature > 0):
        raise DataError(f"M2IB: temperature must be a finite number > 0, got {temperature!r}")
    if not images:
        return np.zeros(0)
    adapter.freeze()
    text = adapter.embed_prompts(prompts)
    contrast_nkd, mask_nk = contrast_embeddings(
        adapter, contrast_lists(contrast, prompts, range(len(images))))
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), PRESENCE_BATCH):
            stop = min(start + PRESENCE_BATCH, len(images))
            pixels = torch.stack([adapter.prepare(im)[0] for im in images[start:stop]])
            emb = adapter.encode_image(pixels.to(adapter.device, adapter.dtype)).float()
            scores.append(prompt_log_softmax(emb[:, None], text[start:stop].float(),
                                             contrast_nkd[start:stop].float(),
                                             mask_nk[start:stop], temperature)[:, 0])
    return torch.cat(scores).double().cpu().numpy()


def check_contrast_tensors(objective: str, rs: Tensor, text: Tensor, contrast: Tensor | None,
                           mask: Tensor | None
                           ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The text (B, D), contrast (B, K, D) and mask (B, K) on the device and dtype of the
    bottleneck's input ``rs`` (B, T, C), checked against the objective and the batch."""
    check_objective(objective, contrast)
    b = rs.shape[0]
    text = text.to(device=rs.device, dtype=rs.dtype)
    if contrast is None:
        return text, None, None
    if contrast.ndim != 3 or contrast.shape[0] != b or contrast.shape[2] != text.shape[1]:
        raise DataError(f"M2IB: contrast must be (B, K, D) = ({b}, K, {text.shape[1]}), "
                        f"got {tuple(contrast.shape)}")
    if mask is None:
        mask = torch.ones(contrast.shape[:2], dtype=torch.bool)
    if tuple(mask.shape) != tuple(contrast.shape[:2]):
        raise DataError(f"M2IB: contrast_mask must be {tuple(contrast.shape[:2])}, got "
                        f"{tuple(mask.shape)}")
    mask = mask.to(device=rs.device, dtype=torch.bool)
    if not mask.any(dim=1).all():
        raise DataError("M2IB: every image needs at least one contrast (a contrast_mask row "
                        "is all False)")
    return text, contrast.to(device=rs.device, dtype=rs.dtype), mask
