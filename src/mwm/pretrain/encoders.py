"""timm backbones as hierarchical encoders for SparK pretraining.

:func:`create_encoder` wraps a timm model in an :class:`Encoder` that returns feature
maps at strides 4, 8, 16, ..., ``downsample_ratio`` (largest map first) and knows their
channels. Three adapters:

* **ResNet** (any timm ``ResNet``: resnet10t/14t/18/26/34/50/101/152/200 and the
  ``d``/``t``/``s`` variants): the plain model built with ``num_classes=0,
  global_pool=''``; features are the outputs of ``layer1..layer4`` (strides 4..32).
* **ConvNeXt** (timm ``ConvNeXt``: atto … xxlarge): the plain model with
  ``num_classes=0``; features are the outputs of ``stages[0..3]`` (strides 4..32). The
  classifier head's ``head.norm`` is not used by pretraining: it is frozen
  (``requires_grad=False``, so DDP does not wait for its gradient) and exported with its
  initial values (ones/zeros) so the export loads with no missing keys.
* **Generic**: any other timm model that supports ``features_only=True``: the feature
  model with ``out_indices`` picking the last feature at each stride 4, 8, ..., max.
  Its state-dict keys differ from the plain model (timm flattens the first level of
  ``nn.Sequential`` containers: ``stages.0.x`` → ``stages_0.x``); :meth:`Encoder.
  timm_state_dict` maps them back to the plain timm key space. Layers of the plain
  model that the feature model drops (the final conv/norm of EfficientNet-style models,
  after the last feature) are exported with the plain model's initial weights and listed
  in :attr:`Encoder.untrained_keys`.

Default drop-path rates follow SparK: resnet50 0.05, resnet101 0.08, resnet152 0.10,
resnet200 0.15, convnext_tiny 0.1, convnext_small 0.2, convnext_base 0.3,
convnext_large 0.4; 0 for every other (small) model.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Encoder", "ResNetEncoder", "ConvNeXtEncoder", "GenericEncoder", "create_encoder",
           "default_drop_path", "base_arch", "mask_patch_choices"]

SPARK_DROP_PATH = {
    "resnet50": 0.05, "resnet101": 0.08, "resnet152": 0.10, "resnet200": 0.15,
    "convnext_tiny": 0.1, "convnext_small": 0.2, "convnext_base": 0.3, "convnext_large": 0.4,
}


def base_arch(arch: str) -> str:
    """The timm architecture without a pretrained tag: ``resnet50.a1_in1k`` → ``resnet50``."""
    return arch.split(".", 1)[0]


def default_drop_path(arch: str) -> float:
    return SPARK_DROP_PATH.get(base_arch(arch), 0.0)


class Encoder(nn.Module):
    """A hierarchical encoder: ``forward(x) -> list`` of (B, C_i, H/s_i, W/s_i), s_i = 4, 8, ...

    Attributes: ``arch`` (the timm name), ``family`` ('resnet' | 'convnext' | 'generic'),
    ``feature_channels``, ``feature_strides``, ``downsample_ratio`` (the largest stride,
    SparK's default mask cell size), ``model`` (the wrapped timm module).
    """

    family = "generic"

    def __init__(self, arch: str, model: nn.Module, channels: list[int], strides: list[int]):
        super().__init__()
        self.arch = arch
        self.model = model
        self.feature_channels = list(channels)
        self.feature_strides = list(strides)
        self.downsample_ratio = int(strides[-1])
        self.untrained_keys: list[str] = []
        self._sparse_context = None

    def set_sparse_context(self, context) -> None:
        """Called by :func:`~mwm.pretrain.sparse.sparsify`: the input is then masked too."""
        self._sparse_context = context

    def mask_input(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the masked cells of the input when a sparse mask is active."""
        ctx = self._sparse_context
        mask = None if ctx is None else ctx.mask_like(x)
        return x if mask is None else x * mask

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in the key space of ``timm.create_model(arch, num_classes=0)``."""
        return {k: v for k, v in self.model.state_dict().items()}

    def dense_model(self) -> nn.Module:
        """A plain timm model (``num_classes=0``, no sparse layers) with these weights."""
        import timm

        model = timm.create_model(self.arch, pretrained=False, num_classes=0)
        device = next(iter(self.model.parameters())).device
        state = {k: v.detach().to(device="cpu").contiguous() for k, v in self.timm_state_dict().items()}
        model.load_state_dict(state, strict=True)
        return model.to(device)

    def mask_patch_choices(self) -> list[int]:
        """The mask cell sizes SparK accepts: powers of two from the first feature stride
        (4) to ``downsample_ratio``. A cell must divide the stride (a whole number of cells
        per deepest position); below the first feature stride no feature map would see
        the mask exactly and a normalized target patch would have too few pixels."""
        choices, size = [], self.downsample_ratio
        while size >= self.feature_strides[0]:
            choices.insert(0, size)
            size //= 2
        return choices

    def uses_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())


class ResNetEncoder(Encoder):
    family = "resnet"

    def __init__(self, arch: str, model: nn.Module):
        info = model.feature_info
        names = ["layer1", "layer2", "layer3", "layer4"]
        chans = [d["num_chs"] for d in info if d["module"] in names]
        strides = [d["reduction"] for d in info if d["module"] in names]
        super().__init__(arch, model, chans, strides)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        m = self.model
        x = self.mask_input(x)
        x = m.maxpool(m.act1(m.bn1(m.conv1(x))))
        features = []
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            x = layer(x)
            features.append(x)
        return features


class ConvNeXtEncoder(Encoder):
    family = "convnext"

    def __init__(self, arch: str, model: nn.Module):
        info = [d for d in model.feature_info if d["module"].startswith("stages.")]
        super().__init__(arch, model, [d["num_chs"] for d in info], [d["reduction"] for d in info])
        # Not used by pretraining; frozen so DDP does not expect gradients for it.
        for name, param in model.named_parameters():
            if name.startswith(("head.", "norm_pre.")):
                param.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        m = self.model
        x = m.stem(self.mask_input(x))
        features = []
        for stage in m.stages:
            x = stage(x)
            features.append(x)
        return features


def _features_key_map(feature_keys, plain_keys) -> dict[str, str]:
    """Feature-model key → plain-model key (identity, first-level flattening, getter)."""
    feature_keys = set(feature_keys)
    mapping = {}
    for pk in plain_keys:
        parts = pk.split(".")
        candidates = [pk, "model." + pk]
        if len(parts) > 2:
            candidates.append("_".join(parts[:2]) + "." + ".".join(parts[2:]))
        for cand in candidates:
            if cand in feature_keys and cand not in mapping:
                mapping[cand] = pk
                break
    return mapping


class GenericEncoder(Encoder):
    """Any timm model with ``features_only`` support (see the module docstring)."""

    def __init__(self, arch: str, model: nn.Module, plain_keys: list[str],
                 plain_shapes: dict[str, tuple]):
        info = model.feature_info
        super().__init__(arch, model, info.channels(), info.reduction())
        feature_state = model.state_dict()
        self._key_map = _features_key_map(feature_state, plain_keys)
        unmapped = [k for k in feature_state if k not in self._key_map]
        wrong = [k for k, pk in self._key_map.items()
                 if tuple(feature_state[k].shape) != tuple(plain_shapes[pk])]
        if unmapped or wrong:
            raise ValueError(f"{arch}: cannot map the features_only model back to the plain timm "
                             f"keys (unmapped {unmapped[:5]}, shape mismatch {wrong[:5]}); "
                             "this architecture is not supported for export.")
        mapped = set(self._key_map.values())
        self.untrained_keys = [k for k in plain_keys if k not in mapped]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(self.mask_input(x)))

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        state = {self._key_map[k]: v for k, v in self.model.state_dict().items()}
        if self.untrained_keys:
            import timm

            fresh = timm.create_model(self.arch, pretrained=False, num_classes=0).state_dict()
            for key in self.untrained_keys:
                state[key] = fresh[key]
        return state


def _pick_indices(reductions: list[int]) -> list[int]:
    """Indices of the last feature at each stride max, max/2, ..., 4 (ascending stride)."""
    top = max(reductions)
    if top & (top - 1):
        raise ValueError(f"the deepest feature stride {top} is not a power of two")
    picked = []
    stride = top
    while stride >= 4:
        idx = [i for i, r in enumerate(reductions) if r == stride]
        if not idx:
            break
        picked.append(idx[-1])
        stride //= 2
    return picked[::-1]


def create_encoder(arch: str, *, drop_path_rate: float | None = None, pretrained: bool = False,
                   adapter: str = "auto", **timm_kwargs) -> Encoder:
    """Build the encoder adapter for a timm architecture (dense; see :func:`sparsify`).

    ``drop_path_rate=None`` uses the SparK default for the architecture
    (:func:`default_drop_path`). ``pretrained`` is passed to timm (needs the hub or a
    ``pretrained_cfg_overlay``); tests and offline runs keep it False. ``adapter``:
    'auto' (by model class), or 'generic' to force the ``features_only`` adapter.
    """
    if adapter not in ("auto", "generic"):
        raise ValueError(f"adapter must be 'auto' or 'generic', got {adapter!r}")
    import timm
    from timm.models.convnext import ConvNeXt
    from timm.models.resnet import ResNet

    if drop_path_rate is None:
        drop_path_rate = default_drop_path(arch)
    kwargs = dict(timm_kwargs)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=0, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"unknown timm architecture {arch!r}") from err
        raise
    if adapter == "auto" and isinstance(model, ResNet):
        model.reset_classifier(0, "")
        return ResNetEncoder(arch, model)
    if adapter == "auto" and isinstance(model, ConvNeXt):
        return ConvNeXtEncoder(arch, model)
    plain_state = model.state_dict()
    plain_keys = list(plain_state)
    plain_shapes = {k: tuple(v.shape) for k, v in plain_state.items()}
    info = getattr(model, "feature_info", None)
    del model, plain_state
    if not info:
        raise ValueError(f"{arch}: the timm model has no feature_info; only ResNet, ConvNeXt and "
                         "models with hierarchical features (features_only) are supported.")
    indices = _pick_indices([int(d["reduction"]) for d in info])
    if not indices:
        raise ValueError(f"{arch}: no features at stride 4 or more")
    try:
        model = timm.create_model(arch, pretrained=pretrained, features_only=True,
                                  out_indices=tuple(indices), **kwargs)
    except Exception as err:  # noqa: BLE001 - timm raises various errors here
        raise ValueError(f"{arch}: timm cannot build it with features_only=True ({err}); "
                         "only ResNet, ConvNeXt and models with feature_info are supported.") from err
    return GenericEncoder(arch, model, plain_keys, plain_shapes)


def downsample_ratio(arch: str) -> int:
    """The encoder's largest feature stride: SparK's default mask cell (32 for ResNet/ConvNeXt)."""
    with torch.random.fork_rng():  # building the model must not move anyone's random stream
        return int(create_encoder(arch, drop_path_rate=0.0).downsample_ratio)


def mask_patch_choices(arch: str) -> list[int]:
    """The mask cell sizes ``SparKModel(arch, mask_patch=...)`` accepts (4, 8, 16, 32 for
    ResNet/ConvNeXt): :meth:`Encoder.mask_patch_choices`, for validating settings."""
    with torch.random.fork_rng():
        return create_encoder(arch, drop_path_rate=0.0).mask_patch_choices()


def fit_input_size(size: int, arch: str) -> int:
    """The largest multiple of the encoder's stride that is at most ``size`` (one cell at least)."""
    ratio = downsample_ratio(arch)
    return max(ratio, size - size % ratio)
