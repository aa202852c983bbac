"""Downstream value of pretraining on brain-MRI phantoms (CPU budget).

Pretrains resnet18 with region-aware masking on the phantoms' lesion masks (the
ground-truth-region variant: an upper bound for text-localized regions) for a fixed
time, then compares linear probing and fine-tuning from that encoder against the same
runs from scratch, and runs a short Mask R-CNN from each. Prints and writes
benchmarks/results/downstream.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--detect-steps", type=int, default=60)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    import torch

    torch.set_flush_denormal(True)
    from mwm.data.phantoms import generate_phantoms
    from mwm.downstream.classify import FinetuneConfig, finetune
    from mwm.downstream.detect import DetectConfig, detect
    from mwm.pretrain.train import PretrainConfig, pretrain

    work = Path(args.work or tempfile.mkdtemp(prefix="mwm-bench-down-"))
    data = work / "phantoms"
    generate_phantoms(data, n=args.n, size=args.size, seed=0, progress=False)
    t0 = time.perf_counter()
    pre = pretrain(PretrainConfig(images=str(data), regions=str(data / "masks"), out=str(work / "pre"),
                                  model="resnet18", input_size=args.size, masking="region",
                                  epochs=args.pretrain_epochs, batch_size=32, lr=2e-3,
                                  warmup_epochs=1, amp="auto", workers=2, device="cpu", quiet=True))
    pre_s = time.perf_counter() - t0
    rows = ["| run | weights | accuracy | balanced acc. | macro-F1 | AUROC | seconds |",
            "|---|---|---|---|---|---|---|"]
    for mode, epochs in (("linear", 30), ("finetune", args.finetune_epochs)):
        for name, weights in (("scratch", None), ("MWM region 0.8/0.4", str(work / "pre" / "encoder.safetensors"))):
            t = time.perf_counter()
            out = work / f"{mode}-{'mwm' if weights else 'scratch'}"
            summary = finetune(FinetuneConfig(data=str(data), out=str(out), weights=weights,
                                              model="resnet18", mode=mode, input_size=args.size,
                                              epochs=epochs, batch_size=32, warmup_epochs=1,
                                              amp="none",  # fp32, as the recorded results
                                              workers=2, device="cpu", quiet=True))
            m = summary["best"]["metrics"]
            rows.append(f"| {mode} | {name} | {m['accuracy']:.3f} | {m['balanced_accuracy']:.3f} | "
                        f"{m['macro_f1']:.3f} | {m['auroc']:.3f} | {time.perf_counter() - t:.0f} |")
            print(rows[-1], flush=True)
    det_rows = ["| weights | bbox AP | bbox AP50 | segm AP | segm AP50 | steps |", "|---|---|---|---|---|---|"]
    for name, weights in (("scratch", None), ("MWM", str(work / "pre" / "encoder.safetensors"))):
        summary = detect(DetectConfig(data=str(data), out=str(work / f"det-{name}"), weights=weights,
                                      model="resnet18", input_size=args.size, epochs=100,
                                      max_steps=args.detect_steps, roi_batch_size=128, device="cpu",
                                      amp="none", quiet=True))
        m = summary["metrics"]
        det_rows.append(f"| {name} | {m['bbox/AP']:.3f} | {m['bbox/AP50']:.3f} | {m['segm/AP']:.3f} | "
                        f"{m['segm/AP50']:.3f} | {summary['step']} |")
        print(det_rows[-1], flush=True)
    body = (f"Phantoms: brain-MRI, n={args.n}, {args.size} px (train/val/test 70/15/15). "
            f"Pretraining: resnet18, region-aware 0.8/0.4 on the ground-truth lesion masks, "
            f"{args.pretrain_epochs} epochs, amp auto (bf16 where native), {pre_s:.0f} s ({pre.images_per_second:.1f} images/s), "
            f"final loss {pre.final_loss}.\n\n" + "\n".join(rows)
            + f"\n\nMask R-CNN (torchvision, resnet18-FPN, {args.size} px, batch 2, "
            f"{args.detect_steps} steps, 128 RoIs/image):\n\n" + "\n".join(det_rows)
            + f"\n\nWork folder: {work}\n")
    print(body)
    write_result("downstream", "Downstream: scratch vs MWM-pretrained (CPU)", body)
    (work / "downstream.json").write_text(json.dumps({"rows": rows, "det": det_rows}))


if __name__ == "__main__":
    main()
