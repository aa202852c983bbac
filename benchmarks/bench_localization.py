"""Offline localization benchmark: phantom CLIP from scratch → M2IB → postprocess → DSC.

Proves that MWM's text-guided localization works without any download:

1. write brain-MRI phantoms (``mwm.data.phantoms``);
2. train a small CLIP from scratch on their **train** captions (``mwm.clip.train_clip``)
   within a wall-clock budget (default 10 minutes);
3. compute M2IB saliency maps of held-out **test** images for the prompt
   (``mwm.localize.m2ib``) through the open_clip folder the training wrote
   (``load_vlm("local-dir:DIR")``);
4. binarize (``mwm.localize.postprocess``) and score against the phantom lesion masks
   (``mwm.metrics``): DSC and NSD (2 px) on test images **with** a lesion, per class;
   predicted area on lesion-free images; and how much the map changes when the prompt
   names something absent from the image.

Writes ``benchmarks/results/localization.md`` (+ ``localization.json`` and a figure).

    python benchmarks/bench_localization.py                 # the reported run (seed 0)
    python benchmarks/bench_localization.py --clip-seed 1   # another CLIP seed
    python benchmarks/bench_localization.py --tune          # choose M2IB + postprocessing on val
    python benchmarks/bench_localization.py --quick         # smoke run, ~1 minute
    python benchmarks/bench_localization.py --findings multi --shifts 1 \\
        --captions findings --swap-negatives --phrase-weight 1   # prompt selectivity
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from mwm.localize.m2ib import parse_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/mwm-bench-localization",
                   help="scratch folder for the phantoms and the model")
    p.add_argument("--n", type=int, default=2000, help="phantom images (70%% train)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="phantom data and M2IB noise seed")
    p.add_argument("--clip-seed", type=int, default=None,
                   help="CLIP initialization and batch-order seed (default: --seed)")
    p.add_argument("--budget", type=float, default=600.0,
                   help="training wall-clock budget in seconds (default 600 = 10 min)")
    # CLIP
    p.add_argument("--model", default="scratch-tiny")
    p.add_argument("--input-size", type=int, default=None,
                   help="scratch input side (default: the preset's)")
    p.add_argument("--arch", default="",
                   help="JSON overrides of the scratch preset (default: none)")
    p.add_argument("--loss", default="infonce", choices=("infonce", "dhn-nce"))
    p.add_argument("--negatives", default="normal", choices=("caption", "normal", "label"))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: train_clip's)")
    p.add_argument("--prompt-mix", type=float, default=0.2)
    p.add_argument("--token-max-weight", type=float, default=None,
                   help="token-max loss weight (default: train_clip's, 1 for scratch models)")
    p.add_argument("--threads", default="1",
                   help="torch CPU threads: a number, or auto = 1 when the machine is busy "
                        "(1-minute load average > 1), else all cores")
    p.add_argument("--reuse-model", action="store_true",
                   help="reuse a finished model in --work instead of training again")
    # M2IB + postprocess
    p.add_argument("--prompt", default="brain tumor")
    p.add_argument("--absent-prompt", default="fractured femur")
    # defaults: the settings chosen on validation images (localization.md)
    p.add_argument("--layer", type=parse_layers, default=(1, 2),
                   help="M2IB layer, or layers such as 1,2 (maps averaged; default 1,2)")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--noise-scale", type=float, default=0.5)
    p.add_argument("--tune", action="store_true",
                   help="instead, search layer x beta x noise scale on validation images "
                        "(mwm.localize.tune.default_grid), with --beta/--noise-scale as the base")
    p.add_argument("--tune-images", type=int, default=30,
                   help="validation lesion images for the M2IB grid search")
    p.add_argument("--tune-post", action=argparse.BooleanOptionalAction, default=True,
                   help="also choose the binarization (otsu / kmeans / threshold 0.5) and the "
                        "component ranking (area / mass) on the validation images")
    p.add_argument("--shifts", type=int, default=3,
                   help="M2IB sub-patch shift averaging, N x N shifts (1 = off)")
    p.add_argument("--smooth", type=float, default=0.4,
                   help="M2IB map blur, std in patches (0 = off)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--method", default="kmeans", choices=("otsu", "kmeans", "threshold"))
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--rank", default="mass", choices=("area", "mass"),
                   help="top-k components by area or by saliency mass")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True,
                   help="refine with the dense CRF anchored at the cut (the first CRF "
                        "candidate of the validation search; default on)")
    p.add_argument("--max-test", type=int, default=60,
                   help="use at most this many test images per group (0 = all)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    # finding prompts (see FINDINGS_DOC)
    p.add_argument("--findings", default="none", choices=("none", "multi", "classes"),
                   help="instead, score each finding prompt's DSC, selectivity and presence on "
                        "multi-finding phantoms (multi) or per tumour class (classes)")
    p.add_argument("--clip-seeds", type=lambda t: [int(v) for v in t.split(",")],
                   default=[0, 1, 2], help="--findings: CLIP seeds (mean ± std over them)")
    p.add_argument("--per-prompt", type=int, default=40,
                   help="--findings: test (and validation) images per prompt and group")
    p.add_argument("--objectives", type=lambda t: t.split(","),
                   default=["published", "contrastive"], help="--findings: M2IB objectives")
    p.add_argument("--temperature", type=float, default=0.1,
                   help="--findings: contrastive M2IB and presence softmax temperature")
    p.add_argument("--captions", default="general", choices=("general", "findings", "both"))
    p.add_argument("--swap-negatives", action="store_true")
    p.add_argument("--phrase-weight", type=float, default=0.0)
    p.add_argument("--phrase-embedding", default="both", choices=("pooled", "token-max", "both", "tokens", "pooled+tokens"))
    p.add_argument("--eval-split", default="test", choices=("test", "val"),
                   help="--findings: the split scored; val chooses settings (beta, objective, "
                        "temperature) without looking at test images")
    p.add_argument("--train-only", action="store_true",
                   help="--findings: train the CLIP seeds and stop (a later run with "
                        "--reuse-model scores them)")
    p.add_argument("--tag", default="",
                   help="--findings: results file suffix (localization-findings-TAG.md)")
    args = p.parse_args(argv)
    args.findings_name = "localization-findings" + (f"-{args.tag}" if args.tag else "")
    if args.quick:
        args.n, args.budget, args.epochs, args.max_test = 200, 60.0, 3, 8
        args.tune_images = 8
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.findings != "none":
        return main_findings(args, argv)
    import torch

    from mwm.clip import ClipTrainConfig, train_clip
    from mwm.data.phantoms import generate_phantoms
    from mwm.runtime import configure_process

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"phantoms-brain-mri-{args.n}-{args.size}-s{args.seed}"
    model_dir = work / "clip"
    t0 = time.perf_counter()
    if not (data / "dataset.json").is_file():
        generate_phantoms(data, modality="brain-mri", n=args.n, size=args.size, seed=args.seed,
                          workers=os.cpu_count() or 1, progress=False)
    gen_seconds = time.perf_counter() - t0
    print(f"phantoms: {data} ({gen_seconds:.1f} s)", flush=True)

    load_before = os.getloadavg()[0]
    if args.threads == "auto":
        args.threads = 1 if load_before > 1.0 else (os.cpu_count() or 1)
    configure_process(threads=int(args.threads))
    arch = json.loads(args.arch) if args.arch else None
    from mwm.clip.model import PRESET_LR

    args.lr_default = PRESET_LR.get(args.model, 5e-4)
    if args.reuse_model and (model_dir / "open_clip_model.safetensors").is_file():
        summary = None
        train_info = json.loads((model_dir / "bench_train.json").read_text())
    else:
        summary = train_clip(ClipTrainConfig(
            pairs=str(data), out=str(model_dir), model=args.model, loss=args.loss,
            negatives=args.negatives, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            input_size=args.input_size, arch=arch,
            seed=args.seed if args.clip_seed is None else args.clip_seed,
            prompt_mix=args.prompt_mix, token_max_weight=args.token_max_weight,
            quiet=True, resume=False, time_limit=args.budget))
        train_info = {k: v for k, v in summary.as_dict().items() if k != "log"}
        train_info["log"] = summary.log
        train_info["load_average_1min_before"] = load_before
        train_info["load_average_1min_after"] = os.getloadavg()[0]
        (model_dir / "bench_train.json").write_text(json.dumps(train_info, indent=1, default=str))
    saved = json.loads((model_dir / "open_clip_config.json").read_text()).get("mwm", {})
    train_info["token_max_weight"] = saved.get("token_max_weight", 0.0)
    print(f"training: {train_info['seconds']:.0f} s, {len(train_info['log'])} epochs, "
          f"final loss {train_info['final_loss']:.3f}, stopped early: "
          f"{train_info.get('stopped_early')}", flush=True)

    results = evaluate(args, data, model_dir)
    results["training"] = train_info
    results["phantom_seconds"] = gen_seconds
    results["settings"] = {k: v for k, v in vars(args).items()}
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__, "platform": platform.platform()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "localization.json").write_text(json.dumps(results, indent=1, default=str))
    write_report(out / "localization.md", report(results, argv))
    print((out / "localization.md").read_text())
    return 0


# --------------------------------------------------------------------------- evaluation

def evaluate(args, data: Path, model_dir: Path) -> dict:
    import csv

    from mwm.data.io import load_model_input, read_mask
    from mwm.localize.m2ib import M2IBConfig, saliency_maps
    from mwm.localize.crf import model_input_to_rgb8
    from mwm.localize.postprocess import PostprocessConfig
    from mwm.localize.vlm import load_vlm
    from mwm.metrics import region_metrics

    rows = [r for r in csv.DictReader(open(data / "labels.csv", newline=""))
            if r["split"] == "test"]
    lesion = [r for r in rows if r["label"] != "none"]
    normal = [r for r in rows if r["label"] == "none"]
    if args.max_test:
        lesion, normal = lesion[:args.max_test], normal[:max(1, args.max_test // 3)]
    adapter = load_vlm("local-dir:" + str(model_dir))
    post = PostprocessConfig(method=args.method, threshold=args.threshold, top_k=args.top_k,
                             rank=args.rank, crf=CRF_CANDIDATES[1] if args.crf else None)
    zero_shot = zero_shot_metrics(args, data, adapter, rows)
    print("zero-shot on the test split: " + ", ".join(f"{k} {v:.3f}" for k, v in zero_shot.items()
                                                       if isinstance(v, float)), flush=True)
    config = M2IBConfig(layer=args.layer, beta=args.beta,
                        noise_scale=args.noise_scale, steps=args.steps, samples=args.samples,
                        seed=args.seed, shifts=args.shifts, smooth=args.smooth)
    tuned = None
    if args.tune:
        config, post, tuned = tune_m2ib(args, data, adapter, config, post)

    def maps_for(group, prompt):
        images = [load_model_input(data / r["image"]) for r in group]
        keys = [Path(r["image"]).stem for r in group]
        t = time.perf_counter()
        maps = saliency_maps(adapter, images, prompt, config, keys=keys)
        return maps, len(group) / (time.perf_counter() - t)

    def regions(group, maps):
        return [post.apply(m, model_input_to_rgb8(load_model_input(data / r["image"])))
                for r, m in zip(group, maps)]

    maps, rate = maps_for(lesion, args.prompt)
    gts = [read_mask(data / r["mask"]) for r in lesion]
    preds = regions(lesion, maps)
    per_image = []
    for r, m, p, g in zip(lesion, maps, preds, gts):
        met = region_metrics(p, g)
        per_image.append({"image": Path(r["image"]).stem, "label": r["label"],
                          "dice": met["dice"], "nsd": met["nsd"],
                          "lesion_fraction": float(g.mean()), "pred_fraction": float(p.mean()),
                          "saliency_in_over_out": float(m[g].mean() / max(m[~g].mean(), 1e-6))})
    absent_maps, rate_absent = maps_for(lesion, args.absent_prompt)
    absent_dice = [region_metrics(p, g)["dice"] for p, g in zip(regions(lesion, absent_maps), gts)]
    mad = [float(np.abs(a - b).mean()) for a, b in zip(maps, absent_maps)]
    normal_maps, _ = maps_for(normal, args.prompt) if normal else ([], 0.0)
    normal_area = [float(p.mean()) for p in regions(normal, normal_maps)]

    def stats(values):
        v = np.asarray(values, dtype=float)
        return {"mean": float(v.mean()) if v.size else None,
                "std": float(v.std()) if v.size else None, "n": int(v.size)}

    classes = sorted({r["label"] for r in lesion})
    out = {
        "dice": stats([p["dice"] for p in per_image]),
        "nsd": stats([p["nsd"] for p in per_image]),
        "per_class": {c: {"dice": stats([p["dice"] for p in per_image if p["label"] == c]),
                          "nsd": stats([p["nsd"] for p in per_image if p["label"] == c])}
                      for c in classes},
        "saliency_images_per_second": rate,
        "saliency_images_per_second_absent": rate_absent,
        "absent_prompt": {"prompt": args.absent_prompt, "dice": stats(absent_dice),
                          "mean_abs_map_difference": stats(mad)},
        "none_images": {"n": len(normal), "pred_area_fraction": stats(normal_area),
                        "empty_predictions": int(sum(a == 0 for a in normal_area))},
        "per_image": per_image,
        "m2ib": config.to_dict(), "postprocess": post.to_dict(), "zero_shot": zero_shot,
        "tuning": tuned,
        "grid": list(adapter.grid), "input_size": adapter.image_size,
    }
    shown = lesion[:6] + normal[:2]
    out["figure"] = figure(args, data, shown, maps[:6] + normal_maps[:2], absent_maps[:6],
                           preds[:6] + regions(normal[:2], normal_maps[:2]))
    return out


#: Binarizations also tried on the validation images (with ``--tune-post``): each cut
#: (Otsu, k-means, a 0.5 threshold) alone or followed by a dense CRF anchored at it, with
#: components ranked by area or by saliency mass.
CRF_CANDIDATES = (None,
                  dict(anchor="binarization", bilateral_sxy=5, bilateral_srgb=20,
                       bilateral_compat=10, gaussian_compat=1),
                  dict(anchor="binarization", bilateral_sxy=10, bilateral_srgb=10,
                       bilateral_compat=3, gaussian_compat=1))
POST_CANDIDATES = tuple(dict(method=m, threshold=th, rank=rank, crf=crf)
                        for rank in ("area", "mass") for crf in CRF_CANDIDATES
                        for m, th in (("otsu", 0.3), ("kmeans", 0.3), ("threshold", 0.5)))

CLASS_PROMPTS = {"none": "normal brain MRI without lesion", "glioma": "glioma",
                 "meningioma": "meningioma", "pituitary": "pituitary adenoma"}


def zero_shot_metrics(args, data: Path, adapter, rows: list[dict]) -> dict:
    """Did the CLIP learn? Zero-shot scores of the test split (all images, lesion-free too).

    * ``auc_prompt``: ROC AUC of cos(image, prompt) for "has a lesion" vs "lesion-free";
    * ``auc_absent``: the same with the absent prompt (about 0.5 or below when the
      model ties the prompt, not any text, to lesions);
    * ``class_accuracy``: 4-way zero-shot classification with :data:`CLASS_PROMPTS`
      (chance 0.25);
    * ``retrieval_top1``: image → caption retrieval among the test images' own captions
      in batches of 32 (chance 1/32; identical wording is ambiguous, so this is a lower
      bound).
    """
    import csv

    import torch

    from mwm.data.io import load_model_input

    captions = {r["image"]: r["caption"]
                for r in csv.DictReader(open(data / "captions.csv", newline=""))}
    with torch.no_grad():
        feats = []
        for i in range(0, len(rows), 64):
            px = torch.stack([adapter.prepare(load_model_input(data / r["image"]))[0]
                              for r in rows[i:i + 64]])
            feats.append(adapter.encode_image(px).float())
        f = torch.cat(feats)
        labels = [r["label"] for r in rows]
        names = [c for c in CLASS_PROMPTS if c in set(labels)]
        t = adapter.encode_text([CLASS_PROMPTS[c] for c in names]).float()
        pred = (f @ t.T).argmax(1).tolist()
        acc = float(np.mean([names[k] == lab for k, lab in zip(pred, labels)]))
        sim = (f @ adapter.encode_text([args.prompt, args.absent_prompt]).float().T).numpy()
        hits = []
        for i in range(0, len(rows) - 31, 32):
            ct = adapter.encode_text([captions[r["image"]] for r in rows[i:i + 32]]).float()
            hits += ((f[i:i + 32] @ ct.T).argmax(1) == torch.arange(32)).tolist()
    y = np.array([lab != "none" for lab in labels])

    def auc(score):
        pos, neg = score[y], score[~y]
        if not len(pos) or not len(neg):
            return float("nan")
        return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum())
                     / (len(pos) * len(neg)))

    return {"auc_prompt": auc(sim[:, 0]), "auc_absent": auc(sim[:, 1]),
            "class_accuracy": acc, "retrieval_top1": float(np.mean(hits)) if hits else float("nan"),
            "n": len(rows)}


def tune_m2ib(args, data: Path, adapter, config, post):
    """Grid-search M2IB on validation lesion images (``mwm.localize.tune``), not on test."""
    from mwm.data.layouts import open_dataset
    from mwm.localize.m2ib import saliency_maps
    from mwm.localize.tune import default_grid, pick_validation, tune

    val = [s for s in open_dataset(data).samples if s.split == "val" and s.label != "none"]
    val = pick_validation(val, args.tune_images, args.seed)
    val = [replace(s, prompt=args.prompt) for s in val]
    t = time.perf_counter()
    posts = [c for c in (replace(post, **p) for p in POST_CANDIDATES) if c != post
             ] if args.tune_post else []
    best, rows = tune(val, lambda im, pr, names, cfg: saliency_maps(adapter, im, pr, cfg, keys=names),
                      config, post, Path(args.work) / "tune",
                      depth=adapter.depth, progress=False, posts=posts or None)
    best_row = max(rows, key=lambda r: r["dice_mean"])
    post = ([post] + posts)[best_row.get("postprocess", 0)]
    grid = default_grid(adapter.depth)
    print(f"M2IB tuned on {len(val)} validation images in {time.perf_counter() - t:.0f} s: "
          f"layer {best.layer}, beta {best.beta}, noise_scale {best.noise_scale}, "
          f"postprocess {post.to_dict()} (val DSC {best_row['dice_mean']:.3f})", flush=True)
    return best, post, {"grid": {k: list(v) for k, v in grid.items()}, "rows": rows,
                        "n_images": len(val), "val_dice": best_row["dice_mean"],
                        "postprocess_candidates": [c.to_dict() for c in posts] if posts else None}


def figure(args, data: Path, rows, maps, absent_maps, preds) -> str | None:
    """Rows: image with GT (red) and prediction (green) contours; map; absent-prompt map."""
    import cv2

    from mwm.data.io import load_model_input, read_mask

    if not rows:
        return None
    tiles = []
    for i, (r, m) in enumerate(zip(rows, maps)):
        img = (load_model_input(data / r["image"])[0] * 255).astype(np.uint8)
        rgb = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        gt = read_mask(data / r["mask"]).astype(np.uint8)
        pred = preds[i].astype(np.uint8)
        for mask, colour in ((gt, (0, 0, 255)), (pred, (0, 255, 0))):
            cnts, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(rgb, cnts, -1, colour, 1)
        heat = cv2.applyColorMap((m * 255).astype(np.uint8), cv2.COLORMAP_JET)
        column = [rgb, cv2.addWeighted(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR), 0.5, heat, 0.5, 0)]
        if i < len(absent_maps):
            a = cv2.applyColorMap((absent_maps[i] * 255).astype(np.uint8), cv2.COLORMAP_JET)
            column.append(cv2.addWeighted(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR), 0.5, a, 0.5, 0))
        else:
            column.append(np.zeros_like(rgb))
        tiles.append(np.vstack(column))
    sheet = np.hstack(tiles)
    path = Path(args.out) / "localization.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), sheet)
    return path.name


# --------------------------------------------------------------------------- report

def _ms(s: dict, digits: int = 3) -> str:
    if s.get("mean") is None:
        return "—"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} (n={s['n']})"


#: Text below this line in an existing report was written by hand; a rerun keeps it.
HAND_NOTES = "<!-- Notes below were written by hand; rerunning the benchmark keeps them. -->"


def write_report(path: Path, text: str) -> None:
    """Write the generated report, keeping any hand-written notes of the previous one."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if HAND_NOTES in old:
        text = text.rstrip("\n") + "\n\n" + old[old.index(HAND_NOTES):]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def report(r: dict, argv) -> str:
    s, t = r["settings"], r["training"]
    cmd = "python benchmarks/bench_localization.py " + " ".join(argv or sys.argv[1:])
    target = "**reached**" if (r["dice"]["mean"] or 0) >= 0.6 else "**missed**"
    clip_seed = s["seed"] if s.get("clip_seed") is None else s["clip_seed"]
    lines = [
        "# Offline localization benchmark (phantom CLIP → M2IB → DSC)",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Target: mean DSC ≥ 0.6 on held-out brain-MRI phantom test images with a lesion — "
        f"{target} (mean DSC {r['dice']['mean']:.3f}) with CLIP seed {clip_seed}. This is one "
        "CLIP training seed; other seeds give other results (see the notes at the end).",
        "",
        "## Results",
        "",
        "| | value |",
        "|---|---|",
        f"| DSC, test images with a lesion | {_ms(r['dice'])} |",
        f"| NSD (2 px), same images | {_ms(r['nsd'])} |",
    ]
    for c, v in r["per_class"].items():
        lines.append(f"| DSC / NSD, {c} | {_ms(v['dice'])} / {_ms(v['nsd'])} |")
    a = r["absent_prompt"]
    n = r["none_images"]
    z = r["zero_shot"]
    lines += [
        f"| DSC with the absent prompt \"{a['prompt']}\" (same images) | {_ms(a['dice'])} |",
        f"| DSC drop, \"{s['prompt']}\" → \"{a['prompt']}\" | "
        f"{(r['dice']['mean'] or 0) - (a['dice']['mean'] or 0):.3f} |",
        f"| mean \\|map(\"{s['prompt']}\") − map(\"{a['prompt']}\")\\| (maps in [0, 1]) | "
        f"{_ms(a['mean_abs_map_difference'])} |",
        f"| lesion-free test images: predicted area (fraction of image) | "
        f"{_ms(n['pred_area_fraction'])}; empty predictions {n['empty_predictions']}/{n['n']} |",
        f"| saliency speed (M2IB, {r['m2ib']['steps']} steps × {r['m2ib']['samples']} samples) | "
        f"{r['saliency_images_per_second']:.2f} images/s |",
        f"| CLIP training time | {t['seconds']:.0f} s ({len(t['log'])} epochs of "
        f"{t['n_pairs']} pairs, {t['images_per_second']:.0f} images/s; budget "
        f"{s['budget']:.0f} s; stopped early: {t.get('stopped_early')}) |",
        f"| final training loss ({t['loss']}) | {t['final_loss']:.3f} |",
        f"| zero-shot, test split (n={z['n']}): AUC lesion vs lesion-free with \"{s['prompt']}\" / "
        f"with \"{a['prompt']}\" | {z['auc_prompt']:.3f} / {z['auc_absent']:.3f} |",
        f"| zero-shot 4-class accuracy (chance 0.25) / image→caption top-1 in batches of 32 "
        f"(chance 0.03) | {z['class_accuracy']:.3f} / {z['retrieval_top1']:.3f} |",
        "",
        "## Settings",
        "",
        f"* Data: `generate_phantoms(modality=\"brain-mri\", n={s['n']}, size={s['size']}, "
        f"seed={s['seed']})`; CLIP trained on the train split only, scored on the test split.",
        f"* CLIP: `{s['model']}` with input {t['input_size']} px, arch overrides "
        f"{s['arch'] or 'none (the preset)'}, negatives {s['negatives']}, "
        f"loss {s['loss']}, {s['epochs']} epochs planned, batch {s['batch_size']}, peak lr "
        f"{s['lr'] if s['lr'] is not None else s.get('lr_default')}, prompt_mix {s['prompt_mix']}, "
        f"token-max weight {t.get('token_max_weight', 0.0)}; {t['parameters'] / 1e6:.1f} M parameters, "
        f"amp {t['amp']}, {s['threads']} torch thread(s). Patch grid "
        f"{r['grid'][0]}×{r['grid'][1]}.",
        f"* M2IB: {r['m2ib']}"
        + (f"; layer, beta and noise_scale tuned on {r['tuning']['n_images']} validation lesion "
           f"images (`mwm.localize.tune`, grid {r['tuning']['grid']}, scored by DSC after "
           "postprocessing"
           + (", binarization (otsu / kmeans / threshold 0.5, each alone or followed by a "
              "dense CRF anchored at its cut) and component ranking (area / saliency mass) "
              "chosen at the same time"
              if r["tuning"].get("postprocess_candidates") else "")
           + f"; best validation DSC {r['tuning']['val_dice']:.3f})." if r.get("tuning")
           else " (fixed)."),
        f"* Prompt \"{s['prompt']}\"; postprocess {r['postprocess']} (`mwm.localize.postprocess`).",
        "* Metrics: `mwm.metrics.region_metrics` (DSC; NSD at 2 px).",
        f"* Machine: {r['machine']['cpus']} CPU cores, torch {r['machine']['torch']}; "
        f"1-minute load average {t.get('load_average_1min_before', float('nan')):.1f} before and "
        f"{t.get('load_average_1min_after', float('nan')):.1f} after training (the machine is "
        "shared; a load above 2 means other jobs competed for the 2 cores).",
        "",
        "## Training log",
        "",
        "| epoch | loss | lr | seconds |",
        "|---|---|---|---|",
    ]
    lines += [f"| {e['epoch']} | {e['loss']:.3f} | {e['lr']:.2e} | {e['seconds']:.1f} |"
              for e in t["log"]]
    if r.get("figure"):
        lines += ["", "## Figure", "",
                  f"![maps]({r['figure']})", "",
                  "Columns: six lesion test images, then two lesion-free ones. Rows: image with "
                  "the lesion mask (red) and the prediction (green); M2IB map for "
                  f"\"{s['prompt']}\"; M2IB map for \"{a['prompt']}\" (lesion images only)."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- findings

FINDINGS_DOC = """--findings multi|classes: does the prompt choose where the saliency goes?

On held-out phantoms with several findings (``multi``: ``generate_phantoms(...,
findings="multi")``; ``classes``: the one-lesion phantoms, each tumour class a finding),
for each finding prompt (its phrase in ``findings.csv``) and each M2IB objective:

* DSC of the prompt's region against its own finding's mask (test images with it);
* selectivity: that DSC minus the DSC of the same region against the other findings'
  masks (same images, those that have another finding; ``classes``: the prompt's region
  on images of another class against that lesion, as no image has two classes);
* saliency mass on the own mask and on the other findings' masks;
* presence AUROC (:func:`mwm.localize.m2ib.presence_scores`, or the same log-softmax
  computed here when that function is not there) and, with the threshold calibrated on
  validation images by Youden's J, the fraction of test images without the finding that
  get an empty region, and the DSC when abstained positives count as empty regions.

Over several CLIP seeds (``--clip-seeds``), mean ± std over seeds.
"""

FINDING_TARGETS = {"dice": 0.6, "selectivity": 0.4, "auroc": 0.9, "empty_fraction": 0.8}


def findings_data(args) -> Path:
    """The phantom folder with findings.csv / finding_captions.csv (written here for
    ``classes``)."""
    import csv
    import inspect

    from mwm.data.phantoms import generate_phantoms
    from mwm.files import write_csv

    work = Path(args.work)
    data = work / f"phantoms-{args.findings}-{args.n}-{args.size}-s{args.seed}"
    if (data / "dataset.json").is_file() and (data / "findings.csv").is_file():
        return data
    extra = {}
    if args.findings == "multi":
        if "findings" not in inspect.signature(generate_phantoms).parameters:
            raise SystemExit("--findings multi needs generate_phantoms(..., findings='multi') "
                             "(mwm.data.phantoms); use --findings classes meanwhile.")
        extra["findings"] = "multi"
    generate_phantoms(data, modality="brain-mri", n=args.n, size=args.size, seed=args.seed,
                      workers=os.cpu_count() or 1, progress=False, **extra)
    if args.findings == "classes":
        labels = list(csv.DictReader(open(data / "labels.csv", newline="")))
        captions = {r["image"]: r["caption"]
                    for r in csv.DictReader(open(data / "captions.csv", newline=""))}
        classes = [c for c in CLASS_PROMPTS if c != "none"]
        rows, per = [], []
        for r in labels:
            for c in classes:
                here = r["label"] == c
                rows.append({"image": r["image"], "finding": c, "kind": "finding",
                             "present": int(here), "mask": r["mask"] if here else "",
                             "phrase": CLASS_PROMPTS[c]})
                if here:
                    per.append({"image": r["image"], "finding": c, "caption": captions[r["image"]]})
        write_csv(data / "findings.csv", rows, ("image", "finding", "kind", "present", "mask",
                                                "phrase"))
        write_csv(data / "finding_captions.csv", per, ("image", "finding", "caption"))
    return data


def finding_rows(data: Path) -> tuple[list[str], dict[str, str], dict[str, dict], dict]:
    """(findings of kind finding, their phrases, image → {finding: mask path or None},
    image → split)."""
    import csv

    from mwm.clip.data import read_findings

    table = read_findings(data)
    names = [n for n, k in zip(table.names, table.kinds) if k != "anatomy"]
    phrases = {n: table.phrase(n) for n in names}
    have: dict[str, dict] = {}
    for r in csv.DictReader(open(data / "findings.csv", newline="")):
        if r["finding"] in phrases and r["present"].strip() in ("1", "true", "yes"):
            mask = (r.get("mask") or "").strip()
            have.setdefault(r["image"], {})[r["finding"]] = mask or None
    split = {r["image"]: r["split"] for r in csv.DictReader(open(data / "labels.csv", newline=""))}
    return names, phrases, have, split


def _contrast(names, phrases, own) -> list[str]:
    try:
        from mwm.localize.presence import NORMAL_PROMPTS
        normal = NORMAL_PROMPTS["brain-mri"]
    except ImportError:
        normal = "normal brain MRI"
    return [normal] + [phrases[n] for n in names if n != own]


def _presence(adapter, images, prompt, contrast, temperature):
    """Presence scores: the library's when it has them, else the same log-softmax here."""
    import torch

    from mwm.localize import m2ib

    if hasattr(m2ib, "presence_scores"):
        return np.asarray(m2ib.presence_scores(adapter, images, [prompt] * len(images),
                                               contrast, temperature=temperature), dtype=float)
    with torch.no_grad():
        text = adapter.embed_prompts([prompt] + list(contrast)).float()        # (1 + C, D)
        out = []
        for i in range(0, len(images), 32):
            px = torch.stack([adapter.prepare(im)[0] for im in images[i:i + 32]])
            emb = torch.nn.functional.normalize(adapter.encode_image(
                px.to(adapter.device, adapter.dtype)).float(), dim=-1)
            out.append(torch.log_softmax(emb @ text.T / temperature, dim=1)[:, 0])
    return torch.cat(out).numpy().astype(float)


def _youden(scores, present) -> tuple[float, str]:
    try:
        from mwm.localize.presence import youden_threshold
        return float(youden_threshold(scores, present)), "mwm.localize.presence.youden_threshold"
    except ImportError:
        s, y = np.asarray(scores), np.asarray(present, bool)
        best = max(np.unique(s), key=lambda t: ((s[y] >= t).mean() + (s[~y] < t).mean(), -t))
        return float(best), "computed in the benchmark"


def _auroc(pos, neg) -> float:
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if not len(pos) or not len(neg):
        return float("nan")
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum())
                 / (len(pos) * len(neg)))


def evaluate_findings(args, data: Path, model_dir: Path, figure_seed: bool) -> dict:
    """Per finding prompt and objective: DSC, selectivity, masses, presence (one CLIP)."""
    import inspect

    from mwm.data.io import load_model_input, read_mask
    from mwm.localize.crf import model_input_to_rgb8
    from mwm.localize.m2ib import M2IBConfig, saliency_maps
    from mwm.localize.postprocess import PostprocessConfig
    from mwm.localize.vlm import load_vlm
    from mwm.metrics import dice

    names, phrases, have, split = finding_rows(data)
    adapter = load_vlm("local-dir:" + str(model_dir))
    post = PostprocessConfig(method=args.method, threshold=args.threshold, top_k=args.top_k,
                             rank=args.rank, crf=CRF_CANDIDATES[1] if args.crf else None)
    can_contrast = "contrast" in inspect.signature(saliency_maps).parameters
    objectives = [o for o in args.objectives if o == "published" or can_contrast]
    cache: dict[str, np.ndarray] = {}

    def image(name):
        if name not in cache:
            cache[name] = load_model_input(data / name)
        return cache[name]

    def mask(name, finding):
        path = have.get(name, {}).get(finding)
        if path is None:
            shape = image(name).shape[1:]
            return np.zeros(shape, dtype=bool)
        return read_mask(data / path)

    def others_mask(name, finding):
        out = None
        for g in have.get(name, {}):
            if g != finding:
                m = mask(name, g)
                out = m if out is None else (out | m)
        return out

    def maps_for(names_, prompt, objective, contrast):
        cfg = M2IBConfig(layer=args.layer, beta=args.beta, noise_scale=args.noise_scale,
                         steps=args.steps, samples=args.samples, seed=args.seed,
                         shifts=args.shifts, smooth=args.smooth,
                         **({"objective": objective, "temperature": args.temperature}
                            if objective != "published" else {}))
        extra = {"contrast": contrast} if objective != "published" else {}
        return saliency_maps(adapter, [image(n) for n in names_], prompt, cfg,
                             keys=[Path(n).stem for n in names_], **extra)

    test = sorted(n for n, s in split.items() if s == args.eval_split)
    val = sorted(n for n, s in split.items() if s == "val")
    k = args.per_prompt
    out = {"findings": {}, "objectives": objectives, "threshold_source": None}
    t_maps = 0.0
    n_maps = 0
    for f in names:
        prompt, contrast = phrases[f], _contrast(names, phrases, f)
        pos = [n for n in test if f in have.get(n, {})][:k]
        neg = [n for n in test if f not in have.get(n, {})][:k]
        vpos = [n for n in val if f in have.get(n, {})][:k]
        vneg = [n for n in val if f not in have.get(n, {})][:k]
        score = lambda group: _presence(adapter, [image(n) for n in group], prompt,  # noqa: E731
                                        contrast, args.temperature)
        s_pos, s_neg, v_pos, v_neg = score(pos), score(neg), score(vpos), score(vneg)
        thr, source = _youden(np.r_[v_pos, v_neg], np.r_[[True] * len(v_pos), [False] * len(v_neg)])
        out["threshold_source"] = source
        res = {"prompt": prompt, "contrast": contrast, "n_pos": len(pos), "n_neg": len(neg),
               "auroc": _auroc(s_pos, s_neg), "threshold": thr,
               "empty_fraction": float(np.mean(s_neg < thr)) if len(neg) else None,
               "kept_fraction": float(np.mean(s_pos >= thr)) if len(pos) else None,
               "objectives": {}}
        # selectivity images: with another finding (multi: among pos; classes: among neg)
        mixed = [n for n in pos if others_mask(n, f) is not None]
        leak = [n for n in neg if have.get(n)][:k] if not mixed else []
        for objective in objectives:
            t = time.perf_counter()
            maps = maps_for(pos + leak, prompt, objective, contrast)
            t_maps += time.perf_counter() - t
            n_maps += len(pos + leak)
            regions = [post.apply(m, model_input_to_rgb8(image(n))) for n, m in zip(pos + leak, maps)]
            own = [dice(r, mask(n, f)) for n, r in zip(pos, regions)]
            kept = s_pos >= thr
            sel, mass_own, mass_other = [], [], []
            for n, r, m in zip(pos, regions, maps):
                other = others_mask(n, f)
                total = max(float(m.sum()), 1e-9)
                mass_own.append(float(m[mask(n, f)].sum()) / total)
                if other is not None:
                    sel.append(dice(r, mask(n, f)) - dice(r, other))
                    mass_other.append(float(m[other].sum()) / total)
            leak_dice = [dice(r, others_mask(n, f)) for n, r in
                         zip(leak, regions[len(pos):])]
            if leak:
                sel = [float(np.mean(own)) - float(np.mean(leak_dice))]
            res["objectives"][objective] = {
                "dice": float(np.mean(own)) if own else None,
                "dice_abstain": float(np.mean(np.where(kept, own, 0.0))) if own else None,
                "selectivity": float(np.mean(sel)) if sel else None,
                "selectivity_images": len(mixed) if mixed else len(leak),
                "selectivity_kind": "same images" if mixed else "other-class images",
                "mass_own": float(np.mean(mass_own)) if mass_own else None,
                "mass_other": float(np.mean(mass_other)) if mass_other else None,
            }
        out["findings"][f] = res
        print(f"  {f}: AUROC {res['auroc']:.3f}, empty {res['empty_fraction']}, " + ", ".join(
            f"{o}: DSC {v['dice']:.3f} sel {v['selectivity']}" for o, v in
            res["objectives"].items()), flush=True)
    out["maps_per_second"] = n_maps / max(t_maps, 1e-9)
    if figure_seed:
        shown = sorted(test, key=lambda n: (-len(have.get(n, {})), n))[:4]
        rows = {}
        for objective in objectives:
            for f in names:
                rows[(objective, f)] = maps_for(shown, phrases[f], objective,
                                                _contrast(names, phrases, f))
        out["figure"] = findings_figure(args, data, shown, names, phrases, have, rows, image, mask)
        # how much the prompt moves the map: mean |map(f) - map(g)| over prompt pairs
        out["prompt_map_difference"] = {
            o: float(np.mean([np.abs(a_ - b_).mean() for i, f in enumerate(names)
                              for g in names[i + 1:]
                              for a_, b_ in zip(rows[(o, f)], rows[(o, g)])]))
            for o in objectives}
    return out


def findings_figure(args, data, shown, names, phrases, have, rows, image, mask) -> str:
    """Rows = prompts, columns = the same 4 test images; one block per objective."""
    import cv2

    blocks = []
    for objective in dict.fromkeys(o for o, _ in rows):
        lines = []
        for f in names:
            tiles = []
            for n, m in zip(shown, rows[(objective, f)]):
                gray = cv2.cvtColor((image(n)[0] * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
                heat = cv2.applyColorMap((m * 255).astype(np.uint8), cv2.COLORMAP_JET)
                tile = cv2.addWeighted(gray, 0.5, heat, 0.5, 0)
                cnts, _ = cv2.findContours(mask(n, f).astype(np.uint8), cv2.RETR_EXTERNAL,
                                           cv2.CHAIN_APPROX_NONE)
                cv2.drawContours(tile, cnts, -1, (255, 255, 255), 1)
                tiles.append(tile)
            row = np.hstack(tiles)
            label = np.zeros((row.shape[0], 150, 3), np.uint8)
            cv2.putText(label, phrases[f][:20], (3, row.shape[0] // 2), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4, (255, 255, 255), 1)
            lines.append(np.hstack([label, row]))
        head = np.zeros((18, lines[0].shape[1], 3), np.uint8)
        cv2.putText(head, f"objective: {objective}", (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (255, 255, 255), 1)
        blocks.append(np.vstack([head] + lines))
    sheet = np.hstack([np.pad(b, ((0, 0), (0, 8), (0, 0))) for b in blocks])
    path = Path(args.out) / f"{args.findings_name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), sheet)
    return path.name


def main_findings(args, argv) -> int:
    import torch

    from mwm.clip import ClipTrainConfig, train_clip
    from mwm.runtime import configure_process

    data = findings_data(args)
    configure_process(threads=int(args.threads if args.threads != "auto" else 1))
    seeds = args.clip_seeds
    per_seed = {}
    for i, seed in enumerate(seeds):
        model_dir = Path(args.work) / f"clip-{args.findings_name}-s{seed}"
        load_before = os.getloadavg()[0]
        if args.reuse_model and (model_dir / "bench_train.json").is_file():
            train = json.loads((model_dir / "bench_train.json").read_text())
        else:
            cfg = ClipTrainConfig(
                pairs=str(data), out=str(model_dir), model=args.model, loss=args.loss,
                negatives=args.negatives, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, seed=seed, prompt_mix=args.prompt_mix,
                token_max_weight=args.token_max_weight, captions=args.captions,
                swap_negatives=args.swap_negatives, phrase_weight=args.phrase_weight,
                phrase_embedding=args.phrase_embedding, quiet=True, resume=False,
                time_limit=args.budget)
            s = train_clip(cfg)
            train = {k: v for k, v in s.as_dict().items() if k != "log"}
            train.update(log=s.log, load_average_1min_before=load_before,
                         load_average_1min_after=os.getloadavg()[0])
            (model_dir / "bench_train.json").write_text(json.dumps(train, indent=1, default=str))
        print(f"seed {seed}: {train['n_pairs']} pairs, {len(train['log'])} epochs in "
              f"{train['seconds']:.0f} s (load {train['load_average_1min_before']:.1f} → "
              f"{train['load_average_1min_after']:.1f}), final loss {train['final_loss']:.3f}",
              flush=True)
        if args.train_only:
            continue
        t = time.perf_counter()
        result = evaluate_findings(args, data, model_dir, figure_seed=i == 0)
        result["eval_seconds"] = time.perf_counter() - t
        result["training"] = train
        per_seed[seed] = result
    if args.train_only:
        return 0
    summary = aggregate_findings(per_seed)
    results = {"per_seed": per_seed, "summary": summary,
               "settings": {k: v for k, v in vars(args).items()},
               "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                           "platform": platform.platform()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.findings_name}.json").write_text(json.dumps(results, indent=1, default=str))
    write_report(out / f"{args.findings_name}.md", findings_report(results, argv))
    print((out / f"{args.findings_name}.md").read_text())
    return 0


def _mean_std(values) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    return {"mean": float(v.mean()) if v.size else None,
            "std": float(v.std()) if v.size else None, "n": int(v.size)}


def aggregate_findings(per_seed: dict) -> dict:
    """Mean ± std over seeds, per finding and objective, and of the per-finding means."""
    first = next(iter(per_seed.values()))
    out = {}
    for f in first["findings"]:
        entry = {m: _mean_std([r["findings"][f][m] for r in per_seed.values()])
                 for m in ("auroc", "empty_fraction", "kept_fraction")}
        for o in first["objectives"]:
            entry[o] = {m: _mean_std([r["findings"][f]["objectives"][o][m]
                                      for r in per_seed.values()])
                        for m in ("dice", "dice_abstain", "selectivity", "mass_own", "mass_other")}
        out[f] = entry
    overall = {m: _mean_std([np.nanmean([r["findings"][f][m] if r["findings"][f][m] is not None
                                         else np.nan for f in first["findings"]])
                             for r in per_seed.values()])
               for m in ("auroc", "empty_fraction")}
    for o in first["objectives"]:
        overall[o] = {m: _mean_std([np.nanmean([
            r["findings"][f]["objectives"][o][m]
            if r["findings"][f]["objectives"][o][m] is not None else np.nan
            for f in first["findings"]]) for r in per_seed.values()])
            for m in ("dice", "dice_abstain", "selectivity", "mass_own", "mass_other")}
    out["_mean_over_findings"] = overall
    return out


def _ms2(s: dict) -> str:
    return "—" if s.get("mean") is None else f"{s['mean']:.3f} ± {s['std']:.3f}"


def findings_report(r: dict, argv) -> str:
    s, summary = r["settings"], r["summary"]
    cmd = "python benchmarks/bench_localization.py " + " ".join(argv or sys.argv[1:])
    seeds = list(r["per_seed"])
    first = r["per_seed"][seeds[0]]
    objectives = first["objectives"]
    lines = [f"# Does the prompt choose where the saliency goes? (`--findings {s['findings']}`)",
             "", f"Command: `{cmd.strip()}`", "",
             f"CLIP seeds {', '.join(map(str, seeds))}; values are mean ± std over the seeds "
             f"(each seed: up to {s['per_prompt']} held-out {s.get('eval_split', 'test')} images per prompt). Targets: "
             "DSC ≥ 0.6, selectivity ≥ 0.4, presence AUROC ≥ 0.9, empty fraction ≥ 0.8.",
             "", "## Mean over the finding prompts", "",
             "| objective | DSC | DSC with abstention | selectivity | mass on own / other "
             "findings' masks | presence AUROC | empty fraction (no finding) |",
             "|---|---|---|---|---|---|---|"]
    mo = summary["_mean_over_findings"]
    for o in objectives:
        v = mo[o]
        lines.append(f"| {o} | {_ms2(v['dice'])} | {_ms2(v['dice_abstain'])} | "
                     f"{_ms2(v['selectivity'])} | {_ms2(v['mass_own'])} / {_ms2(v['mass_other'])} "
                     f"| {_ms2(mo['auroc'])} | {_ms2(mo['empty_fraction'])} |")
    lines += ["", "## Per finding prompt", "",
              "| finding (prompt) | objective | DSC | selectivity | mass own / other | "
              "AUROC | empty fraction | kept fraction (with finding) |",
              "|---|---|---|---|---|---|---|---|"]
    for f, e in summary.items():
        if f.startswith("_"):
            continue
        for o in objectives:
            v = e[o]
            lines.append(f"| {f} (\"{first['findings'][f]['prompt']}\") | {o} | {_ms2(v['dice'])} "
                         f"| {_ms2(v['selectivity'])} | {_ms2(v['mass_own'])} / "
                         f"{_ms2(v['mass_other'])} | {_ms2(e['auroc'])} | "
                         f"{_ms2(e['empty_fraction'])} | {_ms2(e['kept_fraction'])} |")
    sel_kind = {first["findings"][f]["objectives"][objectives[0]]["selectivity_kind"]
                for f in first["findings"]}
    lines += ["", "## Settings", "",
              f"* Data: brain-MRI phantoms, `--findings {s['findings']}`, n={s['n']}, "
              f"size {s['size']}, seed {s['seed']}; CLIP trained on the train split, the "
              "presence threshold calibrated (Youden's J) on up to "
              f"{s['per_prompt']} + {s['per_prompt']} validation images per prompt "
              f"({first['threshold_source']}), everything else scored on {s.get('eval_split', 'test')} images.",
              f"* CLIP: `{s['model']}`, loss {s['loss']}, negatives {s['negatives']}, captions "
              f"{s['captions']}, swap negatives {s['swap_negatives']}, phrase weight "
              f"{s['phrase_weight']} ({s['phrase_embedding']}), token-max weight "
              f"{s['token_max_weight'] if s['token_max_weight'] is not None else 'default (1)'}, "
              f"prompt_mix {s['prompt_mix']}, batch {s['batch_size']}, {s['epochs']} epochs "
              f"planned, budget {s['budget']:.0f} s, {s['threads']} thread(s).",
              f"* M2IB: layer {s['layer']}, beta {s['beta']}, noise scale {s['noise_scale']}, "
              f"shifts {s['shifts']}, smooth {s['smooth']}, {s['steps']} steps × {s['samples']} "
              f"samples; contrastive temperature {s['temperature']}; contrast prompts: the "
              "normal-brain prompt and the other findings' phrases. Postprocess "
              f"{s['method']}, top-{s['top_k']} by {s['rank']}, CRF {s['crf']}.",
              f"* Selectivity: {', '.join(sorted(sel_kind))}.", "",
              "## Per seed (training)", "",
              "| seed | pairs | epochs | seconds | final loss | load before → after | "
              "eval seconds | maps/s |", "|---|---|---|---|---|---|---|---|"]
    for seed, res in r["per_seed"].items():
        t = res["training"]
        lines.append(f"| {seed} | {t['n_pairs']} | {len(t['log'])} | {t['seconds']:.0f} | "
                     f"{t['final_loss']:.3f} | {t['load_average_1min_before']:.1f} → "
                     f"{t['load_average_1min_after']:.1f} | {res['eval_seconds']:.0f} | "
                     f"{res['maps_per_second']:.2f} |")
    if first.get("prompt_map_difference"):
        lines += ["", "Mean \\|map(prompt A) − map(prompt B)\\| over the prompt pairs on the "
                  "figure's four images (maps in [0, 1]), CLIP seed "
                  f"{seeds[0]}: " + ", ".join(f"{o} {v:.3f}" for o, v in
                                             first["prompt_map_difference"].items()) + "."]
    if first.get("figure"):
        lines += ["", "## Figure", "", f"![maps]({first['figure']})", "",
                  f"CLIP seed {seeds[0]}. Rows: the finding prompts; columns: the same four "
                  f"{s.get('eval_split', 'test')} images (those with the most findings); white contour: the prompt's "
                  "finding mask (none when absent). One block per M2IB objective."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
