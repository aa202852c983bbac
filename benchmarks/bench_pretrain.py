"""Pretraining speed on CPU, one table per question:

1. SparK: images/s of a full train step (masks, forward, backward, AdamW), and the sparse
   step against the same encoder + decoder run densely (no masking operations).
2. SparK's mask grid: the step with 16-px mask cells against 32-px cells (resnet18, 128 px;
   target: the 16-px step within 1.25x of the 32-px step).
3. MAE on timm ViTs: the step at 75% masking (the encoder sees the visible tokens only)
   against a dense ViT forward + backward on all tokens (target: MAE within 0.5x).
4. The data loader: images/s of one worker at 224 px (read, crop, flip, resize, region
   occupancy, standardize), so that a GPU run can size ``--workers``.

bf16 rows are measured only where the CPU computes bf16 natively (``--bf16`` forces them:
emulated bf16 was 20x slower than fp32 on an AVX2 CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from _common import median_seconds, write_result
from mwm.masking import random_masks
from mwm.pretrain.spark import SparKModel, masked_patch_loss

SPARK_CASES = (("resnet18", 128, 32), ("resnet50", 224, 16))
MASK_PATCH_CASE = ("resnet18", 128, 16)
VIT_CASES = (("vit_tiny_patch16_224", 224, None, 16), ("vit_small_patch16_224", 224, None, 16),
             ("vit_tiny_patch16_224", 64, 8, 32))


def _finish(optimizer):
    def finish(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return finish


def spark_steps(arch: str, size: int, batch: int, bf16: bool, mask_patch: int | None = None):
    extra = {} if mask_patch is None else {"mask_patch": mask_patch}
    model = SparKModel(arch, input_size=size, **extra).to(memory_format=torch.channels_last)
    finish = _finish(torch.optim.AdamW(model.parameters(), lr=1e-4))
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    cell = getattr(model, "mask_patch", model.patch_size)

    def sparse():
        active = random_masks(batch, model.grid(), 0.6, generator=gen).active_b1hw
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images, active)
        finish(out.loss)

    active = random_masks(batch, model.grid(), 0.6, generator=gen).active_b1hw

    def dense():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            feats = model.encoder(images)[::-1]
            dens = [proj(norm(f)) for f, norm, proj in zip(feats, model.densify_norms, model.densify_projs)]
            rec = model.decoder(dens)
        finish(masked_patch_loss(rec.float(), images, active, cell)[0])

    return sparse, dense


def vit_steps(arch: str, size: int, patch: int | None, batch: int, bf16: bool):
    """The MAE step at 75% masking, and timm's dense ViT on all tokens (same optimizer)."""
    import timm

    from mwm.pretrain.mae import MAEModel

    model = MAEModel(arch, input_size=size, patch_size=patch)
    finish = _finish(torch.optim.AdamW(model.parameters(), lr=1e-4))
    kwargs = {"img_size": size} if patch is None else {"img_size": size, "patch_size": patch}
    vit = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    finish_dense = _finish(torch.optim.AdamW(vit.parameters(), lr=1e-4))
    images = torch.randn(batch, 3, size, size)
    gen = torch.Generator().manual_seed(0)

    def mae():
        active = random_masks(batch, model.grid(), 0.75, generator=gen).active_b1hw
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images, active)
        finish(out.loss)

    def dense():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tokens = vit.forward_features(images)
        finish_dense(tokens.float().pow(2).mean())

    return mae, dense


def loader_rate(size: int, n: int = 48) -> float:
    """Images/s of one data-loading worker: ``RegionImageDataset`` items at ``size`` px
    from 256-px phantoms with their lesion masks (the first pass reads them from disk)."""
    from mwm.data.layouts import open_dataset
    from mwm.data.phantoms import generate_phantoms
    from mwm.pretrain.data import RegionImageDataset

    with tempfile.TemporaryDirectory() as tmp:
        generate_phantoms(tmp, n=n, size=256, seed=0, workers=1, progress=False)
        samples = open_dataset(tmp, f"{tmp}/masks").samples
        dataset = RegionImageDataset(samples, size)
        t0 = time.perf_counter()
        for index in range(len(dataset)):
            dataset[index]
        return len(dataset) / (time.perf_counter() - t0)


def precisions(force_bf16: bool) -> tuple[bool, ...]:
    from mwm.utils import native_bf16

    return (False, True) if force_bf16 or native_bf16(torch.device("cpu")) else (False,)


def spark_table(repeats: int, modes) -> list[str]:
    rows = ["| encoder | px | batch | precision | sparse step s | images/s | dense step s | sparse / dense |",
            "|---|---|---|---|---|---|---|---|"]
    for arch, size, batch in SPARK_CASES:
        for bf16 in modes:
            sparse, dense = spark_steps(arch, size, batch, bf16)
            t_sparse, t_dense = median_seconds(sparse, repeats), median_seconds(dense, repeats)
            rows.append(f"| {arch} | {size} | {batch} | {'bf16' if bf16 else 'fp32'} | {t_sparse:.2f} | "
                        f"{batch / t_sparse:.1f} | {t_dense:.2f} | {t_sparse / t_dense:.2f}x |")
            print(rows[-1], flush=True)
    return rows


def mask_patch_table(repeats: int, modes) -> list[str]:
    arch, size, batch = MASK_PATCH_CASE
    rows = ["| encoder | px | batch | precision | 32-px cells s | 16-px cells s | 16 / 32 |",
            "|---|---|---|---|---|---|---|"]
    for bf16 in modes:
        coarse = median_seconds(spark_steps(arch, size, batch, bf16)[0], repeats)
        fine = median_seconds(spark_steps(arch, size, batch, bf16, mask_patch=16)[0], repeats)
        rows.append(f"| {arch} | {size} | {batch} | {'bf16' if bf16 else 'fp32'} | {coarse:.2f} | "
                    f"{fine:.2f} | {fine / coarse:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def vit_table(repeats: int, modes) -> list[str]:
    rows = ["| ViT | px | patch | batch | precision | MAE step s | images/s | dense step s | MAE / dense |",
            "|---|---|---|---|---|---|---|---|---|"]
    for arch, size, patch, batch in VIT_CASES:
        for bf16 in modes:
            mae, dense = vit_steps(arch, size, patch, batch, bf16)
            t_mae, t_dense = median_seconds(mae, repeats), median_seconds(dense, repeats)
            rows.append(f"| {arch} | {size} | {patch or 16} | {batch} | {'bf16' if bf16 else 'fp32'} | "
                        f"{t_mae:.2f} | {batch / t_mae:.1f} | {t_dense:.2f} | {t_mae / t_dense:.2f}x |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 rows also where it is emulated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    modes = precisions(args.bf16)
    sections = [
        ("SparK step", spark_table(args.repeats, modes),
         "Channels-last, 60 % random masking, AdamW; target for sparse / dense: within 1.25x."),
        ("SparK mask cells of 16 px against 32 px", mask_patch_table(args.repeats, modes),
         "`--mask-patch 16`: 60 % random masking on the 16-px grid; target: within 1.25x."),
        ("MAE on timm ViTs against a dense ViT", vit_table(args.repeats, modes),
         "75 % random masking; the dense step is timm's ViT forward + backward on all tokens "
         "(no decoder); target: MAE within 0.5x."),
    ]
    rate = loader_rate(224)
    print(f"loader: {rate:.1f} images/s per worker at 224 px", flush=True)
    body = "\n\n".join(f"## {title}\n\n" + "\n".join(rows) + f"\n\n{note}"
                       for title, rows, note in sections)
    body += (f"\n\n## Data loader\n\nOne worker: {rate:.1f} images/s at 224 px (256-px phantom "
             "PNGs with lesion masks: read, crop, flip, resize, region occupancy, "
             "standardize). Workers for a GPU run: the GPU's images/s divided by this.")
    write_result("pretrain_speed", "Pretraining step speed (CPU)", body)


if __name__ == "__main__":
    main()
