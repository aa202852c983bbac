"""A fingerprint of everything `mwm demo --quick` computes, for the golden test.

`snapshot(out)` reads a finished demo folder and returns, as plain JSON values:

* ``files``: the SHA-256 of the pixel array of every phantom image, saliency map, region
  mask and pretraining figure (decoded pixels, so PNG text chunks that hold timestamps
  do not count), and of the tensors of every trained model (the CLIP and each encoder);
* ``curves``: the CLIP and pretraining logs and the probes' metrics without their timing
  columns (loss, lr, weight decay, realized mask ratios per logged step);
* ``results``: each strategy's probe metrics and the localization scores.

`environment()` names what the numbers depend on (library versions, CPU capability,
threads). Record a new golden file, after a change that is meant to change results, with

    python tests/golden_snapshot.py tests/golden/demo_quick.json

(it runs `mwm demo --quick --seed 0` into a temporary folder and writes the snapshot).
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import tempfile
from pathlib import Path

PIXEL_FOLDERS = ("data/images", "data/masks", "saliency", "regions")
TIMING_COLUMNS = {"seconds", "images_per_s", "images_per_second"}
MODEL_FILES = ("clip/open_clip_model.safetensors", "cells/*/seed*/pretrain/encoder.safetensors")
LOG_FILES = ("clip/train_log.csv", "cells/*/seed*/pretrain/train_log.csv",
             "cells/*/seed*/eval_*/metrics.csv")


def environment() -> dict:
    """What exact results depend on: versions, CPU capability, thread count."""
    import importlib.metadata as md
    import platform

    import torch

    from mwm.utils import native_bf16

    versions = {name: md.version(name) for name in
                ("torch", "numpy", "opencv-python-headless", "timm", "open_clip_torch", "scipy")}
    return {"versions": versions, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": bool(native_bf16(torch.device("cpu"))),
            "threads": torch.get_num_threads()}


def _pixels_sha(path: Path) -> str:
    import cv2
    import numpy as np

    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise OSError(f"{path}: unreadable image")
    digest = hashlib.sha256(f"{pixels.shape}{pixels.dtype}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def _tensors_sha(path: Path) -> str:
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for key, tensor in sorted(load_file(str(path)).items()):
        digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


def _log_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS}
                for row in csv.DictReader(handle)]


def snapshot(out: str | Path) -> dict:
    out = Path(out)
    files = {}
    for folder in PIXEL_FOLDERS:
        for path in sorted((out / folder).glob("*.png")):
            files[str(path.relative_to(out))] = _pixels_sha(path)
    for path in sorted(out.glob("cells/*/seed*/pretrain/figures/*.png")):
        files[str(path.relative_to(out))] = _pixels_sha(path)
    for pattern in MODEL_FILES:
        for path in sorted(out.glob(pattern)):
            files[str(path.relative_to(out))] = _tensors_sha(path)
    curves = {str(p.relative_to(out)): _log_rows(p)
              for pattern in LOG_FILES for p in sorted(out.glob(pattern))}
    results = json.loads((out / "results.json").read_text())
    localization = json.loads((out / "localization" / "summary.json").read_text())
    metric_keys = ("accuracy", "balanced_accuracy")
    strategies = [{k: v for k, v in row.items() if k.startswith("linear_") or k in
                   ("strategy", "ratio_overall")} for row in results["strategies"]]
    return {"files": files, "curves": curves,
            "results": {"strategies": strategies,
                        "localization": {k: v["mean"] for k, v in
                                         localization["metrics"].items()},
                        "metric_keys": list(metric_keys)}}


def main(argv: list[str]) -> int:
    from mwm.cli import main as mwm_main

    target = Path(argv[0]) if argv else Path(__file__).parent / "golden" / "demo_quick.json"
    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp) / "quick"
        code = mwm_main(["demo", "--quick", "--seed", "0", "--out", str(demo), "--quiet"])
        if code != 0:
            print(f"mwm demo --quick exited {code}", file=sys.stderr)
            return code
        record = {"command": "mwm demo --quick --seed 0 --quiet", "environment": environment(),
                  **snapshot(demo)}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {target}: {len(record['files'])} file fingerprints, "
          f"{len(record['curves'])} logs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
