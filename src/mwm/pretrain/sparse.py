"""Sparse emulation of CNN layers for masked image modeling (SparK-style).

A masked image is a set of visible grid cells. A *sparse* CNN computes only on the
visible cells; this module emulates that with dense operations and masks:

* Convolutions and max/average pooling run densely, then their output is multiplied by
  the visible mask at the output resolution (the "submanifold" emulation: masked
  positions stay exactly zero, so they contribute nothing to visible neighbours).
* Batch normalization takes its statistics over the **visible positions only** (of the
  whole batch, and of all processes with ``sync=True``), updates the running statistics
  from them, normalizes, and zeros the masked positions again.
* Layer normalization is position-wise (channels-first ``LayerNorm2d`` or channels-last
  ``nn.LayerNorm`` inside ConvNeXt blocks): normalize, then zero masked positions.
* Group normalization takes per-sample, per-group statistics over the visible positions
  only (counting ``visible positions x channels per group`` values), then zeros masked
  positions.
* Linear layers applied to channels-last feature maps ``(B, H, W, C)`` (ConvNeXt's MLP)
  zero masked positions of their output, so a ConvNeXt block's residual branch is zero at
  masked positions before the residual add (the shortcut is zero there already).

The mask lives on one grid (SparK's mask cells); each layer reads it at its own output
resolution (:func:`resample_cells`): repeated where finer, "any sub-cell visible" where
coarser (a mask finer than the deepest stride; see docs/masking.md).

The visible mask is **not** a module-level global: every sparse layer holds a reference
to a :class:`SparseContext`, and the mask is set for one forward pass with
``with context.active(active_b1hw): ...``. Two models with two contexts never see each
other's masks. Outside an ``active`` block (or with ``active(None)``) every sparse layer
behaves exactly like its dense original.

Conversion (:func:`sparsify`) swaps the class of each supported layer for a sparse
subclass of the same class, so parameter and buffer names, shapes and the state-dict
keys stay those of the dense model (a sparse BN saves the keys of ``BatchNorm2d``).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SparseContext", "resample_cells", "sparsify", "densify_module", "is_sparse",
           "SparseBatchNorm2d", "SparseLayerNorm2d", "sparse_class"]


def resample_cells(active_b1hw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The visible cells (B, 1, gh, gw) at another resolution, axis by axis.

    Finer by an integer factor: each cell repeated (exact: every position lies in one
    cell). Coarser by an integer factor (a stage whose stride exceeds the mask cell): a
    position is visible when ANY of its sub-cells is, as a sparse strided convolution's
    output site is active when its window holds an active input. Its features are still
    computed from visible positions only (masked ones are zero below it), so no masked
    pixel reaches it; calling it masked would throw visible pixels away. Other sizes:
    nearest-neighbour resampling (``F.interpolate``) of the whole mask.
    """
    mask = active_b1hw
    for dim, size, cells in ((2, height, active_b1hw.shape[2]), (3, width, active_b1hw.shape[3])):
        if size % cells == 0:
            mask = mask.repeat_interleave(size // cells, dim=dim) if size != cells else mask
        elif cells % size == 0:
            shape = (*mask.shape[:dim], size, cells // size, *mask.shape[dim + 1:])
            mask = mask.reshape(shape).any(dim=dim + 1)
        else:
            return F.interpolate(active_b1hw.to(torch.uint8), size=(height, width), mode="nearest") > 0
    return mask


class SparseContext:
    """The visible mask of the current forward pass, shared by one model's sparse layers.

    ``active_b1hw`` is a bool tensor (B, 1, gh, gw), True = visible cell. Masks at other
    resolutions are derived on demand by :func:`resample_cells` and cached for the pass.
    """

    def __init__(self) -> None:
        self._active: torch.Tensor | None = None
        self._cache: dict = {}

    @property
    def active_b1hw(self) -> torch.Tensor | None:
        return self._active

    @property
    def is_active(self) -> bool:
        return self._active is not None

    @contextlib.contextmanager
    def active(self, active_b1hw: torch.Tensor | None) -> Iterator["SparseContext"]:
        """Make ``active_b1hw`` the visible mask inside the block (nesting restores)."""
        if active_b1hw is not None:
            if active_b1hw.ndim != 4 or active_b1hw.shape[1] != 1:
                raise ValueError("active_b1hw must have shape (B, 1, gh, gw), got "
                                 f"{tuple(active_b1hw.shape)}")
            if active_b1hw.dtype != torch.bool:
                active_b1hw = active_b1hw > 0
        saved = self._active, self._cache
        self._active, self._cache = active_b1hw, {}
        try:
            yield self
        finally:
            self._active, self._cache = saved

    def mask_bool(self, height: int, width: int) -> torch.Tensor | None:
        """Visible positions at a resolution: bool (B, 1, height, width), or None."""
        active = self._active
        if active is None:
            return None
        key = ("bool", height, width)
        mask = self._cache.get(key)
        if mask is None:
            mask = resample_cells(active, height, width)
            self._cache[key] = mask
        return mask

    def mask(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Visible positions as 0/1 in ``dtype``: (B, 1, height, width), or None."""
        if self._active is None:
            return None
        key = ("num", height, width, dtype)
        mask = self._cache.get(key)
        if mask is None:
            mask = self.mask_bool(height, width).to(dtype)
            self._cache[key] = mask
        return mask

    def mask_like(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor | None:
        """The mask broadcastable to ``x``: (B,1,H,W) for NCHW, (B,H,W,1) for NHWC."""
        if self._active is None:
            return None
        if x.ndim != 4:
            return None
        h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
        if x.shape[0] != self._active.shape[0]:
            raise RuntimeError(f"sparse layer got a batch of {x.shape[0]} but the active mask "
                               f"has {self._active.shape[0]} images")
        mask = self.mask(h, w, x.dtype)
        return mask.permute(0, 2, 3, 1) if channels_last else mask

    def visible_index(self, height: int, width: int) -> torch.Tensor:
        """Flat indices of the visible positions in (B, H, W) row-major (NHWC) order."""
        key = ("index", height, width)
        index = self._cache.get(key)
        if index is None:
            index = self.mask_bool(height, width).reshape(-1).nonzero().squeeze(1)
            self._cache[key] = index
        return index

    def count(self, height: int, width: int) -> torch.Tensor:
        """Number of visible positions per image at a resolution, float32 (B,)."""
        key = ("count", height, width)
        n = self._cache.get(key)
        if n is None:
            n = self.mask(height, width, torch.float32).sum(dim=(1, 2, 3))
            self._cache[key] = n
        return n


# --------------------------------------------------------------------------- layers

class _SparseMixin:
    """Common state: the context (a plain attribute, not a submodule)."""

    _sparse_context: SparseContext | None = None

    def _mask_for(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor | None:
        ctx = self._sparse_context
        return None if ctx is None else ctx.mask_like(x, channels_last)


class _MaskInPlace(torch.autograd.Function):
    """``x *= mask`` whose gradient keeps the incoming gradient's memory layout
    (autograd's broadcasting multiply can return NCHW for a channels-last gradient, which
    the next convolution backward then copies back)."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        ctx.mark_dirty(x)
        return x.mul_(mask)

    @staticmethod
    def backward(ctx, grad):
        mask, = ctx.saved_tensors
        return torch.mul(grad, mask, out=torch.empty_like(grad)), None


def _mask_(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the masked positions of ``x`` in place (autograd-aware, layout-preserving)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.mul_(mask)
    return _MaskInPlace.apply(x, mask)


class _MaskOutputCF(_SparseMixin):
    """Dense op, then zero the masked positions of the (N, C, H, W) output."""

    def forward(self, x):  # noqa: D401
        out = super().forward(x)
        mask = self._mask_for(out)
        # In place: keeps the output's memory layout (channels-last stays channels-last)
        # and saves an allocation; none of these ops saves its output for backward.
        return out if mask is None else _mask_(out, mask)


class _MaskOutputCL(_SparseMixin):
    """Dense op, then zero masked positions of a channels-last (N, H, W, C) output.

    Inputs that are not 4-D (token sequences, pooled vectors) pass through unmasked.
    """

    def forward(self, x):  # noqa: D401
        out = super().forward(x)
        mask = self._mask_for(out, channels_last=True) if out.ndim == 4 else None
        return out if mask is None else _mask_(out, mask)


def _apply_post_norm(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The dropout/activation that timm's *Act norm layers apply after normalizing."""
    drop = getattr(module, "drop", None)
    act = getattr(module, "act", None)
    if isinstance(drop, nn.Module):
        y = drop(y)
    if isinstance(act, nn.Module):
        y = act(y)
    return y


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def _sync_world(group) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B·H·W, C) rows in NHWC order (a view for channels-last memory)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class _GatherRows(torch.autograd.Function):
    """Visible positions of a (B, C, H, W) map as (N_visible, C) rows.

    Backward writes the gradient into a zero map with ``index_copy_`` (indices are
    unique), much faster on CPU than autograd's ``index_add``; the gradient map has the
    input's memory layout and is not a view (no copy-back through view backward)."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        ctx.channels_last = x.is_contiguous(memory_format=torch.channels_last) or not x.is_contiguous()
        return _rows_view(x).index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        index, = ctx.saved_tensors
        out = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device,
                          memory_format=torch.channels_last).zero_()
        out.permute(0, 2, 3, 1).view(-1, ctx.shape[1]).index_copy_(0, index, grad.contiguous())
        return (out if ctx.channels_last else out.contiguous()), None


class _ScatterRows(torch.autograd.Function):
    """(N_visible, C) rows placed at their positions of a zero (B, C, H, W) map (in the
    requested memory layout); backward gathers."""

    @staticmethod
    def forward(ctx, rows, index, shape, channels_last):
        ctx.save_for_backward(index)
        out = torch.empty(shape, dtype=rows.dtype, device=rows.device,
                          memory_format=torch.channels_last).zero_()
        out.permute(0, 2, 3, 1).view(-1, shape[1]).index_copy_(0, index, rows.contiguous())
        return out if channels_last else out.contiguous()

    @staticmethod
    def backward(ctx, grad):
        index, = ctx.saved_tensors
        return _rows_view(grad).index_select(0, index), None, None, None


class _SparseBatchNormMixin(_SparseMixin):
    """Batch norm with statistics over the visible positions only.

    Training (or no running stats): per channel, mean and biased variance over the
    visible positions of the batch (and of every process when ``sync`` is set) are used
    to normalize; the running mean and the unbiased running variance are updated from
    the same statistics with the module's momentum (cumulative average when momentum is
    None), exactly as ``BatchNorm2d`` would with only the visible positions as input.
    Eval: the running statistics. Masked positions of the output are zero.
    Without an active mask and without sync this is the dense ``BatchNorm2d``.
    """

    sync: bool = False
    process_group = None

    def forward(self, x):  # noqa: D401
        ctx = self._sparse_context
        active = ctx is not None and ctx.is_active
        need_sync = self.sync and self.training and _sync_world(self.process_group) > 1
        if not active and not need_sync:
            return super().forward(x)
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats:
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             False, 0.0, self.eps)
            y = _apply_post_norm(self, y)
            mask = self._mask_for(y)
            return y if mask is None else y * mask
        channels_last = x.is_contiguous(memory_format=torch.channels_last) or not KEEP_LAYOUT
        if active:
            index = ctx.visible_index(x.shape[2], x.shape[3])
            rows = self._normalize_rows(_GatherRows.apply(x, index), need_sync)
            y = _ScatterRows.apply(rows, index, x.shape, channels_last)
        else:  # synchronized dense BN
            rows = self._normalize_rows(_rows_view(x), need_sync)
            y = rows.view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)
            y = y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if isinstance(getattr(self, "act", None), nn.Module) or isinstance(getattr(self, "drop", None), nn.Module):
            y = _apply_post_norm(self, y)
            mask = self._mask_for(y)
            y = y if mask is None else y * mask
        return y

    def _factor(self) -> float:
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return float(self.momentum)

    def _normalize_rows(self, rows: torch.Tensor, need_sync: bool) -> torch.Tensor:
        """Batch norm of (N, C) rows (BN1d semantics: biased variance to normalize,
        unbiased variance for the running estimate)."""
        track = self.track_running_stats and self.running_mean is not None
        if track:
            self.num_batches_tracked.add_(1)
        if not need_sync:
            return F.batch_norm(rows, self.running_mean if track else None,
                                self.running_var if track else None, self.weight, self.bias,
                                True, self._factor() if track else 0.0, self.eps)
        channels = rows.shape[1]
        rf = rows.float()
        n_local = torch.full((1,), float(rows.shape[0]), device=rows.device)
        stats = torch.cat([rf.sum(0), (rf * rf).sum(0), n_local])
        stats = _all_reduce_sum(stats, self.process_group)
        s1, s2, n = stats[:channels], stats[channels:2 * channels], stats[-1]
        n_safe = n.clamp_min(1.0)
        mean = s1 / n_safe
        var = (s2 / n_safe - mean * mean).clamp_min(0.0)
        if track:
            with torch.no_grad():
                factor = self._factor()
                unbiased = var.detach() * (n / (n - 1).clamp_min(1.0))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.float()
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.float()
        return torch.addcmul(shift, rf, scale).to(rows.dtype)


class _SparseGroupNormMixin(_SparseMixin):
    """Group norm with per-sample, per-group statistics over the visible positions."""

    def forward(self, x):  # noqa: D401
        mask = self._mask_for(x)
        if mask is None:
            return super().forward(x)
        b, c, h, w = x.shape
        g = self.num_groups
        xf = (x.float() * mask.to(torch.float32)).reshape(b, g, -1)
        n = (self._sparse_context.count(h, w) * (c // g)).clamp_min(1.0).view(b, 1)
        mean = xf.sum(-1) / n
        var = ((xf * xf).sum(-1) / n - mean * mean).clamp_min(0.0)
        y = (xf - mean.unsqueeze(-1)) * torch.rsqrt(var + self.eps).unsqueeze(-1)
        y = y.reshape(b, c, h, w)
        if self.weight is not None:
            y = y * self.weight.float().view(1, -1, 1, 1) + self.bias.float().view(1, -1, 1, 1)
        y = _apply_post_norm(self, y.to(x.dtype))
        return y * mask


# Sparse BN returns NCHW for NCHW input (one copy); False lets the network drift to
# channels-last after the first BN (no copy, mixed layouts).
KEEP_LAYOUT = True

_CLASS_CACHE: dict[tuple[type, type], type] = {}


def sparse_class(base: type, mixin: type) -> type:
    """The sparse subclass ``(mixin, base)`` of a layer class, created once and registered
    in this module under ``Sparse<Name>`` so instances pickle."""
    key = (mixin, base)
    cls = _CLASS_CACHE.get(key)
    if cls is None:
        name = f"Sparse{base.__name__}"
        existing = globals().get(name)
        if existing is not None:
            name = f"Sparse{base.__name__}_{len(_CLASS_CACHE)}"
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name,
                                         "__doc__": f"Sparse emulation of {base.__qualname__} "
                                                    f"({mixin.__doc__.splitlines()[0]})"})
        globals()[name] = cls
        _CLASS_CACHE[key] = cls
    return cls


# Named classes for the common layers (nicer repr; dynamic ones are made for subclasses).
SparseConv2d = sparse_class(nn.Conv2d, _MaskOutputCF)
SparseMaxPool2d = sparse_class(nn.MaxPool2d, _MaskOutputCF)
SparseAvgPool2d = sparse_class(nn.AvgPool2d, _MaskOutputCF)
SparseBatchNorm2d = sparse_class(nn.BatchNorm2d, _SparseBatchNormMixin)
SparseLinear = sparse_class(nn.Linear, _MaskOutputCL)
SparseLayerNorm = sparse_class(nn.LayerNorm, _MaskOutputCL)
SparseGroupNorm = sparse_class(nn.GroupNorm, _SparseGroupNormMixin)


def _channels_first_layernorm_types() -> tuple[type, ...]:
    try:
        from timm.layers import norm, norm_act
    except ImportError:  # pragma: no cover - timm is a dependency
        return ()
    names = [(norm, "LayerNorm2d"), (norm, "LayerNorm2dFp32"), (norm_act, "LayerNormAct2d"),
             (norm_act, "LayerNormAct2dFp32")]
    return tuple(getattr(mod, n) for mod, n in names if hasattr(mod, n))


def _sync_batchnorm_types() -> tuple[type, ...]:
    types: list[type] = [nn.SyncBatchNorm]
    try:
        from timm.layers.norm_act import SyncBatchNormAct
        types.append(SyncBatchNormAct)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_LN2D = _channels_first_layernorm_types()
SparseLayerNorm2d = sparse_class(_LN2D[0], _MaskOutputCF) if _LN2D else None

_SKIP_TYPES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _mixin_for(module: nn.Module) -> type | None:
    if isinstance(module, _SparseMixin):
        return None
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return _SparseBatchNormMixin
    if isinstance(module, nn.GroupNorm):
        return _SparseGroupNormMixin
    if _LN2D and isinstance(module, _LN2D):
        return _MaskOutputCF
    if isinstance(module, nn.LayerNorm):
        return _MaskOutputCL
    if isinstance(module, nn.Linear):
        return _MaskOutputCL
    if isinstance(module, _SKIP_TYPES):
        return None
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return _MaskOutputCF
    return None


def sparsify(model: nn.Module, context: SparseContext, *, sync_bn: bool = False,
             inplace: bool = False, skip: tuple[str, ...] = ()) -> nn.Module:
    """Convert a dense CNN into its sparse emulation, reading masks from ``context``.

    Every Conv2d / MaxPool2d / AvgPool2d (and their subclasses, e.g. timm's
    ``Conv2dSame``), BatchNorm2d / SyncBatchNorm (and timm's ``BatchNormAct2d``),
    LayerNorm (channels-first ``LayerNorm2d`` or channels-last), GroupNorm and Linear
    becomes a sparse subclass of its own class: same parameters, buffers, names and
    state-dict keys, same dense behaviour outside ``context.active(...)``.

    The weights are copied (``copy.deepcopy``) unless ``inplace``. ``sync_bn`` makes every
    BN synchronize its visible-position statistics across processes (as
    ``nn.SyncBatchNorm``; a no-op without an initialized process group of more than one
    process); SyncBatchNorm layers always sync. ``skip``: module names (as in
    ``named_modules``) left dense together with their children.
    """
    if not inplace:
        model = copy.deepcopy(model)
    sync_types = _sync_batchnorm_types()
    skipped = [name for name in skip]
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skipped):
            continue
        mixin = _mixin_for(module)
        if mixin is None:
            continue
        module.__class__ = sparse_class(type(module), mixin)
        module._sparse_context = context
        if mixin is _SparseBatchNormMixin:
            module.sync = bool(sync_bn or isinstance(module, sync_types))
            module.process_group = getattr(module, "process_group", None)
    if hasattr(model, "set_sparse_context"):
        model.set_sparse_context(context)
    return model


def densify_module(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Undo :func:`sparsify`: every sparse layer back to its dense class."""
    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, _SparseMixin):
            dense = [c for c in type(module).__mro__[1:]
                     if issubclass(c, nn.Module) and not issubclass(c, _SparseMixin)][0]
            module.__class__ = dense
            for attr in ("_sparse_context", "sync"):
                module.__dict__.pop(attr, None)
    return model


def is_sparse(module: nn.Module) -> bool:
    """Whether a layer is a sparse emulation made by :func:`sparsify`."""
    return isinstance(module, _SparseMixin)


def sparse_batchnorm(num_features: int, context: SparseContext | None, *, sync: bool = False,
                     eps: float = 1e-5, momentum: float | None = 0.1) -> nn.BatchNorm2d:
    """A fresh sparse BN (keys of ``BatchNorm2d``); ``context=None`` gives a dense BN
    whose ``sync`` works on any device (the gloo backend included)."""
    bn = SparseBatchNorm2d(num_features, eps=eps, momentum=momentum)
    bn._sparse_context = context
    bn.sync = sync
    bn.process_group = None
    return bn


def sparse_layernorm2d(num_channels: int, context: SparseContext, *, eps: float = 1e-6) -> nn.Module:
    """A fresh channels-first sparse LayerNorm (timm ``LayerNorm2d`` keys)."""
    ln = SparseLayerNorm2d(num_channels, eps=eps)
    ln._sparse_context = context
    return ln
