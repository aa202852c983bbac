"""Mask sampling speed: vectorized region-aware sampler vs a per-sample Python loop.

The loop is what the reference did: for each image, the salient/background cell
indices (nonzero) and one random permutation per set. Also compares the sampler's
cost with one SparK ResNet-50 train step at 224 px.
"""

from __future__ import annotations

import argparse

import torch

from _common import median_seconds, write_result
from mwm.masking import cell_occupancy, masks_from_salient_cells, region_masks, salient_cells


def loop_masks(salient_bhw, ratio_salient, ratio_background, generator):
    batch = salient_bhw.shape[0]
    masked = torch.zeros(batch, salient_bhw[0].numel(), dtype=torch.bool)
    for b in range(batch):
        flat = salient_bhw[b].flatten()
        for cells, ratio in ((flat.nonzero().flatten(), ratio_salient),
                             ((~flat).nonzero().flatten(), ratio_background)):
            k = int(len(cells) * ratio + 0.5)
            masked[b, cells[torch.randperm(len(cells), generator=generator)[:k]]] = True
    return masked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--step-batch", type=int, default=16, help="batch of the R-50 step")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    gen = torch.Generator().manual_seed(0)
    regions = torch.zeros(args.batch, args.size, args.size, dtype=torch.bool)
    for b in range(args.batch):
        y, x = torch.randint(0, args.size - 80, (2,), generator=gen).tolist()
        regions[b, y:y + 80, x:x + 64] = True
    occupancy = median_seconds(lambda: salient_cells(cell_occupancy(regions, 32)), 10, 2)
    salient = salient_cells(cell_occupancy(regions, 32))
    vec = median_seconds(lambda: masks_from_salient_cells(salient, 0.8, 0.4, generator=gen), 50, 5)
    loop = median_seconds(lambda: loop_masks(salient, 0.8, 0.4, gen), 5, 1)

    from mwm.pretrain.spark import SparKModel

    model = SparKModel("resnet50", input_size=args.size).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.step_batch, 3, args.size, args.size).contiguous(
        memory_format=torch.channels_last)
    small = regions[:args.step_batch]

    def step():
        masks = region_masks(small, 32, 0.8, 0.4, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images, masks.active_b1hw)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = median_seconds(step, 3, 1)
    mask_small = median_seconds(lambda: region_masks(small, 32, 0.8, 0.4, generator=gen), 20, 3)
    body = (f"| measure | value |\n|---|---|\n"
            f"| pixel regions → salient cells (occupancy), batch {args.batch}, {args.size} px | {occupancy * 1e3:.2f} ms (shared by both; memory-bound) |\n"
            f"| vectorized sampling from the cells, batch {args.batch}, 7x7 grid | {vec * 1e3:.3f} ms |\n"
            f"| per-sample loop (nonzero + randperm per image), same batch | {loop * 1e3:.2f} ms |\n"
            f"| speed-up | **{loop / vec:.0f}x** (target ≥ 50x) |\n"
            f"| SparK ResNet-50 train step, batch {args.step_batch}, {args.size} px, bf16, AdamW | {step_s:.2f} s |\n"
            f"| masking for that batch (occupancy + sampling) | {mask_small * 1e3:.3f} ms = **{100 * mask_small / step_s:.3f} %** of the step (target < 2 %) |\n")
    print(body)
    write_result("masking", "Mask sampling speed", body)


if __name__ == "__main__":
    main()
