"""M2IB saliency throughput on CPU (or a GPU) for the full BiomedCLIP architecture (random weights).

The model is built offline exactly as the tests build it (timm ViT-B/16 trunk at 224 px
+ PubMedBERT-size text tower from a local config, 196 M parameters; see
``tests/vlm_fixtures.py``). Weights are random, which does not change the cost.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_saliency.py
    HF_HUB_OFFLINE=1 python benchmarks/bench_saliency.py --device cuda --images-b1 8 \
        --images-b8 64 --batch-large 64 --out benchmarks/results/saliency_speed_gpu.md

Writes ``benchmarks/results/saliency_speed.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images-b1", type=int, default=2, help="images timed at batch 1")
    ap.add_argument("--images-b8", type=int, default=8, help="images timed at batch 8")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--layer", type=int, default=7)
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast rows")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch-large", type=int, default=0,
                    help="also time this batch size (with --images-b8 images); 0 = off")
    ap.add_argument("--shifts", type=int, default=1, help="M2IB sub-patch shifts (n x n)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/saliency_speed.md"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    torch.set_flush_denormal(True)
    from vlm_fixtures import build_biomedclip_random

    from mwm.localize.m2ib import M2IBConfig, saliency_maps

    t0 = time.perf_counter()
    adapter = build_biomedclip_random().to(args.device)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in adapter.model.parameters()) / 1e6
    print(f"built {adapter} ({n_params:.1f} M parameters) in {build_s:.1f} s", flush=True)

    rng = np.random.default_rng(0)
    n_max = max(args.images_b1, args.images_b8)
    images = [rng.random((3, 256, 320)).astype(np.float32) for _ in range(n_max)]
    prompts = ["brain tumor"] * n_max
    t0 = time.perf_counter()
    adapter.embed_prompts(["brain tumor"])
    text_s = time.perf_counter() - t0
    # warm-up (kernel selection) outside the timings
    saliency_maps(adapter, images[:1], prompts[:1], M2IBConfig(layer=args.layer, steps=1, samples=2))

    rows = []
    modes = [False] if args.no_bf16 else [False, True]
    batches = [(1, args.images_b1), (8, args.images_b8)]
    if args.batch_large:
        batches.append((args.batch_large, args.images_b8))
    for amp in modes:
        for batch, n in batches:
            if n < 1:
                continue
            cfg = M2IBConfig(layer=args.layer, steps=args.steps, samples=args.samples,
                             batch_size=batch, amp=amp, shifts=args.shifts)
            t0 = time.perf_counter()
            maps = saliency_maps(adapter, images[:n], prompts[:n], cfg)
            if adapter.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            assert all(np.isfinite(m).all() for m in maps)
            row = {"precision": "bf16 autocast" if amp else "fp32", "batch": batch, "images": n,
                   "seconds": dt, "img_s": n / dt, "s_img": dt / n}
            rows.append(row)
            print(f"{row['precision']:>13}  batch {batch}: {n} images in {dt:.1f} s = "
                  f"{row['img_s']:.3f} images/s ({row['s_img']:.1f} s/image)", flush=True)

    load_end = os.getloadavg()[0]
    cmd = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_saliency.py" + (
        " " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    lines = [
        f"# M2IB saliency speed ({device_name(adapter.device)})",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, torch {torch.__version__}. 1-minute load average "
        f"{load_start:.1f} at the start and {load_end:.1f} at the end (on a CPU, a load above the "
        "thread count means other jobs competed for the cores).",
        "",
        f"Model: full BiomedCLIP architecture (timm ViT-B/16 trunk at 224 px, PubMedBERT-size "
        f"text tower), random weights, {n_params:.1f} M parameters, built offline in {build_s:.1f} s. "
        f"M2IB: layer {args.layer} (blocks {args.layer + 1}..{adapter.depth - 1} run per step), "
        f"steps {args.steps}, samples {args.samples}, shifts {args.shifts}; input images 256x320 (padded to square, "
        f"resized to 224). Text encoding (once per distinct prompt): {text_s:.2f} s.",
        "",
        "| precision | batch | images timed | seconds | images/s | s/image |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['batch']} | {r['images']} | {r['seconds']:.1f} | "
                     f"{r['img_s']:.3f} | {r['s_img']:.1f} |")
    lines += ["", f"Command: `{cmd}`", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}")
    return 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return "CPU"


if __name__ == "__main__":
    raise SystemExit(main())
