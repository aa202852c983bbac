"""CLIP models for ``mwm clip train``: scratch presets, loading, the saved folder format.

* :data:`PRESETS` and :func:`scratch_config` — small open_clip ViTs built from scratch;
* :func:`build_model` — a scratch preset, a local open_clip folder, ``hf-hub:org/repo`` or a
  built-in open_clip name, with a clear error when its weights are not available;
* :func:`save_model_folder` / :func:`load_clip` — open_clip's own folder format
  (``open_clip_config.json`` + ``open_clip_model.safetensors``), which
  ``open_clip.create_model("local-dir:DIR")`` and MWM's ``--model DIR`` load offline, and
  the M2IB settings recommended for it (:func:`recommended_m2ib`,
  ``m2ib_recommended.json``);
* :func:`encode_image_and_token_max` — the second image embedding of the token-max loss.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..files import atomic_path, write_json

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"

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

    from ..localize.hub import hub_guard
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
    with hub_guard():  # an unreachable hub: the cache only, and a missing model at once
        return _build_pretrained(model, name, input_size, pretrained, seed)


def _build_pretrained(model: str, name: str, input_size: int | None, pretrained: str | None,
                      seed: int):
    import open_clip

    from ..utils import seed_everything

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
    from ..localize.hub import offline_reason

    offline = offline_reason()
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
                + (f" and the hub cannot be used ({offline})" if offline else "")
                + f". Provide the weights in one of these ways: (1) on a machine with network, "
                f"{where} (fills ~/.cache/huggingface; copy that folder over, or set HF_HOME "
                "to it); (2) pass a local open_clip folder with "
                f"{CONFIG_NAME} and {WEIGHTS_NAME} as --model DIR; (3) train a small model "
                "from scratch with --model scratch-tiny.")
    return msg


# --------------------------------------------------------------------------- saving/loading

def recommended_m2ib(model_cfg: dict, token_max_weight: float) -> dict:
    """The M2IB settings to localize with a scratch model trained by ``mwm clip train``.

    Measured with ``scratch-tiny`` on brain-MRI phantoms (``docs/m2ib.md``,
    ``benchmarks/results/localization.md``): the last block's output (with the token-max
    loss: the last two blocks, maps averaged) and half the noise scale; beta changed
    little between 1 and 10. The demo and the phantom experiment use the same layer and
    noise scale.
    """
    depth = int(model_cfg["vision_cfg"]["layers"])
    layer: int | list[int] = depth - 1
    if token_max_weight and depth >= 2:
        layer = [depth - 2, depth - 1]
    return {"layer": layer, "beta": 1.0, "noise_scale": 0.5,
            "note": "written by `mwm clip train` for its scratch model; `mwm localize` uses "
                    "these for the M2IB settings it is not given (docs/clip-training.md)"}


def save_model_folder(out_dir: str | os.PathLike, model, model_cfg: dict, preprocess_cfg: dict,
                      tokenizer=None, extra: dict | None = None,
                      m2ib: dict | None = None) -> None:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` atomically, and
    ``m2ib_recommended.json`` with ``m2ib`` (a stale one is removed without it)."""
    from safetensors.torch import save_file

    from ..localize.hub import RECOMMENDED_M2IB

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
    if m2ib:
        write_json(out / RECOMMENDED_M2IB, m2ib)
    elif (out / RECOMMENDED_M2IB).is_file():  # an earlier run's advice for another model
        (out / RECOMMENDED_M2IB).unlink()


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


def encode_image_and_token_max(net, pixels):
    """See :func:`encode_image_tokens`: ``(embedding, token_max)``."""
    pooled, _, token_max = encode_image_tokens(net, pixels)
    return pooled, token_max


def encode_image_tokens(net, pixels):
    """``(embedding, tokens, token_max)``: the model's normalized image embedding (B, D),
    its patch tokens after the head's LayerNorm and projection, normalized (B, N, D), and
    the normalized per-channel maximum over those tokens before normalization (B, D).

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
    return (F.normalize(pooled, dim=-1), F.normalize(token_emb, dim=-1),
            F.normalize(token_emb.amax(dim=1), dim=-1))
