"""``mwm demo``: the whole pipeline on synthetic phantoms, offline, in one command.

The demo is a small experiment (:mod:`mwm.experiment`, the file ``mwm/configs/demo.yaml``)
with one seed and three strategies, so it leaves exactly the folder layout and report
``mwm experiment`` does:

1. ``data/``          a phantom dataset (images, lesion masks, captions, prompts); by
   default multi-finding phantoms (``docs/phantoms.md``): beside the lesion, other
   findings with their own masks;
2. ``clip/``          a small CLIP trained from scratch on the train split's captions;
3. ``saliency/``      M2IB saliency maps of each image's prompt;
4. ``regions/``       region masks (k-means, the component with the most saliency);
5. ``localization/``  DSC / NSD of the regions against the lesion masks (test split), and
   selectivity: DSC against the lesion minus DSC against the image's other findings;
6. ``cells/``         resnet18 pretrained with random masking (60%) and with region-aware
   masking (80% in the region, 40% outside), then linear probes of the lesion class, and
   the same probe on a randomly initialized encoder (``scratch``);
7. ``results.md`` and ``report.html``.

The localizer is a tiny model trained for minutes on a CPU and the pretraining lasts
minutes: the demo shows the pipeline end to end, not the method's accuracy (see
``configs/`` and ``benchmarks/results/`` for measured comparisons).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import load_yaml, opt
from .data.findings import FINDING_MODES
from .data.phantoms import MODALITIES
from .experiment import parse_experiment, run_experiment

DEMO_EXPERIMENT = Path(__file__).parent / "configs" / "demo.yaml"
#: The presets: (default, --quick). On 2 idle cores the default took 10.5 minutes without
#: native bf16 (about 6 with AMX), quick about a minute (2026-12-01).
PRESETS = {"n": (400, 64), "size": (128, 96), "clip_seconds": (180.0, 30.0), "clip_epochs": (12, 3),
           "pretrain_epochs": (8, 2), "probe_epochs": (20, 10)}


@dataclass(kw_only=True)
class DemoConfig:
    """Settings of ``mwm demo``; a size left as None comes from the preset."""

    out: str = opt("mwm-demo", "output folder")
    quick: bool = opt(False, "a smaller run: a smoke test of every stage (about a minute on 2 "
                      "CPU cores)")
    modality: str = opt(MODALITIES[0], "phantom anatomy", choices=MODALITIES)
    findings: str = opt("multi", "phantom findings: multi = other findings beside the lesion "
                        "(each with its mask), so the table shows whether the region picks the "
                        "prompt's finding (selectivity); single = the lesion alone",
                        choices=FINDING_MODES)
    n: int | None = opt(None, "number of phantom images (default: 400; quick: 64)", low=8)
    size: int | None = opt(None, "image side in pixels (default: 128; quick: 96)", low=32)
    clip_seconds: float | None = opt(None, "time budget of the CLIP training (default: 180 s; "
                                     "quick: 30 s)", low=0.0)
    clip_epochs: int | None = opt(None, "CLIP epochs at most (default: 12; quick: 3)", low=1)
    pretrain_epochs: int | None = opt(None, "pretraining epochs per strategy (default: 8; "
                                      "quick: 2)", low=1)
    probe_epochs: int | None = opt(None, "linear-probe epochs (default: 20; quick: 10)", low=1)
    seed: int = opt(0, "random seed")
    workers: int | None = opt(None, "processes for phantom generation (default: every core)",
                              low=1)
    quiet: bool = opt(False, "no progress bars")

    def sizes(self) -> dict:
        """The demo's sizes: explicit settings win over the default or ``--quick`` preset."""
        column = 1 if self.quick else 0
        return {key: getattr(self, key) if getattr(self, key) is not None else pair[column]
                for key, pair in PRESETS.items()}


def demo_experiment(cfg: DemoConfig) -> dict:
    """The demo's experiment file with the preset's sizes filled in (``mwm experiment``
    reads the same keys)."""
    from .pretrain.encoders import fit_input_size

    raw = load_yaml(DEMO_EXPERIMENT)
    s = cfg.sizes()
    raw["name"] = "demo-quick" if cfg.quick else raw["name"]
    raw["data"] = {"phantoms": {"modality": cfg.modality, "n": s["n"], "size": s["size"],
                                "seed": cfg.seed, "findings": cfg.findings}}
    raw["localize"]["clip"] = {"seconds": s["clip_seconds"], "epochs": s["clip_epochs"]}
    pretrain = raw["pretrain"]
    pretrain.update(input_size=fit_input_size(s["size"], pretrain["model"]),
                    epochs=s["pretrain_epochs"])
    for item in raw["evaluate"]:
        item["epochs"] = s["probe_epochs"]
    raw["seeds"] = [cfg.seed]
    return raw


def run_demo(cfg: DemoConfig, experiment: dict | None = None) -> tuple[dict, Path]:
    """Run the demo experiment (``experiment``: :func:`demo_experiment`'s, if already made)
    into ``cfg.out`` and write its report: (results, report)."""
    from .report.html import write_report

    config = parse_experiment(experiment or demo_experiment(cfg), source="mwm demo")
    results = run_experiment(config, Path(cfg.out), workers=cfg.workers, quiet=cfg.quiet)
    return results, write_report(Path(cfg.out))
