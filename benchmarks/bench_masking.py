"""Mask sampling speed: the vectorized samplers vs per-sample Python loops.

Baselines (what a straightforward per-image implementation does; no extra work added):

* region loop: for each image, ``nonzero`` of its salient cells and of its background
  cells, one ``randperm`` per group, the first ``round(n * ratio)`` of each permutation
  marked as masked by index assignment (the reference's way).
* random loop: for each image, one ``randperm`` of the cells and the first
  ``round(N * ratio)`` marked as masked.

Vectorized and loop timings are interleaved round by round (the machine is shared), and
the 1-minute load average is recorded at the start of every round. Each call draws new
random keys, so sort timings are on fresh data (re-sorting one fixed tensor lets the
branch predictor learn it and looks ~3x faster than real use). Also compares the
sampler's cost with one SparK ResNet-50 train step at 224 px.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from _common import write_result
from mwm.masking import (cell_occupancy, masks_from_salient_cells, random_masks, region_masks,
                         salient_cells)


def loop_region_masks(salient_bhw, ratio_salient, ratio_background, generator):
    batch = salient_bhw.shape[0]
    masked = torch.zeros(batch, salient_bhw[0].numel(), dtype=torch.bool)
    for b in range(batch):
        flat = salient_bhw[b].flatten()
        for cells, ratio in ((flat.nonzero().flatten(), ratio_salient),
                             ((~flat).nonzero().flatten(), ratio_background)):
            k = int(len(cells) * ratio + 0.5)
            masked[b, cells[torch.randperm(len(cells), generator=generator)[:k]]] = True
    return masked


def loop_random_masks(batch, n_cells, ratio, generator):
    masked = torch.zeros(batch, n_cells, dtype=torch.bool)
    k = int(n_cells * ratio + 0.5)
    for b in range(batch):
        masked[b, torch.randperm(n_cells, generator=generator)[:k]] = True
    return masked


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of one call. CPU time leaves out the time the
    process waits for a core, so it moves less with the load of a shared machine."""
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(wall), statistics.median(cpu)


def interleaved(cases: dict, rounds: int) -> tuple[dict, dict, list[float]]:
    """Median wall and CPU seconds per case over ``rounds`` rounds; each round runs every
    case (its own repeat count), so a load spike hits all cases alike."""
    for fn, _ in cases.values():  # warm-up
        fn()
    walls = {name: [] for name in cases}
    cpus = {name: [] for name in cases}
    loads = []
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        for name, (fn, repeats) in cases.items():
            wall, cpu = _time(fn, repeats)
            walls[name].append(wall)
            cpus[name].append(cpu)
    return ({name: statistics.median(v) for name, v in walls.items()},
            {name: statistics.median(v) for name, v in cpus.items()}, loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--step-batch", type=int, default=16, help="batch of the R-50 step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-step", action="store_true", help="skip the ResNet-50 step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    gen = torch.Generator().manual_seed(0)
    regions = torch.zeros(args.batch, args.size, args.size, dtype=torch.bool)
    for b in range(args.batch):
        y, x = torch.randint(0, args.size - 80, (2,), generator=gen).tolist()
        regions[b, y:y + 80, x:x + 64] = True
    salient = salient_cells(cell_occupancy(regions, 32))
    grid = tuple(salient.shape[1:])
    n_cells = grid[0] * grid[1]
    keys = torch.empty(args.batch, n_cells)

    def torch_argsort_fresh():  # the old CPU floor: new uniform keys, torch's argsort
        return keys.uniform_(generator=gen).argsort(dim=1)

    cases = {
        "region_vec": (lambda: masks_from_salient_cells(salient, 0.8, 0.4, generator=gen), 100),
        "region_loop": (lambda: loop_region_masks(salient, 0.8, 0.4, gen), 3),
        "random_vec": (lambda: random_masks(args.batch, grid, 0.6, generator=gen), 100),
        "random_loop": (lambda: loop_random_masks(args.batch, n_cells, 0.6, gen), 5),
        "torch_argsort": (torch_argsort_fresh, 100),
        "occupancy": (lambda: salient_cells(cell_occupancy(regions, 32)), 3),
    }
    t, c, loads = interleaved(cases, args.rounds)
    load_range = f"1-min load {min(loads):.2f}–{max(loads):.2f} over the rounds"

    def row(label, name, digits=3):
        return f"| {label} | {t[name] * 1e3:.{digits}f} ms | {c[name] * 1e3:.{digits}f} ms |\n"

    def speedup(label, loop, vec):
        return (f"| {label} | **{t[loop] / t[vec]:.0f}x** | **{c[loop] / c[vec]:.0f}x** |\n")

    body = (f"Interleaved, median of {args.rounds} rounds (each round: median of its repeats); "
            f"{args.threads} torch threads; {load_range}. Wall = elapsed time; CPU = process "
            f"CPU time (less sensitive to other jobs on the machine). Target: ≥ 50x.\n\n"
            f"| measure (batch {args.batch}, {grid[0]}x{grid[1]} grid) | wall | CPU |\n|---|---|---|\n"
            + row("region-aware, vectorized (`masks_from_salient_cells`, 0.8 / 0.4)", "region_vec")
            + row("region-aware, per-sample loop (nonzero + randperm per group and image)",
                  "region_loop", 2)
            + speedup("region-aware speed-up", "region_loop", "region_vec")
            + row("random, vectorized (`random_masks`, 0.6)", "random_vec")
            + row("random, per-sample loop (randperm per image)", "random_loop", 2)
            + speedup("random speed-up", "random_loop", "random_vec")
            + row("reference: `torch.argsort` of fresh uniform keys alone (the previous "
                  "samplers' sort)", "torch_argsort")
            + row(f"pixel regions → salient cells ({args.size} px; shared by both, not in the "
                  "speed-up)", "occupancy", 2))
    if not args.skip_step:
        body += step_rows(args, regions, gen)
    print(body)
    write_result("masking", "Mask sampling speed", body)


def step_rows(args, regions, gen) -> str:
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

    step()  # warm-up
    load = os.getloadavg()[0]
    step_wall, step_cpu = _time(step, 3)
    mask = lambda: region_masks(small, 32, 0.8, 0.4, generator=gen)  # noqa: E731
    mask()
    mask_wall, mask_cpu = _time(mask, 50)
    return (f"\n| train step vs masking | wall | CPU |\n|---|---|---|\n"
            f"| SparK ResNet-50 train step, batch {args.step_batch}, {args.size} px, bf16, AdamW "
            f"(1-min load {load:.2f}) | {step_wall:.2f} s | {step_cpu:.2f} s |\n"
            f"| masking for that batch (occupancy + salient cells + sampling) | "
            f"{mask_wall * 1e3:.3f} ms | {mask_cpu * 1e3:.3f} ms |\n"
            f"| masking / step (target < 2 %) | **{100 * mask_wall / step_wall:.4f} %** | "
            f"**{100 * mask_cpu / step_cpu:.4f} %** |\n")


if __name__ == "__main__":
    main()
