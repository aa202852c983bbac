"""The SparK model: forward/backward, masked-only loss, figures, sizes, independence."""

import pytest
import timm
import torch

from mwm.masking import random_masks, upsample_cells
from mwm.pretrain.spark import (SparKModel, default_decoder_width, masked_patch_loss, patchify,
                                unpatchify)


def _mask(batch, grid, ratio=0.6, seed=0):
    return random_masks(batch, grid, ratio, generator=torch.Generator().manual_seed(seed)).active_b1hw


@pytest.fixture(scope="module")
def r10():
    torch.manual_seed(0)
    return SparKModel("resnet10t", input_size=64)


def test_forward_outputs(r10):
    x = torch.randn(3, 3, 64, 64)
    active = _mask(3, r10.grid())
    out = r10(x, active)
    assert r10.patch_size == r10.mask_patch == 32 and r10.grid() == (2, 2)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.reconstruction_b3hw.shape == x.shape == out.masked_input_b3hw.shape
    px = upsample_cells(active[:, 0], 32).unsqueeze(1).expand_as(x)
    assert torch.equal(out.reconstruction_b3hw[px], x[px])      # visible cells pasted
    assert torch.equal(out.masked_input_b3hw[px], x[px])
    assert torch.count_nonzero(out.masked_input_b3hw[~px]) == 0
    assert not out.reconstruction_b3hw.requires_grad
    out.loss.backward()
    assert all(t.grad is not None for t in r10.mask_tokens)
    r10.zero_grad(set_to_none=True)


def test_loss_only_on_masked_cells():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    active = _mask(2, (2, 2), 0.5)
    rec = torch.randn(2, 3, 64, 64, requires_grad=True)
    loss, _, _ = masked_patch_loss(rec, x, active, 32)
    grad, = torch.autograd.grad(loss, rec)
    px = upsample_cells(active[:, 0], 32).unsqueeze(1).expand_as(x)
    assert torch.count_nonzero(grad[px]) == 0
    assert torch.count_nonzero(grad[~px]) > 0
    changed = rec.detach() + 10 * px
    assert torch.equal(masked_patch_loss(changed, x, active, 32)[0], loss.detach())


def test_loss_value_normalized_and_raw_targets():
    torch.manual_seed(2)
    x = torch.randn(1, 3, 32, 64) * 2 + 3
    rec = torch.randn(1, 3, 32, 64)
    active = torch.tensor([[[[True, False]]]])
    got = masked_patch_loss(rec, x, active, 32)[0]
    pred = patchify(rec, 32)[0, 1]
    norm = patchify(x, 32)[0, 1]
    norm = (norm - norm.mean()) / torch.sqrt(norm.var() + 1e-6)
    torch.testing.assert_close(got, (pred - norm).pow(2).mean())
    raw = masked_patch_loss(rec, x, active, 32, norm_pix_loss=False)[0]
    torch.testing.assert_close(raw, (pred - patchify(x, 32)[0, 1]).pow(2).mean())


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 64, 96)
    p = patchify(x, 32)
    assert p.shape == (2, 6, 3 * 32 * 32)
    assert torch.equal(unpatchify(p, 32, (2, 3)), x)
    assert torch.equal(p[0, 4], x[0, :, 32:64, 32:64].permute(1, 2, 0).reshape(-1))


def test_figure_undoes_patch_normalization(r10):
    """A perfect prediction of the normalized target reconstructs the input exactly."""
    x = torch.randn(2, 3, 64, 64) * 2 + 1
    active = _mask(2, (2, 2), 0.5, seed=3)
    target = patchify(x, 32)
    mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()
    perfect = unpatchify((target - mean) / std, 32, (2, 2))
    loss, mean2, std2 = masked_patch_loss(perfect, x, active, 32)
    assert loss.item() < 1e-10
    px = upsample_cells(active[:, 0], 32).unsqueeze(1)
    torch.testing.assert_close(r10._figure(perfect, x, px, mean2, std2), x, rtol=1e-5, atol=1e-5)


def test_loss_decreases_on_a_tiny_batch():
    torch.set_flush_denormal(True)  # as in CPU training (MACHINE-NOTES)
    try:
        _train_ten_steps()
    finally:
        torch.set_flush_denormal(False)


def _train_ten_steps():
    torch.manual_seed(4)
    model = SparKModel("resnet10t", input_size=64)
    x = torch.randn(2, 3, 64, 64)
    active = _mask(2, model.grid(), 0.5, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(x, active).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_bf16_autocast_and_channels_last(r10):
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    active = _mask(2, (2, 2), 0.5, seed=8)
    model = SparKModel("resnet10t", input_size=64).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, active)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    with model.context.active(active):
        feats = model.encoder(x)
    assert model.context.active_b1hw is None  # restored after the block
    assert torch.count_nonzero(feats[-1] * ~active) == 0


def test_convnext_model_runs_with_layernorm_densify():
    torch.manual_seed(6)
    model = SparKModel("convnext_atto", input_size=64)
    assert model.densify_norm == "ln" and model.family == "convnext"
    assert model.decoder_width == default_decoder_width(320) == 160
    out = model(torch.randn(2, 3, 64, 64), _mask(2, (2, 2)))
    out.loss.backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(".head." in f".{n}" for n in frozen)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_sizes_not_divisible_by_the_patch():
    with pytest.raises(ValueError, match="divisible"):
        SparKModel("resnet10t", input_size=100)
    model = SparKModel("resnet10t", input_size=64)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 3, 80, 64), torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(1, 3, 64, 64), torch.ones(1, 1, 3, 3, dtype=torch.bool))


def test_two_models_with_different_masks_do_not_interfere():
    torch.manual_seed(7)
    a = SparKModel("resnet10t", input_size=64)
    b = SparKModel("resnet10t", input_size=64)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()  # running stats: outputs depend only on the inputs and the masks
    x = torch.randn(2, 3, 64, 64)
    mask_a, mask_b = _mask(2, (2, 2), 0.25, seed=1), _mask(2, (2, 2), 0.75, seed=2)
    with torch.no_grad():
        alone = a(x, mask_a).loss
        with b.context.active(mask_b):  # b's mask set while a runs
            inside = a(x, mask_a).loss
        other = b(x, mask_b).loss
    assert torch.equal(alone, inside)
    assert not torch.equal(alone, other)


def test_encoder_state_dict_and_dense_encoder(r10):
    state = r10.encoder_state_dict()
    plain = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    assert list(state) == list(plain.state_dict())
    dense = r10.dense_encoder()
    assert type(dense) is type(plain)
    for k, v in dense.state_dict().items():
        assert torch.equal(v, state[k])
    assert dense(torch.randn(1, 3, 64, 64)).shape == (1, 512)


def test_densify_projections_keep_pytorchs_default_initialization():
    """As SparK: uniform in ±1/sqrt(fan_in) with a non-zero bias (MWM used truncated-normal
    std 0.02 and zero bias before, 1.4-3.1x off in mean |w|)."""
    import math

    torch.manual_seed(0)
    model = SparKModel("resnet10t", input_size=64, decoder_width=32)
    convs = [p for p in model.densify_projs if isinstance(p, torch.nn.Conv2d)]
    assert convs
    for conv in convs:
        fan_in = conv.weight[0].numel()
        bound = 1 / math.sqrt(fan_in)
        assert float(conv.weight.abs().max()) <= bound
        assert float(conv.weight.abs().mean()) == pytest.approx(bound / 2, rel=0.1)
        assert float(conv.bias.abs().max()) > 0
