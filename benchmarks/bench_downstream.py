"""Downstream value of pretraining on brain-MRI phantoms (CPU budget).

Pretrains resnet18 with region-aware masking on the phantoms' lesion masks (the
ground-truth-region variant: an upper bound for text-localized regions) for a fixed
number of epochs, then compares runs from that encoder against the same runs from
scratch:

* ``classify``: linear probing and fine-tuning (``benchmarks/results/downstream.md``,
  with a short Mask R-CNN from each encoder);
* ``segment``: ``mwm segment`` with the decoder on the frozen encoder (probe) and with
  every weight trained (finetune): DSC, lesion-image DSC, NSD and HD95 on the test
  split, with the time of each run (``benchmarks/results/downstream_segmentation.md``).

``--work DIR`` keeps the phantoms and the pretraining between runs (a rerun reuses them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import write_result

SEG_METRICS = ("dice", "dice_present", "nsd", "hd95", "hd95_infinite")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default="classify,segment",
                        help="comma-separated: classify (with detection), segment")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--detect-steps", type=int, default=60)
    parser.add_argument("--segment-epochs", type=int, default=10)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    tasks = set(args.tasks.split(","))
    unknown = tasks - {"classify", "segment"}
    if unknown:
        parser.error(f"unknown --tasks {sorted(unknown)}; valid: classify, segment")
    import torch

    torch.set_flush_denormal(True)
    work = Path(args.work or tempfile.mkdtemp(prefix="mwm-bench-down-"))
    data, pre, pre_s = prepare(work, args)
    encoder = str(work / "pre" / "encoder.safetensors")
    setup = (f"Phantoms: brain-MRI, n={args.n}, {args.size} px (train/val/test 70/15/15). "
             f"Pretraining: resnet18, region-aware 0.8/0.4 on the ground-truth lesion masks, "
             f"{args.pretrain_epochs} epochs, amp auto (bf16 where native), {pre_s:.0f} s "
             f"({pre.images_per_second:.1f} images/s), final loss {pre.final_loss}.")
    if "classify" in tasks:
        body = setup + "\n\n" + classification(work, data, encoder, args)
        write_result("downstream", "Downstream: scratch vs MWM-pretrained (CPU)", body)
    if "segment" in tasks:
        body = setup + "\n\n" + segmentation(work, data, encoder, args)
        write_result("downstream_segmentation",
                     "Segmentation: scratch vs MWM-pretrained encoder (CPU)", body)


def prepare(work: Path, args):
    """The phantoms and the pretrained encoder (reused from ``work`` when already there)."""
    from mwm.data.phantoms import generate_phantoms
    from mwm.pretrain.train import PretrainConfig, pretrain

    data = work / "phantoms"
    generate_phantoms(data, n=args.n, size=args.size, seed=0, progress=False)
    t0 = time.perf_counter()
    pre = pretrain(PretrainConfig(images=str(data), regions=str(data / "masks"), out=str(work / "pre"),
                                  model="resnet18", input_size=args.size, masking="region",
                                  epochs=args.pretrain_epochs, batch_size=32, lr=2e-3,
                                  warmup_epochs=1, amp="auto", workers=2, device="cpu",
                                  resume="auto", quiet=True))
    seconds = pre.seconds if pre.seconds else time.perf_counter() - t0
    return data, pre, seconds


def classification(work: Path, data: Path, encoder: str, args) -> str:
    from mwm.downstream.classify import FinetuneConfig, finetune
    from mwm.downstream.detect import DetectConfig, detect

    rows = ["| run | weights | accuracy | balanced acc. | macro-F1 | AUROC | seconds |",
            "|---|---|---|---|---|---|---|"]
    for mode, epochs in (("linear", 30), ("finetune", args.finetune_epochs)):
        for name, weights in (("scratch", None), ("MWM region 0.8/0.4", encoder)):
            t = time.perf_counter()
            out = work / f"{mode}-{'mwm' if weights else 'scratch'}"
            summary = finetune(FinetuneConfig(data=str(data), out=str(out), weights=weights,
                                              model="resnet18", mode=mode, input_size=args.size,
                                              epochs=epochs, batch_size=32, warmup_epochs=1,
                                              amp="none",  # fp32, as the recorded results
                                              workers=2, device="cpu", resume="auto", quiet=True))
            m = summary["best"]["metrics"]
            rows.append(f"| {mode} | {name} | {m['accuracy']:.3f} | {m['balanced_accuracy']:.3f} | "
                        f"{m['macro_f1']:.3f} | {m['auroc']:.3f} | {time.perf_counter() - t:.0f} |")
            print(rows[-1], flush=True)
    det_rows = ["| weights | bbox AP | bbox AP50 | segm AP | segm AP50 | steps |", "|---|---|---|---|---|---|"]
    for name, weights in (("scratch", None), ("MWM", encoder)):
        summary = detect(DetectConfig(data=str(data), out=str(work / f"det-{name}"), weights=weights,
                                      model="resnet18", input_size=args.size, epochs=100,
                                      max_steps=args.detect_steps, roi_batch_size=128, device="cpu",
                                      amp="none", resume="auto", quiet=True))
        m = summary["metrics"]
        det_rows.append(f"| {name} | {m['bbox/AP']:.3f} | {m['bbox/AP50']:.3f} | {m['segm/AP']:.3f} | "
                        f"{m['segm/AP50']:.3f} | {summary['step']} |")
        print(det_rows[-1], flush=True)
    (work / "downstream.json").write_text(json.dumps({"rows": rows, "det": det_rows}))
    return ("\n".join(rows) + f"\n\nMask R-CNN (torchvision, resnet18-FPN, {args.size} px, batch 2, "
            f"{args.detect_steps} steps, 128 RoIs/image):\n\n" + "\n".join(det_rows)
            + f"\n\nWork folder: {work}\n")


def segmentation(work: Path, data: Path, encoder: str, args) -> str:
    """Probe and fine-tune segmentation, scratch vs the pretrained encoder; test metrics."""
    from mwm.downstream.segment import SegmentConfig, segment

    rows = [("| mode | weights | DSC | DSC (lesion images) | NSD (2 px) | HD95 px (finite) | "
             "HD95 = inf | val DSC (best epoch) | seconds | command |"),
            "|---|---|---|---|---|---|---|---|---|---|"]
    for mode in ("probe", "finetune"):
        for name, weights in (("scratch", None), ("MWM region 0.8/0.4", encoder)):
            out = work / f"seg-{mode}-{'mwm' if weights else 'scratch'}"
            command = (f"mwm segment {data.name} --out {out.name} --mode {mode} --model resnet18 "
                       f"--input-size {args.size} --epochs {args.segment_epochs} --batch-size 16"
                       + (" --weights pre/encoder.safetensors" if weights else ""))
            t = time.perf_counter()
            summary = segment(SegmentConfig(data=str(data), out=str(out), weights=weights,
                                            model="resnet18", mode=mode, input_size=args.size,
                                            epochs=args.segment_epochs, batch_size=16,
                                            amp="none", device="cpu", resume="auto", quiet=True))
            test, best = summary["last"]["test"], summary["best"]
            cells = [_fmt(test.get(k)) for k in SEG_METRICS]
            rows.append(f"| {mode} | {name} | " + " | ".join(cells)
                        + f" | {_fmt(best['metrics']['dice'])} (epoch {best['epoch']}) | "
                        f"{time.perf_counter() - t:.0f} | `{command}` |")
            print(rows[-1], flush=True)
    return ("Segmentation (`mwm segment`, UNet decoder of width 64 on the resnet18 pyramid, "
            f"CE + Dice, AdamW, {args.segment_epochs} epochs, batch 16, fp32). Metrics of the last "
            "epoch on the **test** split (no selection on it): DSC over every test image "
            "(lesion-free images score 1 when nothing is predicted), DSC over the images with a "
            "lesion, NSD at 2 px, HD95 over the images where both masks are non-empty and the "
            "count of images where exactly one is empty. Commands run from the work folder.\n\n"
            + "\n".join(rows) + f"\n\nWork folder: {work}\n")


def _fmt(value) -> str:
    if value is None:
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


if __name__ == "__main__":
    main()
