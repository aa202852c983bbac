"""Pretraining step speed on CPU: images/s of a full train step (masks, SparK forward,
backward, AdamW), and the sparse step against the same encoder + decoder run densely
(no masking operations: the encoder outside its mask context, loss on the same cells).
"""

from __future__ import annotations

import argparse

import torch

from _common import median_seconds, write_result
from mwm.masking import random_masks
from mwm.pretrain.spark import SparKModel, masked_patch_loss

CASES = (("resnet18", 128, 32), ("resnet50", 224, 16))


def steps(arch: str, size: int, batch: int, bf16: bool):
    model = SparKModel(arch, input_size=size).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)

    def finish(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

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
        finish(masked_patch_loss(rec.float(), images, active, model.patch_size)[0])

    return sparse, dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rows = ["| encoder | px | batch | precision | sparse step s | images/s | dense step s | sparse / dense |",
            "|---|---|---|---|---|---|---|---|"]
    for arch, size, batch in CASES:
        for bf16 in (False, True):
            sparse, dense = steps(arch, size, batch, bf16)
            t_sparse = median_seconds(sparse, args.repeats)
            t_dense = median_seconds(dense, args.repeats)
            rows.append(f"| {arch} | {size} | {batch} | {'bf16' if bf16 else 'fp32'} | {t_sparse:.2f} | "
                        f"{batch / t_sparse:.1f} | {t_dense:.2f} | {t_sparse / t_dense:.2f}x |")
            print(rows[-1], flush=True)
    body = "\n".join(rows) + ("\n\nChannels-last, 60 % random masking, AdamW; target for "
                              "sparse / dense: within 1.25x.")
    write_result("pretrain_speed", "Pretraining step speed (CPU)", body)


if __name__ == "__main__":
    main()
