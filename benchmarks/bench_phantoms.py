"""Benchmark the phantom generator: images/s of a whole ``generate_phantoms`` call.

Times the complete call (rendering, PNG writes, CSV/JSON/COCO manifests) into a
temporary folder for each modality and writes a markdown table to
``benchmarks/results/phantoms.md``.

    python benchmarks/bench_phantoms.py --n 2000 --size 128 --workers 2 --modality all
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mwm.data.phantoms import MODALITIES, generate_phantoms  # noqa: E402
from mwm.files import write_bytes, write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "phantoms.md"


def _atomic_write_ms(root: str, count: int = 200) -> float:
    """Mean time of one small atomic write (through mwm.files) into a fresh folder of ``root``."""
    payload = bytes(3000)
    with tempfile.TemporaryDirectory(prefix="mwm-bench-fs-", dir=root) as tmp:
        t0 = time.perf_counter()
        for i in range(count):
            write_bytes(Path(tmp) / f"f{i:05d}.png", payload)
        return (time.perf_counter() - t0) / count * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images per modality (default 2000)")
    ap.add_argument("--size", type=int, default=128, help="image size in pixels (default 128)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--modality", default="all", choices=("all",) + MODALITIES)
    ap.add_argument("--bit-depth", type=int, default=8, choices=(8, 16))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp-root", nargs="+", default=[tempfile.gettempdir()],
                    help="folder(s) in which the temporary output folders are made "
                         "(default: the system temp folder); one row per folder and modality")
    ap.add_argument("--out", type=Path, default=RESULTS, help="markdown result file")
    args = ap.parse_args(argv)

    modalities = MODALITIES if args.modality == "all" else (args.modality,)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    for root in args.tmp_root:
        fs_ms = _atomic_write_ms(root)
        for modality in modalities:
            with tempfile.TemporaryDirectory(prefix="mwm-bench-", dir=root) as tmp:
                s = generate_phantoms(tmp, modality, n=args.n, size=args.size, seed=args.seed,
                                      bit_depth=args.bit_depth, workers=args.workers,
                                      progress=False)
            rate = s.n / s.seconds
            rows.append((modality, s.n, s.size, args.workers, s.seconds, rate, root, fs_ms))
            print(f"{modality:<11} n={s.n} size={s.size} workers={args.workers} "
                  f"bit_depth={args.bit_depth} in {root} ({fs_ms:.2f} ms/atomic file): "
                  f"{s.seconds:.2f} s, {rate:.0f} images/s", flush=True)

    command = "python benchmarks/bench_phantoms.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    lines = [
        "# Phantom generator benchmark",
        "",
        "Whole `generate_phantoms` call (render, PNG image + mask writes, CSV/JSON/COCO "
        f"manifests), {args.bit_depth}-bit images.",
        "",
        f"- command: `{command.strip()}`",
        f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"os.cpu_count()={os.cpu_count()}, Python {platform.python_version()}",
        f"- load average (1/5/15 min) before the run: "
        f"{'/'.join(f'{x:.2f}' for x in load_before) if load_before else 'n/a'} "
        "(other processes on the machine slow the rate down)",
        "",
        "Each image costs two atomic file writes (image + mask); the last column is the "
        "measured cost of one small atomic write (mkstemp + write + rename) in that folder, "
        "which bounds the rate on slow file systems.",
        "",
        "| modality | n | size | workers | seconds | images/s | output folder | ms / atomic write |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    lines += [f"| {m} | {n} | {sz} | {w} | {sec:.2f} | {rate:.0f} | `{root}` | {fs:.2f} |"
              for m, n, sz, w, sec, rate, root, fs in rows]
    write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
