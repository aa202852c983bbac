"""SparK with mask cells finer than the encoder stride (``SparKModel(mask_patch=...)``)."""

import pytest
import torch
import torch.nn.functional as F

from mwm.masking import random_masks, upsample_cells
from mwm.pretrain.encoders import create_encoder, mask_patch_choices
from mwm.pretrain.spark import SparKModel, masked_patch_loss, patchify, unpatchify
from mwm.pretrain.sparse import SparseContext, sparsify
from sparse_helpers import clean_and_noised

SIZE = 64


def _fine_mask(batch: int, patch: int, seed: int = 0) -> torch.Tensor:
    """Random 60 % masks on the ``patch`` grid; image 0's top-left 32-px block fully masked
    and its top-right block with one visible sub-cell (both rule cases always occur)."""
    n = SIZE // patch
    active = random_masks(batch, (n, n), 0.6, generator=torch.Generator().manual_seed(seed)).active_b1hw
    k = 32 // patch
    active[0, 0, :k, :2 * k] = False
    active[0, 0, k - 1, 2 * k - 1] = True  # its bottom-right sub-cell
    return active


def _expected(active: torch.Tensor, patch: int, size: int) -> torch.Tensor:
    """The rule, written independently of sparse.py: repeat at finer maps, any-visible
    (max-pool) at coarser ones."""
    stride = SIZE // size
    if stride <= patch:
        return upsample_cells(active[:, 0], patch // stride).unsqueeze(1)
    return F.max_pool2d(active.float(), stride // patch) > 0


@pytest.mark.parametrize("arch,patch", [("resnet10t", 16), ("resnet10t", 8), ("convnext_atto", 16)])
def test_noise_in_masked_fine_cells_reaches_no_visible_feature(arch, patch):
    torch.manual_seed(0)
    ctx = SparseContext()
    enc = sparsify(create_encoder(arch), ctx).train()
    x = torch.randn(3, 3, SIZE, SIZE)
    active = _fine_mask(3, patch)
    clean, dirty, outputs = clean_and_noised(enc, ctx, x, active, patch)
    assert [SIZE // f.shape[-1] for f in clean] == [4, 8, 16, 32]
    for a, b in zip(clean, dirty):
        # every stage, the coarse ones included: masked pixels never reach any feature
        assert torch.equal(a, b)
        expected = _expected(active, patch, a.shape[-1])
        # exactly the positions the rule calls visible carry features (any-visible at
        # strides above the mask cell: a coarse position with one visible sub-cell is on)
        assert torch.equal(a.abs().sum(1, keepdim=True) > 0, expected)
    coarse = _expected(active, patch, SIZE // 32)
    assert coarse[0, 0, 0, 1] and not coarse[0, 0, 0, 0]  # the forced cases are there
    assert len(outputs) > 10
    for out in outputs:  # every sparse layer: zero where the rule says masked
        assert torch.count_nonzero(out * ~_expected(active, patch, out.shape[-1])) == 0


def _pair(**kwargs):
    torch.manual_seed(3)
    return SparKModel("resnet10t", input_size=SIZE, **kwargs)


def _run(model, x, active):
    out = model(x, active)
    out.loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_default_mask_patch_is_the_stride_bit_for_bit():
    default, explicit = _pair(), _pair(mask_patch=32)
    assert default.mask_patch == explicit.mask_patch == default.patch_size == 32
    assert default.grid() == (2, 2)
    assert list(default.state_dict()) == list(_pair(mask_patch=8).state_dict())
    x = torch.randn(2, 3, SIZE, SIZE)
    active = random_masks(2, (2, 2), 0.5, generator=torch.Generator().manual_seed(1)).active_b1hw
    (a, ga), (b, gb) = _run(default, x, active), _run(explicit, x, active)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(a.reconstruction_b3hw, b.reconstruction_b3hw)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)


@pytest.mark.parametrize("patch", [8, 16])
def test_fine_mask_loss_figure_and_shapes(patch):
    model = _pair(mask_patch=patch)
    assert model.mask_patch == patch and model.patch_size == 32
    assert model.grid() == (SIZE // patch,) * 2 and model.grid(32, 96) == (32 // patch, 96 // patch)
    x = torch.randn(2, 3, SIZE, SIZE)
    active = _fine_mask(2, patch, seed=2)
    decoded = []
    hook = model.decoder.register_forward_hook(lambda mod, i, o: decoded.append(o))
    out, grads = _run(model, x, active)
    hook.remove()
    # the loss is the per-fine-cell loss over the masked fine cells
    want = masked_patch_loss(decoded[0], x, active, patch)[0]
    assert torch.equal(out.loss, want)
    px = upsample_cells(active[:, 0], patch).unsqueeze(1).expand_as(x)
    assert torch.equal(out.reconstruction_b3hw[px], x[px])     # visible fine cells pasted
    assert torch.count_nonzero(out.masked_input_b3hw[~px]) == 0
    assert all(f"mask_tokens.{i}" in grads for i in range(4))
    with pytest.raises(ValueError, match=f"mask cells of {patch} px"):
        model(x, torch.ones(2, 1, 2, 2, dtype=torch.bool))     # the stride grid is refused
    # a perfect prediction of the per-fine-patch normalized target gives back the input
    target = patchify(x, patch)
    mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()
    perfect = unpatchify((target - mean) / std, patch, model.grid())
    loss, mean2, std2 = masked_patch_loss(perfect, x, active, patch)
    assert loss.item() < 1e-10
    torch.testing.assert_close(model._figure(perfect, x, px[:, :1], mean2, std2), x, rtol=1e-5, atol=1e-5)


def test_mask_tokens_fill_coarse_positions_only_when_every_sub_cell_is_masked():
    model = _pair(mask_patch=16)
    x = torch.randn(2, 3, SIZE, SIZE)
    active = _fine_mask(2, 16, seed=4)
    seen = []
    hook = model.densify_projs[0].register_forward_hook(lambda mod, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(x, active)
    hook.remove()
    coarse = seen[0]  # stride 32, after the densify norm and the mask tokens
    is_token = (coarse == model.mask_tokens[0]).all(dim=1, keepdim=True)
    assert torch.equal(is_token, ~(F.max_pool2d(active.float(), 2) > 0))
    assert is_token.any() and not is_token.all()


@pytest.mark.parametrize("bad", [12, 64, 2, 0, True, "16"])
def test_invalid_mask_patch_is_a_clear_error(bad):
    assert mask_patch_choices("resnet10t") == [4, 8, 16, 32]
    with pytest.raises(ValueError, match=r"mask_patch must be one of 4, 8, 16, 32 for resnet10t .*"
                                         r"divides its stride 32"):
        SparKModel("resnet10t", input_size=SIZE, mask_patch=bad)
