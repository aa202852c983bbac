"""Contrastive image–text losses: symmetric InfoNCE (CLIP) and DHN-NCE.

Both losses take L2-normalised image and text embeddings of one batch, where row ``i``
of each is a matching pair, and an optional boolean matrix ``same`` with
``same[i, j] = True`` when pairs ``i`` and ``j`` carry the *same caption*. Such pairs
are false negatives (two "no lesion" images with the same sentence are not a mismatch),
so every off-diagonal ``same`` entry is removed from the negatives, in both directions.

InfoNCE (Radford et al., CLIP)::

    s_ij  = exp(logit_scale) * <v_i, t_j>
    L_v2t = mean_i  -log( exp(s_ii) / sum_{j in P_i ∪ N_i} exp(s_ij) )     P_i = {i}
    L     = (L_v2t + L_t2v) / 2

DHN-NCE (decoupled hard-negative NCE; Koleilat et al., MedCLIP-SAM 2024, after the
HN-NCE of Radenovic et al. 2023 with alpha = 0)::

    s_ij  = <v_i, t_j> / tau
    N_i   = {j != i : caption_j != caption_i}                 (the negatives of row i)
    w_ij  = |N_i| * exp(beta1 * s_ij) / sum_{k in N_i} exp(beta1 * s_ik)     (j in N_i)
    L_v2t = mean_i  -log( exp(s_ii) / sum_{j in N_i} w_ij * exp(s_ij) )
    L_t2v = the same on s^T with beta2
    L     = L_v2t + L_t2v

The positive is *not* in the denominator (decoupled contrastive learning), so the loss
can go below zero. The weights average to 1 over ``N_i`` and grow with the similarity of
a negative (``beta = 0`` gives the plain decoupled loss). A row without any negative
(every caption in the batch identical) carries no contrastive signal and is left out
of the mean; a batch without any usable row gives a loss of 0 that still has a
gradient graph.

*Extra negatives* (``extra``, ``owner``): K more text embeddings, each a negative of one
image only (row ``owner[k]``), e.g. the caption of a finding that image does not have
(the swap-finding negatives of ``mwm clip train``). They join the image→text
denominator of their row (InfoNCE: one more logit; DHN-NCE: one more member of
``N_i``); the text→image direction is unchanged, as they have no image.

*Phrase loss* (:func:`phrase_loss`, SigLIP-style, Zhai et al. 2023): for every image
``i`` and finding phrase ``f`` a binary logistic loss on ``z_if = a * <v_i, p_f> + b``
with target "finding f is present in image i"; ``a`` and ``b`` are learned
(:class:`PhraseHead`). See ``docs/clip-training.md``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

LOSSES = ("infonce", "dhn-nce")


def same_caption_matrix(captions: Sequence[str], device: torch.device | str | None = None
                        ) -> torch.Tensor:
    """``same[i, j]`` = captions ``i`` and ``j`` are identical (case and spacing ignored)."""
    keys = [" ".join(str(c).lower().split()) for c in captions]
    index: dict[str, int] = {}
    ids = torch.tensor([index.setdefault(k, len(index)) for k in keys], device=device)
    return ids[:, None] == ids[None, :]


def _negatives(n: int, same: torch.Tensor | None, device) -> torch.Tensor:
    eye = torch.eye(n, dtype=torch.bool, device=device)
    if same is None:
        return ~eye
    if same.shape != (n, n):
        raise ValueError(f"same-caption matrix has shape {tuple(same.shape)}, expected ({n}, {n})")
    return ~(eye | same.to(device=device, dtype=torch.bool))


def owner_mask(n: int, owner: torch.Tensor | None, device=None) -> torch.Tensor | None:
    """(n, K) bool: ``[i, k]`` = extra negative ``k`` belongs to image ``i``."""
    if owner is None:
        return None
    rows = torch.arange(n, device=device)
    return owner.to(device=device, dtype=torch.long)[None, :] == rows[:, None]


def infonce_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float,
                 same: torch.Tensor | None = None, extra: torch.Tensor | None = None,
                 owner: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric CLIP InfoNCE; ``logit_scale`` is the *log* of the inverse temperature.

    ``extra`` (K, D) with ``owner`` (K,): extra image→text negatives, one row each."""
    scale = logit_scale.exp() if torch.is_tensor(logit_scale) else math.exp(logit_scale)
    logits = scale * image.float() @ text.float().t()
    n = logits.shape[0]
    keep = _negatives(n, same, logits.device) | torch.eye(n, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(~keep, float("-inf"))
    target = torch.arange(n, device=logits.device)
    v2t = logits
    if extra is not None and extra.shape[0]:
        hard = (scale * image.float() @ extra.float().t()).masked_fill(
            ~owner_mask(n, owner, logits.device), float("-inf"))          # (n, K)
        v2t = torch.cat([logits, hard], dim=1)
    return (F.cross_entropy(v2t, target) + F.cross_entropy(logits.t(), target)) / 2


def _dhn_direction(s: torch.Tensor, neg: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean over rows with negatives of  -s_ii + log sum_{j in N_i} w_ij exp(s_ij)."""
    counts = neg.sum(dim=1)
    valid = counts > 0
    if not bool(valid.any()):
        return s.sum() * 0.0
    ninf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    bs = torch.where(neg, beta * s, ninf)
    # log w_ij = log|N_i| + beta*s_ij - logsumexp_{k in N_i}(beta*s_ik)
    log_w = counts.clamp(min=1).to(s.dtype).log()[:, None] + bs - torch.logsumexp(
        torch.where(valid[:, None], bs, torch.zeros_like(bs)), dim=1, keepdim=True)
    log_den = torch.logsumexp(torch.where(neg, log_w + s, ninf), dim=1)
    per_row = log_den - s.diagonal()
    return per_row[valid].mean()


def dhn_nce_loss(image: torch.Tensor, text: torch.Tensor, tau: float | torch.Tensor = 0.07,
                 beta1: float = 0.15, beta2: float = 0.15,
                 same: torch.Tensor | None = None, extra: torch.Tensor | None = None,
                 owner: torch.Tensor | None = None) -> torch.Tensor:
    """Decoupled hard-negative NCE, ``L_v2t + L_t2v`` (formula in the module docstring).

    ``extra`` (K, D) with ``owner`` (K,): extra image→text negatives, one row each."""
    s = image.float() @ text.float().t() / tau
    neg = _negatives(s.shape[0], same, s.device)
    s_v2t, neg_v2t = s, neg
    if extra is not None and extra.shape[0]:
        # the pairs' columns come first, so the diagonal of (n, n + K) is still the positive
        s_v2t = torch.cat([s, image.float() @ extra.float().t() / tau], dim=1)
        neg_v2t = torch.cat([neg, owner_mask(s.shape[0], owner, s.device)], dim=1)
    # ``same`` is symmetric, so the text→image negatives are the transpose (= the same mask).
    return _dhn_direction(s_v2t, neg_v2t, beta1) + _dhn_direction(s.t(), neg.t(), beta2)


def contrastive_loss(name: str, image: torch.Tensor, text: torch.Tensor,
                     logit_scale: torch.Tensor, same: torch.Tensor | None = None, *,
                     tau: float | None = None, beta1: float = 0.15,
                     beta2: float = 0.15, extra: torch.Tensor | None = None,
                     owner: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch by name. For DHN-NCE, ``tau=None`` uses the model's learnable temperature."""
    if name == "infonce":
        return infonce_loss(image, text, logit_scale, same, extra, owner)
    if name == "dhn-nce":
        temperature = (1.0 / logit_scale.exp()) if tau is None else tau
        return dhn_nce_loss(image, text, temperature, beta1, beta2, same, extra, owner)
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")


#: Initial scale and bias of the phrase logits (learned): cosines in [-1, 1] become
#: logits in [-10, 10], centred (the targets are far from SigLIP's one positive per row).
PHRASE_INIT_SCALE, PHRASE_INIT_BIAS = 10.0, 0.0


class PhraseHead(torch.nn.Module):
    """The learned scale (as a log, clamped to [0, log 100] by the trainer) and bias of
    :func:`phrase_loss`. Training only: the saved CLIP model does not contain it."""

    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(PHRASE_INIT_SCALE)))
        self.logit_bias = torch.nn.Parameter(torch.tensor(PHRASE_INIT_BIAS))

    def forward(self, image: torch.Tensor, phrases: torch.Tensor, present: torch.Tensor,
                known: torch.Tensor | None = None) -> torch.Tensor:
        return phrase_loss(image, phrases, present, self.logit_scale, self.logit_bias, known)


def phrase_loss(image: torch.Tensor, phrases: torch.Tensor, present: torch.Tensor,
                logit_scale: torch.Tensor | float, logit_bias: torch.Tensor | float = 0.0,
                known: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-label phrase loss: mean binary cross-entropy of ``sigmoid(a <v_i, p_f> + b)``
    against ``present[i, f]``.

    ``image`` (B, D) and ``phrases`` (F, D): L2-normalised embeddings; ``present`` (B, F)
    bool; ``logit_scale``: log a; ``known`` (B,) bool: images whose findings are known
    (the others are left out of the mean; none known gives 0 with a gradient graph).
    ``image`` may also be (B, N, D) patch-token embeddings: the similarity is then the
    maximum over the tokens (multiple-instance: one token carrying the finding suffices,
    and lesion-free images push every token away from the phrase).
    """
    scale = logit_scale.exp() if torch.is_tensor(logit_scale) else math.exp(logit_scale)
    if image.dim() == 3:
        sim = torch.einsum("bnd,fd->bnf", image.float(), phrases.float()).amax(dim=1)
    else:
        sim = image.float() @ phrases.float().t()
    logits = scale * sim + logit_bias                                           # (B, F)
    bce = F.binary_cross_entropy_with_logits(logits, present.to(logits.dtype), reduction="none")
    if known is None:
        return bce.mean()
    rows = known.to(device=bce.device, dtype=torch.bool)
    return bce[rows].mean() if bool(rows.any()) else bce.sum() * 0.0
