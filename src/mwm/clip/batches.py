"""Which pairs of a CLIP training batch are not each other's negatives, and the caption
pool that swap-finding negatives are drawn from (:mod:`mwm.clip.train`)."""

from __future__ import annotations

from .data import CaptionPair, FindingTable, is_finding, lesion_free


def same_group(data: list[CaptionPair], idx: list[int], negatives: str, device,
                table: FindingTable | None = None):
    """``[i, j]`` = pairs ``i`` and ``j`` of the batch must not be each other's negatives.

    ``"normal"``: both are lesion-free (a no-finding label such as ``none``; with a
    findings table: no present finding other than anatomy, and a general caption),
    however their captions are worded; ``"label"``: both carry the same label (a finding
    caption: the same finding). Pairs without a label are never grouped.
    """
    import torch

    keys = []
    for i in idx:
        pair = data[i]
        label = pair.finding or pair.label
        if pair.findings is not None and table is not None:
            normal = lesion_free(pair, table)
            label = label if label is not None else ("" if normal else None)
        else:
            normal = not is_finding(label)
        if label is None or (negatives == "normal" and not normal):
            keys.append(None)
        else:
            keys.append("" if normal else label.strip().lower())
    index: dict[str, int] = {}
    ids = torch.tensor([-1 - n if k is None else index.setdefault(k, len(index))
                        for n, k in enumerate(keys)], device=device)
    return ids[:, None] == ids[None, :]


def same_image(data: list[CaptionPair], idx: list[int], device):
    """``[i, j]`` = pairs ``i`` and ``j`` show the same image (each caption is true of both)."""
    import torch

    index: dict[str, int] = {}
    ids = torch.tensor([index.setdefault(str(data[i].image), len(index)) for i in idx],
                       device=device)
    return ids[:, None] == ids[None, :]


def caption_pool(data: list[CaptionPair]) -> dict[str, list[str]]:
    """Finding → its training captions (the finding-caption pairs), in data order."""
    pool: dict[str, list[str]] = {}
    for pair in data:
        if pair.finding is not None:
            pool.setdefault(pair.finding, []).append(pair.caption)
    return pool
