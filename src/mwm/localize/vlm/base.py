"""The adapter interface: a frozen CLIP-style model seen as embed → blocks → pool.

M2IB saliency (:mod:`mwm.localize.m2ib`) needs to run a vision transformer in pieces:
the tokens entering block 0 (:meth:`VLMAdapter.embed`), any range of blocks
(:meth:`VLMAdapter.run_blocks`) and the head that turns final tokens into the image
embedding (:meth:`VLMAdapter.pool`). Each backend (:data:`VLM_BACKENDS`) subclasses
:class:`VLMAdapter` for its models and says which model names it loads.

``embed → run_blocks(0, depth) → pool`` equals the wrapped model's own image encoder
(tested). The model is frozen: ``eval()`` and ``requires_grad=False`` on every weight.

Geometry (:meth:`VLMAdapter.prepare` / :meth:`VLMAdapter.to_image`): the image is padded
**symmetrically** to a square with 0 (black, in [0, 1] space, before mean/std
normalization; an odd remainder goes to the bottom/right), resized to ``image_size``
(bicubic, antialiased) and normalized with the model's own mean/std. Nothing is cropped,
unlike CLIP's centre crop, so every pixel is seen and maps align exactly with the
original pixels. ``to_image`` upsamples a patch-grid map (bilinear,
``align_corners=False``) directly to the padded square at the original resolution and
crops the padding: one interpolation, no rounding of the pad at model resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import DataError
from ...registry import Registry

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_BATCH = 64


@dataclass(frozen=True)
class Resolved:
    """A model name as a backend reads it: what to load (``ident``) and how (``kind``)."""

    backend: str
    kind: str
    ident: str
    tag: str | None = None


class VLMBackend(Protocol):
    """A family of models MWM can wrap: which names it loads, and how.

    ``resolve(name, forced)`` returns a :class:`Resolved` when the backend loads ``name``
    (``forced``: the user asked for this backend, so it reads ambiguous names its way),
    else None; ``load(resolved, name, trust_remote_code)`` returns the adapter.
    """

    def resolve(self, name: str, forced: bool) -> Resolved | None: ...

    def load(self, resolved: Resolved, name: str, trust_remote_code: bool) -> "VLMAdapter": ...


#: Backends in the order ``backend="auto"`` asks them; filled by the backend modules.
VLM_BACKENDS: Registry[VLMBackend] = Registry("VLM backend")


@dataclass(frozen=True)
class Geometry:
    """How an original (H, W) image was placed in the model's square input.

    The image sits at rows ``pad_top:pad_top+height`` and columns
    ``pad_left:pad_left+width`` of a ``side`` x ``side`` square (``side = max(H, W)``),
    which was resized to ``image_size`` x ``image_size``.
    """

    height: int
    width: int
    side: int
    pad_top: int
    pad_left: int
    image_size: int

    @property
    def scale(self) -> float:
        """Model pixels per original pixel."""
        return self.image_size / self.side



# --------------------------------------------------------------------------- adapter


class VLMAdapter:
    """A frozen CLIP-style model seen as embed → blocks → pool, plus its text encoder.

    Build one with :func:`~mwm.localize.vlm.load_vlm` (a model name or folder) or from an
    already-built model with :func:`~mwm.localize.vlm.wrap_open_clip` /
    :func:`~mwm.localize.vlm.wrap_hf_clip`.
    """

    backend = "base"

    def __init__(self, model: nn.Module, *, name: str, image_size: int, patch_size: int,
                 num_prefix_tokens: int, mean: Sequence[float], std: Sequence[float]):
        if image_size % patch_size:
            raise DataError(f"{name}: image size {image_size} is not a multiple of the patch "
                            f"size {patch_size}; such models are not supported.")
        self.model = model
        self.name = name
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise DataError(f"{name}: mean/std must have 3 values, got {self.mean}, {self.std}")
        self._text_cache: dict[str, Tensor] = {}
        # M2IB settings the model's folder recommends (``m2ib_recommended.json``; set by
        # ``load_vlm``), used for the settings a run leaves out
        self.m2ib_recommendation: dict = {}
        self.m2ib_recommendation_file: str | None = None
        self.freeze()

    # ----- construction from built models

    # ----- common

    def freeze(self) -> None:
        """eval() and no gradients for any weight (M2IB optimizes only its own alphas)."""
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            return p.dtype
        return torch.float32

    @property
    def grid(self) -> tuple[int, int]:
        n = self.image_size // self.patch_size
        return (n, n)

    @property
    def depth(self) -> int:
        return len(self.blocks())

    def to(self, device: str | torch.device) -> "VLMAdapter":
        self.model.to(device)
        self._text_cache = {k: v.to(device) for k, v in self._text_cache.items()}
        return self

    # ----- text

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """(P, D) L2-normalized text embeddings (no caching; see :meth:`embed_prompts`)."""
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise DataError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        out = []
        with torch.no_grad():
            for i in range(0, len(prompts), TEXT_BATCH):
                out.append(self._encode_text(prompts[i:i + TEXT_BATCH]).float())
        return F.normalize(torch.cat(out), dim=-1)

    def embed_prompts(self, prompts: Sequence[str | Sequence[str]]) -> Tensor:
        """(N, D) one L2-normalized embedding per item; each distinct string encoded once.

        An item may be a list of strings (a prompt ensemble): the normalized embeddings
        of its strings are averaged and renormalized. Embeddings are cached on the
        adapter, so repeated calls never re-encode a string.
        """
        items = [[p] if isinstance(p, str) else list(p) for p in prompts]
        for item in items:
            if not item or not all(isinstance(s, str) and s.strip() for s in item):
                raise DataError(f"every prompt must be a non-empty string (or a non-empty list "
                                f"of them), got {item!r}")
        missing = list(dict.fromkeys(s for item in items for s in item if s not in self._text_cache))
        if missing:
            for s, e in zip(missing, self.encode_text(missing)):
                self._text_cache[s] = e
        rows = [torch.stack([self._text_cache[s] for s in item]).mean(0) for item in items]
        return F.normalize(torch.stack(rows), dim=-1)

    # ----- image: pieces (backend specific)

    def embed(self, pixels: Tensor) -> Tensor:
        """Tokens entering block 0: (B, T, C) (patch embed, prefix tokens, positions, pre-norm)."""
        raise NotImplementedError

    def blocks(self) -> Sequence[nn.Module]:
        """The vision transformer blocks, in order."""
        raise NotImplementedError

    def run_blocks(self, tokens: Tensor, start: int, stop: int) -> Tensor:
        """Apply blocks ``start .. stop-1`` to (B, T, C) tokens."""
        blocks = self.blocks()
        if not 0 <= start <= stop <= len(blocks):
            raise DataError(f"block range {start}:{stop} outside 0:{len(blocks)}")
        for block in blocks[start:stop]:
            tokens = self._run_block(block, tokens)
        return tokens

    def _run_block(self, block: nn.Module, tokens: Tensor) -> Tensor:
        return block(tokens)

    def pool(self, tokens: Tensor) -> Tensor:
        """Final tokens → (B, D) L2-normalized image embedding."""
        raise NotImplementedError

    def encode_image(self, pixels: Tensor) -> Tensor:
        """(B, D) L2-normalized image embedding computed piecewise (equals the model's own)."""
        return self.pool(self.run_blocks(self.embed(pixels), 0, self.depth))

    def reference_image_features(self, pixels: Tensor) -> Tensor:
        """The wrapped model's own image encoder, L2-normalized (for checks)."""
        raise NotImplementedError

    def _encode_text(self, prompts: list[str]) -> Tensor:
        raise NotImplementedError

    # ----- geometry

    def prepare(self, image: np.ndarray) -> tuple[Tensor, Geometry]:
        """(3, H, W) float in [0, 1] → normalized (3, S, S) model input and its geometry.

        Gray (H, W) or (1, H, W) images are repeated over 3 channels. Pads
        symmetrically to a square with 0 (odd remainder bottom/right), resizes to
        ``image_size`` (bicubic, antialiased, clamped to [0, 1]) and normalizes with the
        model's mean/std.
        """
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[0] not in (1, 3) or min(arr.shape[1:]) < 1:
            raise DataError(f"image must be (3, H, W) (or gray (H, W)) in [0, 1], got shape "
                            f"{arr.shape}; use mwm.data.io.to_model_input.")
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"image must hold numbers, got dtype {arr.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if not torch.isfinite(x).all():
            raise DataError("image holds NaN or infinite values")
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        h, w = int(x.shape[1]), int(x.shape[2])
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        geometry = Geometry(h, w, side, top, left, self.image_size)
        x = F.pad(x, (left, side - w - left, top, side - h - top), value=0.0)
        if side != self.image_size:
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False, antialias=True)[0].clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return ((x - mean) / std).contiguous(), geometry

    def to_image(self, grid_map: Tensor | np.ndarray, geometry: Geometry) -> np.ndarray:
        """A map over the model's square input → (H, W) float32 aligned with the original.

        ``grid_map`` is (gh, gw) on the patch grid (or any (h, w) map covering the whole
        model input, e.g. ``image_size`` x ``image_size``). It is upsampled bilinearly
        (``align_corners=False``) to the padded square at original resolution and the
        padding is cropped.
        """
        m = torch.as_tensor(np.asarray(grid_map.detach().cpu() if isinstance(grid_map, Tensor)
                                       else grid_map), dtype=torch.float32)
        if m.ndim != 2:
            raise DataError(f"map must be 2-D (gh, gw), got shape {tuple(m.shape)}")
        g = geometry
        if tuple(m.shape) != (g.side, g.side):
            m = F.interpolate(m[None, None], size=(g.side, g.side), mode="bilinear",
                              align_corners=False)[0, 0]
        out = m[g.pad_top:g.pad_top + g.height, g.pad_left:g.pad_left + g.width]
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, image_size={self.image_size}, "
                f"patch_size={self.patch_size}, depth={self.depth}, "
                f"prefix_tokens={self.num_prefix_tokens})")


def square_size(value, what: str, name: str) -> int:
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        raise DataError(f"{name}: non-square {what} {value} is not supported.")
    return int(a)

