"""Contrastive image–text training of a CLIP model (``mwm clip train``).

:func:`train_clip` trains a small open_clip model from scratch (``model="scratch-tiny"``)
or fine-tunes a pretrained one (an open_clip name, ``hf-hub:org/repo`` such as BiomedCLIP,
or a local open_clip folder) on image/caption pairs with symmetric InfoNCE or DHN-NCE
(:mod:`mwm.clip.losses`).

Output folder (open_clip's own folder format, so ``open_clip.create_model("local-dir:DIR")``
and MWM's ``--model DIR`` load it offline)::

    open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": {...}, "mwm": {...}}
    open_clip_model.safetensors  model weights
    train_log.csv                epoch,loss,lr,seconds,images_per_second
    checkpoint.pt                weights + optimizer state + settings, for resuming
    (tokenizer files)            only for models with a Hugging Face tokenizer

Every file is written atomically after every epoch. Calling :func:`train_clip` again with
the same settings and a larger ``epochs`` continues from ``checkpoint.pt``; shuffling and
augmentation are drawn from per-epoch seeds, so an interrupted and resumed run gives
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, ModelLoadError
from ..files import atomic_path, write_csv, write_json
from .data import CaptionPair, augment_batch, is_finding, load_images, read_pairs
from .losses import LOSSES, contrastive_loss, same_caption_matrix

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.csv"
LOG_FIELDS = ("epoch", "loss", "lr", "seconds", "images_per_second")
#: Which pairs of a batch are not negatives, besides identical captions (see train_clip).
NEGATIVES = ("caption", "normal", "label")

#: Scratch architectures: an open_clip VisionTransformer (patch size and input size are
#: free, unlike open_clip's timm adapter, which always builds the trunk at its
#: registered 224 px) and open_clip's own causal text transformer with the bundled
#: BPE tokenizer (vocabulary 49408), so no download is ever needed.
#:
#: ``scratch-tiny`` is the model that learned fastest on one CPU thread
#: (``benchmarks/results/localization.md``): 64 px input with **4 px patches** (a 16x16
#: grid, fine enough for small lesions), 3 narrow blocks, a one-layer text tower and
#: **mean pooling** of the patch tokens (``pool_type="avg"``), so that the image embedding
#: is an average of per-patch features and M2IB at the last block sees each patch's own
#: contribution. Its InfoNCE loss leaves the chance plateau after 2-3 epochs; the earlier
#: 128 px / patch 8 / 6-block preset had not left it after 10 CPU minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "scratch-tiny": dict(input_size=64, patch_size=4, width=96, layers=3, head_width=32,
                         mlp_ratio=2.0, text_width=64, text_layers=1, text_heads=2,
                         context_length=64, embed_dim=64, pool_type="avg",
                         pos_embed_type="sin_cos_2d"),
    "scratch-small": dict(input_size=128, patch_size=8, width=256, layers=8, head_width=64,
                          mlp_ratio=4.0, text_width=256, text_layers=6, text_heads=4,
                          context_length=64, embed_dim=256),
    # for tests and quick demos only
    "scratch-micro": dict(input_size=64, patch_size=8, width=64, layers=2, head_width=32,
                          mlp_ratio=2.0, text_width=64, text_layers=1, text_heads=2,
                          context_length=64, embed_dim=64),
}
#: Default peak learning rate per scratch preset (``lr=None``); 5e-4 for other scratch
#: models, 1e-5 for fine-tuning.
PRESET_LR: dict[str, float] = {"scratch-tiny": 2e-3, "scratch-micro": 2e-3}

#: Default ``token_max_weight`` of scratch models (see :func:`train_clip`). With M2IB on
#: blocks 1 and 2 it raised the phantom benchmark's mean test DSC over CLIP seeds 0-3 from
#: 0.43 to 0.62 (``benchmarks/results/localization.md``).
SCRATCH_TOKEN_MAX_WEIGHT = 1.0

#: Optional architecture keys every preset accepts (their open_clip defaults).
ARCH_DEFAULTS: dict[str, Any] = {"pool_type": "tok", "pos_embed_type": "learnable"}


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


# --------------------------------------------------------------------------- configs

def scratch_config(preset: str = "scratch-tiny", **overrides: Any) -> dict:
    """open_clip ``model_cfg`` of a scratch preset; keys of :data:`PRESETS` override it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown scratch preset {preset!r}; choose from {', '.join(PRESETS)}")
    a = {**ARCH_DEFAULTS, **PRESETS[preset]}
    unknown = set(overrides) - set(a)
    if unknown:
        raise ValueError(f"unknown architecture option(s) {', '.join(sorted(unknown))}; "
                         f"valid: {', '.join(a)}")
    a.update({k: v for k, v in overrides.items() if v is not None})
    if a["input_size"] % a["patch_size"]:
        raise ValueError(f"input size {a['input_size']} is not a multiple of the patch size "
                         f"{a['patch_size']}")
    if a["width"] % a["head_width"] or a["text_width"] % a["text_heads"]:
        raise ValueError("width must be a multiple of head_width and text_width of text_heads")
    return {
        "embed_dim": int(a["embed_dim"]),
        "vision_cfg": {"image_size": int(a["input_size"]), "patch_size": int(a["patch_size"]),
                       "layers": int(a["layers"]), "width": int(a["width"]),
                       "head_width": int(a["head_width"]), "mlp_ratio": float(a["mlp_ratio"]),
                       **({"pool_type": str(a["pool_type"])} if a.get("pool_type", "tok") != "tok"
                          else {}),
                       **({"pos_embed_type": str(a["pos_embed_type"])}
                          if a.get("pos_embed_type", "learnable") != "learnable" else {})},
        "text_cfg": {"context_length": int(a["context_length"]), "vocab_size": 49408,
                     "width": int(a["text_width"]), "heads": int(a["text_heads"]),
                     "layers": int(a["text_layers"])},
    }


def scratch_preprocess(input_size: int) -> dict:
    return {"size": [int(input_size), int(input_size)], "mode": "RGB",
            "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bilinear",
            "resize_mode": "longest", "fill_color": 0}


def _image_size(model_cfg: dict) -> int:
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def build_model(model: str = "scratch-tiny", *, input_size: int | None = None,
                arch: dict | None = None, pretrained: str | None = None, seed: int = 0):
    """Return ``(model, tokenizer, model_cfg, preprocess_cfg, kind)``.

    ``model``: a scratch preset, a local open_clip folder (or ``local-dir:DIR``),
    ``hf-hub:org/repo`` or a built-in open_clip name (with ``pretrained`` = a tag or a
    checkpoint file; ``None`` = random init). ``kind`` is ``"scratch"`` or ``"pretrained"``.
    """
    import open_clip

    from ..utils import seed_everything

    if model in PRESETS:
        cfg = scratch_config(model, **{**(arch or {}), "input_size": input_size})
        seed_everything(seed)
        net = open_clip.model.CLIP(**copy.deepcopy(cfg))
        tok = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
        return net, tok, cfg, scratch_preprocess(_image_size(cfg)), "scratch"
    if arch:
        raise ValueError("arch options only apply to scratch presets "
                         f"({', '.join(PRESETS)}), not to {model!r}")
    name = model
    if not name.startswith(("hf-hub:", "local-dir:")) and Path(name).is_dir():
        name = "local-dir:" + str(Path(name).resolve())
    cfg, pre = _source_config(name)
    if input_size is not None and int(input_size) != _image_size(cfg):
        raise ValueError(f"{model} takes {_image_size(cfg)} px input; input_size={input_size} "
                         "only applies to scratch models.")
    has_schema = name.startswith(("hf-hub:", "local-dir:"))
    if has_schema and pretrained:
        raise ValueError(f"pretrained={pretrained!r} only applies to built-in open_clip names; "
                         f"{model} brings its own weights")
    seed_everything(seed)
    try:
        net = open_clip.create_model(name, pretrained=None if has_schema else pretrained,
                                     pretrained_text=False, load_weights=True)
        tok = open_clip.get_tokenizer(name)
    except Exception as err:
        raise ModelLoadError(_load_hint(model, err, pretrained)) from err
    return net, tok, cfg, pre, "pretrained"


def _source_config(name: str) -> tuple[dict, dict]:
    """model_cfg and preprocess_cfg of a non-scratch model, without building it."""
    import open_clip
    from open_clip.factory import _get_hf_config, get_model_config

    preprocess = {"size": None, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}
    try:
        if name.startswith("local-dir:"):
            path = Path(name[len("local-dir:"):]) / CONFIG_NAME
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found")
            conf = json.loads(path.read_text(encoding="utf-8"))
        elif name.startswith("hf-hub:"):
            conf = _get_hf_config(name[len("hf-hub:"):])
        else:
            cfg = get_model_config(name)
            if cfg is None:
                raise KeyError(f"unknown model {name!r}; open_clip knows "
                               f"{', '.join(open_clip.list_models()[:8])}, ... and MWM's "
                               f"scratch presets are {', '.join(PRESETS)}")
            conf = {"model_cfg": cfg, "preprocess_cfg": {}}
    except Exception as err:
        raise ModelLoadError(_load_hint(name, err)) from err
    cfg = conf["model_cfg"]
    preprocess.update(conf.get("preprocess_cfg") or {})
    if not preprocess.get("size"):
        size = _image_size(cfg)
        preprocess["size"] = [size, size]
    return cfg, preprocess


def _load_hint(model: str, err: Exception, pretrained: str | None = None) -> str:
    from ..localize.hub import hub_offline

    offline = hub_offline()
    msg = f"cannot load model {model!r} ({type(err).__name__}: {err})."
    repo = None
    if model.startswith("hf-hub:"):
        repo = model[len("hf-hub:"):]
    elif pretrained:
        try:
            import open_clip

            repo = (open_clip.get_pretrained_cfg(model, pretrained) or {}).get("hf_hub")
        except Exception:  # pragma: no cover - best effort for the hint only
            repo = None
    if repo or offline or "Hub" in str(err):
        where = (f"run `huggingface-cli download {repo.strip('/')}`" if repo else
                 "download the weights once")
        msg += (" Its config/weights are not in the local Hugging Face cache"
                + (" and HF_HUB_OFFLINE is set" if offline else "")
                + f". Provide the weights in one of these ways: (1) on a machine with network, "
                f"{where} (fills ~/.cache/huggingface; copy that folder over, or set HF_HOME "
                "to it); (2) pass a local open_clip folder with "
                f"{CONFIG_NAME} and {WEIGHTS_NAME} as --model DIR; (3) train a small model "
                "from scratch with --model scratch-tiny.")
    return msg


# --------------------------------------------------------------------------- saving/loading

def save_model_folder(out_dir: str | os.PathLike, model, model_cfg: dict, preprocess_cfg: dict,
                      tokenizer=None, extra: dict | None = None) -> None:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    hf_tok = getattr(tokenizer, "tokenizer", None)
    if model_cfg.get("text_cfg", {}).get("hf_tokenizer_name") and hf_tok is not None:
        hf_tok.save_pretrained(str(out))
    conf = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    if extra:
        conf["mwm"] = extra
    write_json(out / CONFIG_NAME, conf)


def load_clip(folder: str | os.PathLike, device: str = "cpu"):
    """Load a trained folder with open_clip: ``(model in eval mode, tokenizer, preprocess_cfg)``."""
    import open_clip

    folder = Path(folder).resolve()
    if not (folder / CONFIG_NAME).is_file():
        raise ModelLoadError(f"{folder}: no {CONFIG_NAME}; not an open_clip model folder "
                             "(train one with `mwm clip train PAIRS --out DIR`).")
    name = "local-dir:" + str(folder)
    model = open_clip.create_model(name, device=device, pretrained_text=False)
    model.eval()
    conf = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    return model, open_clip.get_tokenizer(name), conf.get("preprocess_cfg", {})


# --------------------------------------------------------------------------- training

def _resolve_amp(amp: str, device) -> str:
    """The project's one ``--amp`` rule (:func:`mwm.utils.resolve_amp`) as a mode name."""
    import torch

    from ..utils import resolve_amp

    dtype = resolve_amp(amp, device)
    return {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (p.ndim < 2 or "bias" in name or "ln" in name or "bn" in name
                or "logit_scale" in name or "embedding" in name)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def encode_image_and_token_max(net, pixels):
    """``(embedding, token_max)``: the model's normalized image embedding, and the
    normalized per-channel maximum over its patch tokens after the head's LayerNorm and
    projection (B, D each).

    The pooled embedding of a mean-pooled ViT can be moved by a 4-token lesion only if
    many tokens copy its evidence; the maximum is moved by one token alone. Only the
    training loss sees ``token_max``: the saved model is unchanged.
    """
    import torch.nn.functional as F
    from open_clip.transformer import VisionTransformer

    v = net.visual
    if not isinstance(v, VisionTransformer) or v.attn_pool is not None or v.final_ln_after_pool:
        raise ValueError("token_max_weight needs an open_clip VisionTransformer with mean or "
                         "class-token pooling (the scratch presets), not "
                         f"{type(v).__name__}; set it to 0 for this model.")
    v.output_tokens = True
    try:
        pooled, tokens = v(pixels)                          # (B, D), (B, N, C) after ln_post
    finally:
        v.output_tokens = False
    token_emb = tokens @ v.proj                             # (B, N, D)
    return F.normalize(pooled, dim=-1), F.normalize(token_emb.amax(dim=1), dim=-1)


def _data_digest(pairs: list[CaptionPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(f"{p.image}\t{p.caption}\t{p.label}\t{p.prompt}\n".encode("utf-8"))
    return h.hexdigest()[:16]


def train_clip(pairs: str | os.PathLike, out_dir: str | os.PathLike, *,
               model: str = "scratch-tiny", loss: str = "infonce", epochs: int = 10,
               batch_size: int = 64, lr: float | None = None, weight_decay: float = 0.1,
               warmup: float = 0.05, input_size: int | None = None, arch: dict | None = None,
               pretrained: str | None = None, seed: int = 0, device: str = "auto",
               workers: int | None = None, amp: str = "auto", progress: bool = True,
               tau: float | None = None, beta1: float = 0.15, beta2: float = 0.15,
               hflip: float = 0.5, min_scale: float = 0.8, jitter: float = 0.1,
               prompt_mix: float = 0.0, grad_clip: float | None = 1.0,
               negatives: str = "normal", token_max_weight: float | None = None,
               split: str = "train", resume: bool = True,
               time_limit: float | None = None, threads: int | None = None
               ) -> ClipTrainSummary:
    """Train (or fine-tune) a CLIP model on image/caption pairs; see the module docstring.

    * ``pairs``: CSV (image,caption[,split]) or folder with ``captions.csv`` (+ ``labels.csv``:
      only its ``split`` rows are used).
    * ``model``: ``scratch-tiny`` / ``scratch-small`` / ``scratch-micro``, an open_clip name,
      ``hf-hub:org/repo`` or a local open_clip folder. ``arch`` overrides scratch preset
      keys (``patch_size``, ``width``, ``layers``, ``text_width`` ...); ``input_size`` sets
      the scratch input side.
    * ``loss``: ``infonce`` (learnable logit scale) or ``dhn-nce`` (``tau=None``: the
      model's learnable temperature; ``beta1``/``beta2`` hardness of image→text and
      text→image negatives). Identical captions in a batch are never negatives.
    * ``negatives``: which other pairs are not negatives either: ``"normal"`` (default)
      two lesion-free pairs (a no-finding ``label`` such as ``none`` in ``labels.csv`` or
      a ``label`` column), however their captions are worded — the image cannot tell
      which of the "normal" sentences it was given; ``"label"`` any two pairs with the
      same label (class-level targets); ``"caption"`` identical captions only.
    * ``lr``: peak learning rate (default :data:`PRESET_LR` for ``scratch-tiny``/``-micro``
      (2e-3), 5e-4 for other scratch models, 1e-5 for fine-tuning);
      AdamW, linear warm-up over ``warmup`` of the steps, cosine decay to 0.
    * ``amp``: ``auto`` (bf16 on CPU, bf16/fp16 on CUDA), ``bf16``, ``fp16``, ``none``.
    * ``token_max_weight``: weight of a second contrastive loss on another image
      embedding, the per-channel maximum over the projected patch tokens
      (:func:`encode_image_and_token_max`). Single tokens must then carry the caption's
      evidence, so a small lesion's evidence stays on its own tokens, where M2IB at the
      last block finds it. ``None``: :data:`SCRATCH_TOKEN_MAX_WEIGHT` for scratch models, 0
      (off) when fine-tuning. Needs an open_clip ``VisionTransformer`` (the scratch
      presets), not a timm trunk such as BiomedCLIP's.
    * ``prompt_mix``: probability that a pair whose manifest row has a ``prompt`` and a
      finding label (not ``none``/``normal``) is shown with its prompt as the caption, so
      that short localization prompts ("brain tumor") are in the text vocabulary.
    * ``resume``: continue from ``out_dir/checkpoint.pt`` when its settings match (a
      larger ``epochs`` than before extends the run; the cosine schedule then stretches to
      the new total, so only an unchanged ``epochs`` reproduces an uninterrupted run).
    * ``threads``: torch CPU threads for this process (``None`` = leave torch's setting);
      on a machine shared with other jobs, 1 thread can be several times faster than
      oversubscribed cores.
    * ``time_limit``: seconds; stop after the epoch during which it is reached (the
      checkpoint lets a later call finish the run). ``None`` = no limit.
    """
    import numpy as np
    import torch

    from ..progress import progress as bar
    from ..utils import resolve_device

    t_start = time.perf_counter()
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
    if epochs < 1 or batch_size < 2:
        raise ValueError("epochs must be >= 1 and batch_size >= 2 (contrastive losses need "
                         "negatives)")
    for name, value in (("prompt_mix", prompt_mix), ("hflip", hflip)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if token_max_weight is not None and not (math.isfinite(token_max_weight)
                                             and token_max_weight >= 0):
        raise ValueError(f"token_max_weight must be a finite number >= 0, got {token_max_weight}")
    out = Path(out_dir)
    dev = resolve_device(device)
    amp_mode = _resolve_amp(amp, dev)
    if dev.type == "cpu":
        torch.set_flush_denormal(True)
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    workers = max(1, int(workers or os.cpu_count() or 1))

    data = read_pairs(pairs, split=split)
    net, tokenizer, model_cfg, pre_cfg, kind = build_model(
        model, input_size=input_size, arch=arch, pretrained=pretrained, seed=seed)
    size = _image_size(model_cfg)
    default_lr = PRESET_LR.get(model, 5e-4) if kind == "scratch" else 1e-5
    if token_max_weight is None:
        token_max_weight = SCRATCH_TOKEN_MAX_WEIGHT if kind == "scratch" else 0.0
    token_max_setting = {"token_max_weight": float(token_max_weight)} if token_max_weight else {}
    peak_lr = float(lr if lr is not None else default_lr)
    settings = {
        "model": model, "model_cfg": model_cfg, "pretrained": pretrained, "loss": loss,
        "batch_size": int(batch_size), "lr": peak_lr, "weight_decay": float(weight_decay),
        "warmup": float(warmup), "seed": int(seed), "tau": tau, "beta1": float(beta1),
        "beta2": float(beta2), "hflip": float(hflip), "min_scale": float(min_scale),
        "jitter": float(jitter), "prompt_mix": float(prompt_mix), "grad_clip": grad_clip,
        "negatives": negatives,
        # only when used, so that fine-tuning checkpoints written before it existed resume
        **token_max_setting,
        "split": split, "n_pairs": len(data), "data_digest": _data_digest(data), "amp": amp_mode,
    }

    net.to(dev)
    optimizer = torch.optim.AdamW(_param_groups(net, weight_decay), lr=peak_lr,
                                  betas=(0.9, 0.98), eps=1e-6)
    n = len(data)
    steps_per_epoch = n // batch_size if n >= batch_size else 1
    bsz = min(batch_size, n)
    if bsz < 2:
        raise DataError(f"{pairs}: only {n} training pair(s); contrastive training needs at "
                        "least 2.")
    total_steps = epochs * steps_per_epoch
    warmup_steps = int(round(warmup * total_steps))

    start_epoch, log = 0, []
    ckpt_path = out / CHECKPOINT_NAME
    if resume and ckpt_path.is_file():
        start_epoch, log = _restore(ckpt_path, net, optimizer, settings)
    if start_epoch >= epochs:
        return ClipTrainSummary(out, model, loss, n, epochs, start_epoch, 0,
                                log[-1]["loss"] if log else None, 0.0, 0.0, size,
                                _count(net), amp_mode, str(dev), log)

    images = load_images([p.image for p in data], size, workers, progress=progress)
    mean = torch.tensor(pre_cfg.get("mean", OPENAI_MEAN), dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pre_cfg.get("std", OPENAI_STD), dtype=torch.float32).view(1, -1, 1, 1)
    autocast = dict(device_type=dev.type, enabled=amp_mode != "none",
                    dtype=torch.float16 if amp_mode == "fp16" else torch.bfloat16)
    scaler = torch.amp.GradScaler("cuda") if amp_mode == "fp16" else None
    extra = {"trained_by": "mwm clip train", "loss": loss, "epochs_done": 0,
             "input": "to_model_input -> zero-pad to centred square -> resize (bilinear) -> "
                      "normalize(mean, std)",
             "pad_to_square": True, "n_pairs": n, **token_max_setting}

    step, seen, t_train, stopped = start_epoch * steps_per_epoch, 0, time.perf_counter(), False
    net.train()
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(int(seed) * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
        losses = []
        batches = range(steps_per_epoch)
        for b in bar(batches, total=steps_per_epoch, desc=f"clip epoch {epoch + 1}/{epochs}",
                     unit="batch", enabled=progress):
            idx = order[b * bsz:(b + 1) * bsz]
            x = images[idx].float()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            mix = torch.rand(len(idx), generator=gen).tolist()
            caps = []
            for i, r in zip(idx.tolist(), mix):
                p = data[i]
                use_prompt = prompt_mix > 0 and r < prompt_mix and p.prompt and is_finding(p.label)
                caps.append(p.prompt if use_prompt else p.caption)
            x, caps = augment_batch(x, caps, gen, min_scale=min_scale, hflip=hflip, jitter=jitter)
            x = ((x - mean) / std).to(dev)
            tokens = tokenizer(caps).to(dev)
            same = same_caption_matrix(caps, dev)
            if negatives != "caption":
                same = same | _same_group(data, idx.tolist(), negatives, dev)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, peak_lr, warmup_steps)
            with torch.autocast(**autocast):
                if token_max_weight:
                    img, img_max = encode_image_and_token_max(net, x)
                else:
                    img = net.encode_image(x, normalize=True)
                txt = net.encode_text(tokens, normalize=True)
            value = contrastive_loss(loss, img.float(), txt.float(), net.logit_scale, same,
                                     tau=tau, beta1=beta1, beta2=beta2)
            if token_max_weight:
                value = value + token_max_weight * contrastive_loss(
                    loss, img_max.float(), txt.float(), net.logit_scale, same, tau=tau,
                    beta1=beta1, beta2=beta2)
            if not torch.isfinite(value):
                raise FloatingPointError(f"loss became {value.item()} at epoch {epoch + 1}, "
                                         f"step {step}; lower the learning rate ({peak_lr}).")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(value).backward()
                scaler.unscale_(optimizer)
            else:
                value.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            with torch.no_grad():
                net.logit_scale.clamp_(0, math.log(100))
            losses.append(float(value.detach()))
            step += 1
            seen += len(idx)
        seconds = time.perf_counter() - t0
        log.append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 6),
                    "lr": float(f"{optimizer.param_groups[0]['lr']:.6g}"),
                    "seconds": round(seconds, 3),
                    "images_per_second": round(steps_per_epoch * bsz / max(seconds, 1e-9), 2)})
        extra["epochs_done"] = epoch + 1
        _save_all(out, net, optimizer, settings, model_cfg, pre_cfg, tokenizer, extra, log,
                  epoch + 1, step)
        if time_limit is not None and time.perf_counter() - t_start >= time_limit \
                and epoch + 1 < epochs:
            stopped = True
            break
    net.eval()
    train_seconds = time.perf_counter() - t_train
    return ClipTrainSummary(out, model, loss, n, epochs, start_epoch, step - start_epoch *
                            steps_per_epoch, log[-1]["loss"], time.perf_counter() - t_start,
                            seen / max(train_seconds, 1e-9), size, _count(net), amp_mode,
                            str(dev), log, stopped)


def _same_group(data: list[CaptionPair], idx: list[int], negatives: str, device):
    """``[i, j]`` = pairs ``i`` and ``j`` of the batch must not be each other's negatives.

    ``"normal"``: both are lesion-free (a no-finding label such as ``none``), however
    their captions are worded; ``"label"``: both carry the same label. Pairs without a
    label are never grouped.
    """
    import torch

    keys = []
    for i in idx:
        label = data[i].label
        if label is None or (negatives == "normal" and is_finding(label)):
            keys.append(None)
        else:
            keys.append("" if not is_finding(label) else label.strip().lower())
    index: dict[str, int] = {}
    ids = torch.tensor([-1 - n if k is None else index.setdefault(k, len(index))
                        for n, k in enumerate(keys)], device=device)
    return ids[:, None] == ids[None, :]


def _count(net) -> int:
    return int(sum(p.numel() for p in net.parameters()))


def _save_all(out: Path, net, optimizer, settings: dict, model_cfg: dict, pre_cfg: dict,
              tokenizer, extra: dict, log: list[dict], epoch: int, step: int) -> None:
    import torch

    save_model_folder(out, net, model_cfg, pre_cfg, tokenizer, extra)
    write_csv(out / LOG_NAME, log, LOG_FIELDS)
    state = {"format": "mwm-clip-checkpoint", "version": 1, "epoch": epoch, "step": step,
             "settings_json": json.dumps(settings, sort_keys=True, default=str),
             "log_json": json.dumps(log),
             "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
             "optimizer": optimizer.state_dict()}
    with atomic_path(out / CHECKPOINT_NAME) as tmp:
        torch.save(state, tmp)


def _restore(path: Path, net, optimizer, settings: dict) -> tuple[int, list[dict]]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"{path}: cannot read the checkpoint ({err}). Delete it to start over "
                        "or pass resume=False / a new --out.") from err
    if not isinstance(state, dict) or state.get("format") != "mwm-clip-checkpoint":
        raise DataError(f"{path}: not an MWM CLIP checkpoint.")
    old = json.loads(state["settings_json"])
    new = json.loads(json.dumps(settings, sort_keys=True, default=str))
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in diffs[:4])
        raise DataError(f"{path}: this folder holds a run with other settings ({detail}). "
                        "Use a new output folder, or pass resume=False (--no-resume) to "
                        "start over in this one.")
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), json.loads(state["log_json"])
