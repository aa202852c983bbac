"""Small CLIP-style models built offline (random weights) for tests and benchmarks.

* :func:`build_tiny_open_clip` — open_clip model with a timm ViT trunk (BiomedCLIP
  layout) or open_clip's native ViT, and the built-in text transformer (bundled BPE
  tokenizer) or a tiny HF BERT text tower (BiomedCLIP layout), as a ``VLMAdapter``.
* :func:`write_open_clip_dir` — the same written as an open_clip folder
  (``open_clip_config.json`` + ``open_clip_model.safetensors``) for ``load_vlm``.
* :func:`build_tiny_hf_clip` / :func:`write_hf_clip_dir` — transformers ``CLIPModel``.
* :func:`build_biomedclip_random` — the full BiomedCLIP architecture (ViT-B/16 trunk +
  PubMedBERT-size text tower, 196 M parameters, ~10 s to build): benchmarks only.

Everything works with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BERT_WORDS = ("brain tumor lesion liver kidney lung nodule polyp breast mass skin cell nucleus "
              "heart a an the of in with left right small large benign malignant image scan ct "
              "mri x ray ultrasound photo").split()


def write_bert_dir(path: str | Path, *, hidden: int = 32, layers: int = 2, heads: int = 2,
                   vocab_size: int | None = None, max_positions: int = 64,
                   context_length: int = 32) -> Path:
    """A local BERT config + WordPiece vocabulary (no weights) usable by AutoConfig/AutoTokenizer."""
    from transformers import BertConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789")
    words += [w for w in BERT_WORDS if w not in words]
    words += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    (path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
         "model_max_length": context_length}), encoding="utf-8")
    BertConfig(vocab_size=vocab_size or len(words), hidden_size=hidden, num_hidden_layers=layers,
               num_attention_heads=heads, intermediate_size=4 * hidden,
               max_position_embeddings=max_positions, pad_token_id=0).save_pretrained(path)
    return path


def _vision_cfg(trunk: str, image_size: int, patch_size: int, width: int, depth: int) -> dict:
    if trunk == "native":
        return {"image_size": image_size, "patch_size": patch_size, "width": width,
                "layers": depth, "head_width": max(16, width // 2), "mlp_ratio": 2.0}
    if trunk == "timm":
        return {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                "timm_pool": "", "timm_proj": "linear", "image_size": image_size}
    raise ValueError(trunk)


def tiny_open_clip_config(*, trunk: str = "native", text: str = "builtin", image_size: int = 64,
                          patch_size: int = 16, width: int = 64, depth: int = 4, embed_dim: int = 32,
                          bert_dir: str | Path | None = None, context_length: int = 32) -> dict:
    """An ``open_clip_config.json`` dict (``model_cfg`` + ``preprocess_cfg``)."""
    if text == "builtin":
        text_cfg = {"context_length": context_length, "vocab_size": 49408, "width": 32,
                    "heads": 2, "layers": 2}
    elif text == "bert":
        if bert_dir is None:
            raise ValueError("text='bert' needs bert_dir (see write_bert_dir)")
        text_cfg = {"hf_model_name": str(bert_dir), "hf_tokenizer_name": str(bert_dir),
                    "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                    "hf_model_pretrained": False, "context_length": context_length}
    else:
        raise ValueError(text)
    return {"model_cfg": {"embed_dim": embed_dim,
                          "vision_cfg": _vision_cfg(trunk, image_size, patch_size, width, depth),
                          "text_cfg": text_cfg},
            "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                               "std": [0.26862954, 0.26130258, 0.27577711]}}


def build_tiny_open_clip_model(*, trunk: str = "timm", text: str = "builtin", image_size: int = 64,
                               patch_size: int = 16, width: int = 64, depth: int = 4,
                               heads: int = 2, embed_dim: int = 32, context_length: int = 32,
                               seed: int = 0, workdir: str | Path | None = None):
    """(model, tokenizer, preprocess_cfg) of a tiny random-weight open_clip model.

    ``trunk="timm"``: a timm ``VisionTransformer`` (vit_tiny-like, ``depth`` blocks of
    ``width`` channels at ``image_size``) under open_clip's ``TimmModel`` head — the
    BiomedCLIP image tower layout. ``trunk="native"``: open_clip's ``VisionTransformer``.
    ``text="bert"`` needs a folder for the BERT config (``workdir``, default a temp dir).
    """
    import open_clip
    import timm
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    torch.manual_seed(seed)
    bert_dir = None
    if text == "bert":
        bert_dir = write_bert_dir(Path(workdir or tempfile.mkdtemp(prefix="mwm-bert-")) / "bert",
                                  context_length=context_length)
    cfg = tiny_open_clip_config(trunk=trunk, text=text, image_size=image_size, patch_size=patch_size,
                                width=width, depth=depth, embed_dim=embed_dim, bert_dir=bert_dir,
                                context_length=context_length)
    model_cfg = cfg["model_cfg"]
    if trunk == "timm":
        # build the named vit_tiny tower, then swap in a small trunk of the same class
        model_cfg["vision_cfg"]["image_size"] = image_size
    cls = open_clip.CustomTextCLIP if text == "bert" else open_clip.CLIP
    model = cls(**model_cfg)
    if trunk == "timm":
        model.visual.trunk = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=image_size, patch_size=patch_size,
            embed_dim=width, depth=depth, num_heads=heads, num_classes=0)
        model.visual.head.proj = torch.nn.Linear(width, embed_dim, bias=False)
    model.eval()
    if text == "bert":
        tokenizer = HFTokenizer(str(bert_dir), context_length=context_length)
    else:
        tokenizer = SimpleTokenizer(context_length=context_length)
    preprocess = dict(cfg["preprocess_cfg"], size=image_size)
    return model, tokenizer, preprocess


def bright_square_images(seed: int = 0) -> list:
    """Three (3, H, W) images of uneven sizes in [0, 1], each with a bright "lesion" on a
    dim noisy background (the M2IB tests' inputs)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for h, w in [(50, 80), (72, 40), (64, 64)]:
        img = rng.random((3, h, w)).astype(np.float32) * 0.3
        img[:, h // 4: h // 2, w // 3: 2 * w // 3] += 0.6
        out.append(np.clip(img, 0, 1))
    return out


def build_tiny_open_clip(**kwargs):
    """A ``VLMAdapter`` over :func:`build_tiny_open_clip_model` (same keyword arguments)."""
    from mwm.localize.vlm import wrap_open_clip

    model, tokenizer, preprocess = build_tiny_open_clip_model(**kwargs)
    return wrap_open_clip(model, tokenizer, preprocess, name="tiny-open-clip")


def write_open_clip_dir(path: str | Path, *, trunk: str = "native", text: str = "builtin",
                        image_size: int = 64, depth: int = 4, width: int = 64, embed_dim: int = 32,
                        seed: int = 0, weights: bool = True) -> Path:
    """An open_clip model folder loadable with ``load_vlm("local-dir:PATH")``.

    ``trunk="timm"`` uses ``vit_tiny_patch16_224`` at 224 px (a config file can only name
    timm models); ``text="bert"`` writes the BERT config and vocabulary into the same
    folder (as a copied BiomedCLIP folder would hold them).
    """
    import open_clip
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if trunk == "timm":
        image_size = 224
    bert_dir = write_bert_dir(path) if text == "bert" else None
    cfg = tiny_open_clip_config(trunk=trunk, text=text, image_size=image_size, width=width,
                                depth=depth, embed_dim=embed_dim, bert_dir=bert_dir)
    if text == "bert":  # as on the hub: the text tower named by a hub id, not a path
        cfg["model_cfg"]["text_cfg"]["hf_model_name"] = "not-on-this-machine/bert"
        cfg["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "not-on-this-machine/bert"
    (path / "open_clip_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    if weights:
        torch.manual_seed(seed)
        build_cfg = json.loads(json.dumps(cfg["model_cfg"]))
        if text == "bert":
            build_cfg["text_cfg"]["hf_model_name"] = str(bert_dir)
        cls = open_clip.CustomTextCLIP if text == "bert" else open_clip.CLIP
        model = cls(**build_cfg)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path / "open_clip_model.safetensors"))
    return path


# --------------------------------------------------------------------------- transformers CLIP

def write_clip_tokenizer(path: str | Path):
    """A byte-level CLIP BPE tokenizer with no merges (514 tokens) saved in ``path``."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    tok.save_pretrained(str(path))
    return tok


def tiny_clip_config(*, image_size: int = 32, patch_size: int = 8, hidden: int = 32,
                     layers: int = 4, embed_dim: int = 16):
    from transformers import CLIPConfig

    text = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=512,
                eos_token_id=513, pad_token_id=513)
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden,
                  intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


def build_tiny_hf_clip(*, seed: int = 0, workdir: str | Path | None = None, **kwargs):
    """A ``VLMAdapter`` over a tiny random-weight transformers ``CLIPModel``."""
    from transformers import CLIPModel

    from mwm.localize.vlm import wrap_hf_clip

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(**kwargs)).eval()
    tok = write_clip_tokenizer(Path(workdir or tempfile.mkdtemp(prefix="mwm-cliptok-")) / "tok")
    return wrap_hf_clip(model, tok, name="tiny-hf-clip")


def write_hf_clip_dir(path: str | Path, *, seed: int = 0, **kwargs) -> Path:
    """A transformers CLIP folder (config, weights, tokenizer, preprocessor) for ``load_vlm``."""
    from transformers import CLIPModel

    path = Path(path)
    torch.manual_seed(seed)
    CLIPModel(tiny_clip_config(**kwargs)).save_pretrained(str(path))
    write_clip_tokenizer(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "image_mean": [0.5, 0.5, 0.5],
         "image_std": [0.25, 0.25, 0.25], "size": {"shortest_edge": kwargs.get("image_size", 32)}}),
        encoding="utf-8")
    return path


# --------------------------------------------------------------------------- full BiomedCLIP

def biomedclip_config(bert_dir: str | Path) -> dict:
    """The hub BiomedCLIP ``open_clip_config.json`` with the text tower read from ``bert_dir``."""
    return {"model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": str(bert_dir), "hf_tokenizer_name": str(bert_dir),
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 256}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]}}


def build_biomedclip_random(workdir: str | Path | None = None, seed: int = 0):
    """The full BiomedCLIP architecture with random weights (196 M parameters) as an adapter."""
    import open_clip

    from mwm.localize.vlm import wrap_open_clip

    work = Path(workdir or tempfile.mkdtemp(prefix="mwm-biomedclip-"))
    write_bert_dir(work, hidden=768, layers=12, heads=12, vocab_size=30522, max_positions=512,
                   context_length=256)
    (work / "open_clip_config.json").write_text(json.dumps(biomedclip_config(work)), encoding="utf-8")
    torch.manual_seed(seed)
    model = open_clip.create_model("local-dir:" + str(work), pretrained_text=False)
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(work))
    return wrap_open_clip(model, tokenizer, name="biomedclip-random")
