"""Contrastive image–text training of a CLIP model (``mwm clip train``).

:func:`train_clip` trains a small open_clip model from scratch (``model="scratch-tiny"``)
or fine-tunes a pretrained one (an open_clip name, ``hf-hub:org/repo`` such as BiomedCLIP,
or a local open_clip folder; :mod:`mwm.clip.model`) on image/caption pairs with symmetric
InfoNCE or DHN-NCE (:mod:`mwm.clip.losses`), through the training engine
(:mod:`mwm.engine`). Every setting is a field of :class:`ClipTrainConfig`.

Output folder (open_clip's own folder format, so ``open_clip.create_model("local-dir:DIR")``
and MWM's ``--model DIR`` load it offline)::

    open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": {...}, "mwm": {...}}
    open_clip_model.safetensors  model weights
    m2ib_recommended.json        M2IB settings for `mwm localize` (scratch models only)
    train_log.csv                epoch,loss,lr,seconds,images_per_second
    checkpoint.pt                weights + optimizer state + settings, for resuming
    (tokenizer files)            only for models with a Hugging Face tokenizer

Every file is written atomically after every epoch. Calling :func:`train_clip` again with
the same settings and a larger ``epochs`` continues from ``checkpoint.pt``; shuffling and
augmentation are drawn from per-epoch seeds, so an interrupted and resumed run gives
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import check_ranges, opt
from ..errors import DataError
from ..files import atomic_path, write_csv
from ..utils import AMP_CHOICES
from .batches import caption_pool, same_group, same_image
from .data import (CAPTION_SOURCES, FINDINGS_NAME, CaptionPair, FindingTable, augment_batch,
                   is_finding, load_images, read_findings, read_pairs,
                   swap_finding)
from .losses import LOSSES, PhraseHead, contrastive_loss, same_caption_matrix
from .model import (CONFIG_NAME, OPENAI_MEAN, OPENAI_STD, PRESET_LR, SCRATCH_TOKEN_MAX_WEIGHT,
                    WEIGHTS_NAME, _image_size, build_model, encode_image_tokens,
                    recommended_m2ib, save_model_folder)

__all__ = ["CHECKPOINT_NAME", "CONFIG_NAME", "ClipTrainConfig", "ClipTrainSummary", "LOG_NAME",
           "WEIGHTS_NAME", "train_clip"]

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.csv"
LOG_FIELDS = ("epoch", "loss", "lr", "seconds", "images_per_second")
#: Which pairs of a batch are not negatives, besides identical captions.
NEGATIVES = ("caption", "normal", "label")
#: Which image embedding the phrase loss reads.
PHRASE_EMBEDDINGS = ("pooled", "token-max", "both", "tokens", "pooled+tokens")


@dataclass(kw_only=True)
class ClipTrainConfig:
    """Everything a CLIP training run depends on."""

    pairs: str = opt(help="CSV with image,caption columns, or a phantom folder (its "
                     "captions.csv, train split)", positional=True)
    out: str = opt(help="the model folder")
    model: str = opt("scratch-tiny", "scratch-tiny, scratch-small, an open_clip name with "
                     "--pretrained TAG, hf-hub:ORG/REPO, or a model folder")
    pretrained: str | None = opt(None, "open_clip pretrained tag to fine-tune")
    loss: str = opt("infonce", "infonce (learnable logit scale) or dhn-nce (decoupled "
                    "hard-negative NCE)", choices=LOSSES)
    epochs: int = opt(12, "epochs", low=1)
    batch_size: int = opt(32, "pairs per step (contrastive losses need at least 2)", low=2)
    lr: float | None = opt(None, "peak learning rate (default: 2e-3 for scratch-tiny/-micro, "
                           "5e-4 for other scratch models, 1e-5 when fine-tuning)", above=0.0)
    weight_decay: float = opt(0.1, "AdamW weight decay (not on norms, biases, embeddings)",
                              low=0.0)
    warmup: float = opt(0.05, "fraction of the steps with a linear warm-up", low=0.0, high=1.0)
    input_size: int | None = opt(None, "pixels (scratch models; default per model)", low=8)
    arch: dict | None = opt(None, "scratch preset keys to override (patch_size, width, ...)",
                            cli=False)
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (a GPU if there is one)")
    workers: int | None = opt(None, "image-loading processes (default: number of CPU cores)",
                              low=1)
    amp: str = opt("auto", "mixed precision (auto = bf16 where the device has native bf16)",
                   choices=AMP_CHOICES)
    tau: float | None = opt(None, "dhn-nce temperature (default: the model's learnable one)",
                            above=0.0)
    beta1: float = opt(0.15, "dhn-nce hardness of image→text negatives", low=0.0)
    beta2: float = opt(0.15, "dhn-nce hardness of text→image negatives", low=0.0)
    hflip: float = opt(0.5, "horizontal flip probability (captions' sides swapped)", low=0.0,
                       high=1.0)
    min_scale: float = opt(0.8, "smallest area fraction of the random crop", above=0.0, high=1.0)
    jitter: float = opt(0.1, "brightness/contrast jitter", low=0.0)
    prompt_mix: float = opt(0.2, "fraction of lesion images whose caption is replaced by the "
                            "short prompt (phantoms; so the model learns the words a prompt "
                            "uses)", low=0.0, high=1.0)
    grad_clip: float | None = opt(1.0, "gradient norm clip (0 = off)", low=0.0)
    negatives: str = opt("normal", "pairs that are not negatives besides identical captions: "
                         "normal (lesion-free images among themselves), label (same class), "
                         "caption (only identical captions)", choices=NEGATIVES)
    token_max_weight: float | None = opt(
        None, "add W x the contrastive loss of the per-channel maximum over patch tokens, which "
        "keeps a small lesion's evidence on its own tokens for M2IB (default: 1 for scratch "
        "models, 0 when fine-tuning)", low=0.0, metavar="W")
    captions: str = opt("general", "which captions of a folder: general (captions.csv), "
                        "findings (finding_captions.csv: one caption per present finding, "
                        "plus the general caption of lesion-free images) or both",
                        choices=CAPTION_SOURCES)
    swap_negatives: bool = opt(False, "give every pair one more negative: a caption of a "
                               "finding its image does not have (its own caption with the "
                               "finding's phrase swapped when it names one; needs "
                               "findings.csv)")
    phrase_weight: float = opt(0.0, "add W x a multi-label sigmoid loss of the image embedding "
                               "against every finding phrase of findings.csv (target: the "
                               "finding is present)", low=0.0, metavar="W")
    phrase_embedding: str = opt("both", "image embedding(s) the phrase loss reads: pooled, "
                                "token-max (the token-max loss's), both (those two), tokens "
                                "(each patch token, the best one counts) or pooled+tokens",
                                choices=PHRASE_EMBEDDINGS)
    split: str = opt("train", "the split of the pairs to train on")
    resume: bool = opt(True, "continue an existing run in --out (--no-resume refuses)")
    time_limit: float | None = opt(None, "stop after this many seconds (at an epoch end; a "
                                   "re-run continues)", low=0.0)
    quiet: bool = opt(False, "no progress bars")

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class ClipTrainSummary:
    """What :func:`train_clip` did."""

    out_dir: Path
    model: str
    loss: str
    n_pairs: int
    epochs: int
    start_epoch: int          # epochs already done before this call (resume)
    steps: int                # optimizer steps in this call
    final_loss: float | None  # mean loss of the last epoch
    seconds: float            # training time of this call (images loaded included)
    images_per_second: float
    input_size: int
    parameters: int
    amp: str
    device: str
    log: list[dict] = field(default_factory=list)
    stopped_early: bool = False  # time_limit reached before ``epochs``

    def as_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


def _amp_mode(amp: str, device) -> str:
    """The project's one ``--amp`` rule (:func:`mwm.utils.resolve_amp`) as a mode name."""
    import torch

    from ..utils import resolve_amp

    dtype = resolve_amp(amp, device)
    return {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def decays(name: str, param) -> bool:
    """Weight decay on weights; not on norms, biases, embeddings or the logit scale."""
    return not (param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name
                or "logit_scale" in name or "embedding" in name)


def _data_digest(pairs: list[CaptionPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        # the findings only when known: digests of folders without them stay as they were
        known = "" if p.finding is None and p.findings is None else \
            f"\t{p.finding}\t{','.join(p.findings or ())}"
        h.update(f"{p.image}\t{p.caption}\t{p.label}\t{p.prompt}{known}\n".encode("utf-8"))
    return h.hexdigest()[:16]


def train_clip(cfg: ClipTrainConfig) -> ClipTrainSummary:
    """Train (or fine-tune) a CLIP model on image/caption pairs; see the module docstring
    and the fields of :class:`ClipTrainConfig`.

    Identical captions in a batch are never negatives; with ``negatives="normal"`` two
    lesion-free pairs are not either (the image cannot tell which "normal" sentence it was
    given). ``token_max_weight`` adds a contrastive loss on the per-channel maximum of the
    projected patch tokens (:func:`~mwm.clip.model.encode_image_and_token_max`), so single
    tokens must carry the caption's evidence; it needs an open_clip ``VisionTransformer``
    (the scratch presets). A larger ``epochs`` than a finished run's continues it (the
    cosine schedule then stretches to the new total).
    """
    return _ClipRun(cfg).run()


class _ClipRun:
    def __init__(self, cfg: ClipTrainConfig):
        import torch

        from ..engine import Engine, Schedule, build_optimizer, param_groups
        from ..utils import resolve_device

        self.t_start = time.perf_counter()
        self.cfg, self.out = cfg, Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.amp_mode = _amp_mode(cfg.amp, self.device)
        self.data = read_pairs(cfg.pairs, split=cfg.split, captions=cfg.captions)
        self.table = _finding_table(cfg)
        self.pool = caption_pool(self.data)
        self.phrase_head = PhraseHead() if cfg.phrase_weight else None
        self.net, self.tokenizer, self.model_cfg, self.pre_cfg, kind = build_model(
            cfg.model, input_size=cfg.input_size, arch=cfg.arch, pretrained=cfg.pretrained,
            seed=cfg.seed)
        self.size = _image_size(self.model_cfg)
        self.token_max = cfg.token_max_weight
        if self.token_max is None:
            self.token_max = SCRATCH_TOKEN_MAX_WEIGHT if kind == "scratch" else 0.0
        self.phrase_on = ({"both": ("pooled", "token-max")}.get(
            cfg.phrase_embedding, tuple(cfg.phrase_embedding.split("+")))
            if self.phrase_head else ())
        # M2IB advice only where it was measured: models trained from scratch
        self.m2ib = recommended_m2ib(self.model_cfg, self.token_max) if kind == "scratch" else None
        default_lr = PRESET_LR.get(cfg.model, 5e-4) if kind == "scratch" else 1e-5
        peak = float(cfg.lr if cfg.lr is not None else default_lr)
        self.settings = self._settings(peak)
        self.net.to(self.device)
        trained = self.net
        if self.phrase_head is not None:  # its scale and bias are optimized (and clipped) too
            self.phrase_head.to(self.device)
            trained = torch.nn.ModuleDict({"net": self.net, "phrase": self.phrase_head})
        n = len(self.data)
        self.steps_per_epoch = n // cfg.batch_size if n >= cfg.batch_size else 1
        self.bsz = min(cfg.batch_size, n)
        if self.bsz < 2:
            raise DataError(f"{cfg.pairs}: only {n} training pair(s); contrastive training "
                            "needs at least 2.")
        total = cfg.epochs * self.steps_per_epoch
        groups = param_groups(trained, decays=decays, weight_decay=cfg.weight_decay,
                              order=lambda key: not key[1])  # decay group first (as saved)
        optimizer = build_optimizer(groups, "adamw", betas=(0.9, 0.98), eps=1e-6)
        self.engine = Engine(trained, optimizer, device=self.device, amp=self.amp_mode,
                             schedule=Schedule(peak, total, int(round(cfg.warmup * total)),
                                               shift=1, end=total),
                             clip=cfg.grad_clip)
        self.log: list[dict] = []
        if cfg.resume and (self.out / CHECKPOINT_NAME).is_file():
            self._restore(self.out / CHECKPOINT_NAME)
        self.mean = torch.tensor(self.pre_cfg.get("mean", OPENAI_MEAN),
                                 dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(self.pre_cfg.get("std", OPENAI_STD),
                                dtype=torch.float32).view(1, -1, 1, 1)

    def _settings(self, peak: float) -> dict:
        """What a resumed run must share with the checkpoint (and the saved record)."""
        cfg = self.cfg
        return {
            "model": cfg.model, "model_cfg": self.model_cfg, "pretrained": cfg.pretrained,
            "loss": cfg.loss, "batch_size": int(cfg.batch_size), "lr": peak,
            "weight_decay": float(cfg.weight_decay), "warmup": float(cfg.warmup),
            "seed": int(cfg.seed), "tau": cfg.tau, "beta1": float(cfg.beta1),
            "beta2": float(cfg.beta2), "hflip": float(cfg.hflip),
            "min_scale": float(cfg.min_scale), "jitter": float(cfg.jitter),
            "prompt_mix": float(cfg.prompt_mix), "grad_clip": cfg.grad_clip,
            "negatives": cfg.negatives,
            # only when used, so that fine-tuning checkpoints written before it existed resume
            **self._token_max_setting(), **self._findings_settings(),
            "split": cfg.split, "n_pairs": len(self.data), "data_digest": _data_digest(self.data),
            "amp": self.amp_mode,
        }

    def _token_max_setting(self) -> dict:
        return {"token_max_weight": float(self.token_max)} if self.token_max else {}

    def _findings_settings(self) -> dict:
        """The finding options that differ from their defaults (older checkpoints resume)."""
        cfg, out = self.cfg, {}
        if cfg.captions != "general":
            out["captions"] = cfg.captions
        if cfg.swap_negatives:
            out["swap_negatives"] = True
        if cfg.phrase_weight:
            out.update(phrase_weight=float(cfg.phrase_weight),
                       phrase_embedding=cfg.phrase_embedding,
                       phrases=list(self.table.phrases))
        return out

    def run(self) -> ClipTrainSummary:
        cfg, engine = self.cfg, self.engine
        start_epoch = engine.epoch
        if start_epoch >= cfg.epochs:
            return self._summary(start_epoch, 0, 0.0, 0.0, False)
        self.images = load_images([p.image for p in self.data], self.size,
                                  max(1, int(cfg.workers or os.cpu_count() or 1)),
                                  progress=not cfg.quiet)
        self.extra = {"trained_by": "mwm clip train", "loss": cfg.loss, "epochs_done": 0,
                      "input": "to_model_input -> zero-pad to centred square -> resize "
                               "(bilinear) -> normalize(mean, std)",
                      "pad_to_square": True, "n_pairs": len(self.data), **self._token_max_setting(),
                      **self._findings_settings()}
        seen, t_train, stopped = 0, time.perf_counter(), False
        self.net.train()
        for epoch in range(start_epoch, cfg.epochs):
            seen += self._train_epoch(epoch)
            engine.epoch = epoch + 1
            self.extra["epochs_done"] = epoch + 1
            self._save()
            if cfg.time_limit is not None and time.perf_counter() - self.t_start >= cfg.time_limit \
                    and epoch + 1 < cfg.epochs:
                stopped = True
                break
        self.net.eval()
        return self._summary(start_epoch, engine.step_count - start_epoch * self.steps_per_epoch,
                             time.perf_counter() - self.t_start,
                             seen / max(time.perf_counter() - t_train, 1e-9), stopped)

    def _train_epoch(self, epoch: int) -> int:
        """One epoch; appends its log row and returns the number of pairs seen."""
        import numpy as np
        import torch

        from ..progress import progress as bar

        cfg, engine = self.cfg, self.engine
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(int(cfg.seed) * 100_003 + epoch)
        order = torch.randperm(len(self.data), generator=generator)
        losses, seen = [], 0
        for b in bar(range(self.steps_per_epoch), total=self.steps_per_epoch,
                     desc=f"clip epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                     enabled=not cfg.quiet):
            idx = order[b * self.bsz:(b + 1) * self.bsz]
            value = self._loss(idx, generator)
            engine.backward(value)
            engine.step()
            with torch.no_grad():
                self.net.logit_scale.clamp_(0, math.log(100))
                if self.phrase_head is not None:
                    self.phrase_head.logit_scale.clamp_(0, math.log(100))
            losses.append(float(value.detach()))
            seen += len(idx)
        seconds = time.perf_counter() - t0
        self.log.append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 6),
                         "lr": float(f"{engine.optimizer.param_groups[0]['lr']:.6g}"),
                         "seconds": round(seconds, 3),
                         "images_per_second": round(self.steps_per_epoch * self.bsz
                                                    / max(seconds, 1e-9), 2)})
        return seen

    def _loss(self, idx, generator):
        """The contrastive loss of one batch (augmentation drawn from ``generator``)."""
        import torch

        cfg, dev = self.cfg, self.device
        x = self.images[idx].float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mix = torch.rand(len(idx), generator=generator).tolist()
        captions = []
        for i, r in zip(idx.tolist(), mix):
            p = self.data[i]
            use_prompt = (cfg.prompt_mix > 0 and r < cfg.prompt_mix and p.prompt
                          and is_finding(p.label))
            captions.append(p.prompt if use_prompt else p.caption)
        x, captions = augment_batch(x, captions, generator, min_scale=cfg.min_scale,
                                    hflip=cfg.hflip, jitter=cfg.jitter)
        x = ((x - self.mean) / self.std).to(dev)
        rows = idx.tolist()
        # swap-finding negatives: drawn after the augmentation, so runs without them
        # draw exactly what they drew before the option existed
        extra, owner = (self._swap_negatives(rows, captions, generator) if cfg.swap_negatives
                        else ([], []))
        phrases = list(self.table.phrases) if self.phrase_head is not None else []
        tokens = self.tokenizer(captions + extra + phrases).to(dev)
        same = same_caption_matrix(captions, dev)
        if cfg.negatives != "caption":
            same = same | same_group(self.data, rows, cfg.negatives, dev, self.table)
        if cfg.captions != "general":  # two true captions of one image are not negatives
            same = same | same_image(self.data, rows, dev)
        with self.engine.autocast():
            if self.token_max or {"token-max", "tokens"} & set(self.phrase_on):
                img, img_tokens, img_max = encode_image_tokens(self.net, x)
            else:
                img = self.net.encode_image(x, normalize=True)
            txt_all = self.net.encode_text(tokens, normalize=True).float()
        b, k = len(captions), len(extra)
        txt, hard, phrase_txt = txt_all[:b], txt_all[b:b + k], txt_all[b + k:]
        owner_t = torch.tensor(owner, dtype=torch.long, device=dev) if k else None
        terms = dict(tau=cfg.tau, beta1=cfg.beta1, beta2=cfg.beta2,
                     extra=hard if k else None, owner=owner_t)
        value = contrastive_loss(cfg.loss, img.float(), txt, self.net.logit_scale, same,
                                 **terms)
        if self.token_max:
            value = value + self.token_max * contrastive_loss(
                cfg.loss, img_max.float(), txt, self.net.logit_scale, same, **terms)
        if self.phrase_head is not None:
            present, known = self._presence(rows, dev)
            embeddings = {"pooled": img}
            if {"token-max", "tokens"} & set(self.phrase_on):
                embeddings.update({"token-max": img_max, "tokens": img_tokens})
            for name in self.phrase_on:
                value = value + cfg.phrase_weight * self.phrase_head(
                    embeddings[name].float(), phrase_txt, present, known)
        return value

    def _presence(self, rows: list[int], device):
        """(B, F) present and (B,) known: the batch's findings, as the phrase loss reads them."""
        import torch

        names = self.table.names
        present = torch.tensor([[n in (self.data[i].findings or ()) for n in names]
                                for i in rows], dtype=torch.bool, device=device)
        known = torch.tensor([self.data[i].findings is not None for i in rows],
                             dtype=torch.bool, device=device)
        return present, known

    def _swap_negatives(self, rows: list[int], captions: list[str], generator
                        ) -> tuple[list[str], list[int]]:
        """One negative caption per pair whose image lacks some finding (and its row).

        The finding swapped in is drawn among the image's absent findings. A finding
        caption that contains its finding's phrase gets that phrase replaced (the same
        sentence, another finding: the hardest negative); any other pair gets a training
        caption of the drawn finding, or its phrase when there is none.
        """
        import torch

        draws = torch.rand(len(rows), 2, generator=generator).tolist()
        extra, owner = [], []
        for row, (i, caption, (r1, r2)) in enumerate(zip(rows, captions, draws)):
            pair = self.data[i]
            if pair.findings is None:
                continue
            absent = [n for n in self.table.names if n not in pair.findings]
            if not absent:
                continue
            swap_in = absent[min(int(r1 * len(absent)), len(absent) - 1)]
            text = None
            if pair.finding is not None:
                text = swap_finding(caption, self.table.phrase(pair.finding),
                                    self.table.phrase(swap_in))
            if text is None:
                options = self.pool.get(swap_in) or [self.table.phrase(swap_in)]
                text = options[min(int(r2 * len(options)), len(options) - 1)]
            if " ".join(text.lower().split()) != " ".join(caption.lower().split()):
                extra.append(text)
                owner.append(row)
        return extra, owner

    def _summary(self, start_epoch: int, steps: int, seconds: float, rate: float,
                 stopped: bool) -> ClipTrainSummary:
        cfg = self.cfg
        return ClipTrainSummary(self.out, cfg.model, cfg.loss, len(self.data), cfg.epochs,
                                start_epoch, steps, self.log[-1]["loss"] if self.log else None,
                                seconds, rate, self.size, _count(self.net), self.amp_mode,
                                str(self.device), self.log, stopped)

    def _save(self) -> None:
        import torch

        save_model_folder(self.out, self.net, self.model_cfg, self.pre_cfg, self.tokenizer,
                          self.extra, m2ib=self.m2ib)
        write_csv(self.out / LOG_NAME, self.log, LOG_FIELDS)
        state = {"format": "mwm-clip-checkpoint", "version": 1, **self.engine.state(),
                 "settings_json": json.dumps(self.settings, sort_keys=True, default=str),
                 "log_json": json.dumps(self.log),
                 "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()}}
        if self.phrase_head is not None:
            state["phrase_head"] = {k: v.detach().cpu()
                                    for k, v in self.phrase_head.state_dict().items()}
        with atomic_path(self.out / CHECKPOINT_NAME) as tmp:
            torch.save(state, tmp)

    def _restore(self, path: Path) -> None:
        from ..checkpoint import read as read_checkpoint
        from ..engine import settings_changes

        state = read_checkpoint(path, kind="clip")  # a DataError naming the file if unusable
        if not isinstance(state, dict) or state.get("format") != "mwm-clip-checkpoint":
            raise DataError(f"{path}: not an MWM CLIP checkpoint.")
        old = json.loads(state["settings_json"])
        new = json.loads(json.dumps(self.settings, sort_keys=True, default=str))
        detail = settings_changes(old, new)
        if detail:
            raise DataError(f"{path}: this folder holds a run with other settings ({detail}). "
                            "Use a new output folder, or pass --no-resume to start over in "
                            "this one.")
        self.net.load_state_dict(state["model"])
        if self.phrase_head is not None:
            self.phrase_head.load_state_dict(state["phrase_head"])
        self.engine.restore({"scaler": None, **state})
        self.log = json.loads(state["log_json"])


def _finding_table(cfg: ClipTrainConfig) -> FindingTable | None:
    """The folder's findings table; an error when an option needs one and there is none."""
    folder = Path(cfg.pairs)
    table = read_findings(folder) if folder.is_dir() else None
    wants = [name for name, on in (("--swap-negatives", cfg.swap_negatives),
                                   ("--phrase-weight", cfg.phrase_weight)) if on]
    if wants and table is None:
        where = folder / FINDINGS_NAME if folder.is_dir() else folder
        raise DataError(f"{where}: {' and '.join(wants)} need the findings of every image "
                        f"({FINDINGS_NAME} with image,finding,present columns in the pairs "
                        "folder, as `mwm phantoms --findings multi` writes); train without "
                        "them or use such a folder.")
    return table


def _count(net) -> int:
    return int(sum(p.numel() for p in net.parameters()))


def config_fields() -> set[str]:
    """The settings an experiment's ``localize.clip`` section may give."""
    return {f.name for f in dataclasses.fields(ClipTrainConfig)} - {"pairs", "out"}
