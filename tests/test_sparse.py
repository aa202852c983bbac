"""Sparse emulation of timm CNNs: sparsity, dense equivalence, BN/GN statistics, contexts."""

import pytest
import timm
import torch
from torch import nn

from mwm.masking import random_masks, upsample_cells
from mwm.pretrain import sparse as sparse_mod
from mwm.pretrain.encoders import create_encoder
from mwm.pretrain.sparse import (SparseContext, densify_module, is_sparse, sparse_batchnorm,
                                 sparsify)
from sparse_helpers import clean_and_noised


def _mask(batch, grid, ratio=0.6, seed=0):
    return random_masks(batch, grid, ratio, generator=torch.Generator().manual_seed(seed)).active_b1hw


@pytest.mark.parametrize("arch", ["resnet10t", "convnext_atto"])
def test_masked_pixels_never_reach_visible_features(arch):
    torch.manual_seed(0)
    ctx = SparseContext()
    enc = sparsify(create_encoder(arch), ctx).train()
    x = torch.randn(3, 3, 96, 96)
    active = _mask(3, (3, 3))
    clean, dirty, layer_outputs = clean_and_noised(enc, ctx, x, active, 32)
    with ctx.active(active):
        masks = [ctx.mask_bool(f.shape[2], f.shape[3]) for f in clean]
    assert [f.shape[-1] for f in clean] == [24, 12, 6, 3]
    for a, b, m in zip(clean, dirty, masks):
        assert torch.equal(a, b)                       # visible features unchanged
        assert torch.count_nonzero(a * ~m) == 0         # masked positions are zero
        assert torch.count_nonzero(a * m) > 0
    # every sparse layer's output is zero at masked positions, at every resolution
    assert len(layer_outputs) > 10
    for out in layer_outputs:
        m = upsample_cells(active[:, 0], out.shape[-1] // 3).unsqueeze(1)
        assert out.shape[-2:] == m.shape[-2:]
        assert torch.count_nonzero(out * ~m) == 0


@pytest.mark.parametrize("arch", ["resnet10t", "convnext_atto"])
@pytest.mark.parametrize("train", [True, False])
def test_all_visible_matches_dense(arch, train):
    torch.manual_seed(1)
    dense = create_encoder(arch)
    ctx = SparseContext()
    sparse = sparsify(dense, ctx)  # a copy: dense keeps its own weights and stats
    assert not any(is_sparse(m) for m in dense.modules())
    dense.train(train)
    sparse.train(train)
    x = torch.randn(4, 3, 64, 64)
    with ctx.active(torch.ones(4, 1, 2, 2, dtype=torch.bool)):
        got = sparse(x)
    want = dense(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    for (name, a), (_, b) in zip(sparse.state_dict().items(), dense.state_dict().items()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["resnet18", "resnet10t", "convnext_atto"])
def test_state_dict_keys_are_timm_keys(arch):
    ctx = SparseContext()
    enc = sparsify(create_encoder(arch), ctx, inplace=True)
    plain = timm.create_model(arch, pretrained=False, num_classes=0).state_dict()
    ours = enc.timm_state_dict()
    assert list(ours) == list(plain)
    assert all(ours[k].shape == plain[k].shape for k in plain)
    assert sum(is_sparse(m) for m in enc.modules()) > 10
    restored = densify_module(enc)
    assert not any(is_sparse(m) for m in restored.modules())


def test_batchnorm_statistics_over_visible_positions_only():
    torch.manual_seed(2)
    ctx = SparseContext()
    bn = sparse_batchnorm(5, ctx)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    active = _mask(4, (2, 2), 0.5)
    m = upsample_cells(active[:, 0], 4).unsqueeze(1)  # 8x8 maps
    x = (torch.randn(4, 5, 8, 8) * 3 + 1) * m
    with ctx.active(active):
        y = bn(x)
    vis = x.permute(0, 2, 3, 1)[m[:, 0]]  # (N_visible, C)
    mean, var = vis.mean(0), vis.var(0, unbiased=False)
    want = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
    want = (want * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)) * m
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, 0.1 * mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * vis.var(0, unbiased=True), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 1
    # masked values do not matter, even if a caller forgot to zero them
    with ctx.active(active):
        y2 = bn(x + 100 * (~m))
    torch.testing.assert_close(y2, y)
    # eval: running statistics, masked positions still zero
    bn.eval()
    with ctx.active(active):
        y_eval = bn(x)
    want_eval = nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                         False, 0.0, bn.eps) * m
    torch.testing.assert_close(y_eval, want_eval)


def test_synchronized_batchnorm_path(monkeypatch):
    """The cross-process path (sums all-reduced) gives the local result for one process."""
    torch.manual_seed(3)
    ctx = SparseContext()
    local, synced = sparse_batchnorm(6, ctx), sparse_batchnorm(6, ctx, sync=True)
    monkeypatch.setattr(sparse_mod, "_sync_world", lambda group: 2)
    calls = []
    monkeypatch.setattr(sparse_mod, "_all_reduce_sum", lambda t, group: calls.append(1) or t)
    active = _mask(3, (2, 2), 0.5, seed=4)
    m = upsample_cells(active[:, 0], 4).unsqueeze(1)
    x = torch.randn(3, 6, 8, 8, requires_grad=True)
    with ctx.active(active):
        a = local(x * m)
        b = synced(x * m)
    assert calls
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(local.running_var, synced.running_var)
    ga, = torch.autograd.grad(a.square().sum(), x)
    gb, = torch.autograd.grad(b.square().sum(), x)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def test_groupnorm_statistics_over_visible_positions_only():
    torch.manual_seed(5)
    ctx = SparseContext()
    gn = sparsify(nn.GroupNorm(2, 6), ctx)
    active = _mask(2, (2, 2), 0.5, seed=6)
    m = upsample_cells(active[:, 0], 4).unsqueeze(1)
    x = torch.randn(2, 6, 8, 8) * m
    with ctx.active(active):
        y = gn(x)
    for b in range(2):
        for g in range(2):
            vals = x[b, 3 * g:3 * g + 3][:, m[b, 0]]
            mean, var = vals.mean(), vals.var(unbiased=False)
            want = (x[b, 3 * g:3 * g + 3] - mean) / torch.sqrt(var + gn.eps) * m[b]
            torch.testing.assert_close(y[b, 3 * g:3 * g + 3], want, rtol=1e-4, atol=1e-5)


def test_layernorm_and_linear_channels_last_are_masked():
    ctx = SparseContext()
    block = sparsify(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 8)), ctx)
    active = _mask(2, (2, 2), 0.5, seed=7)
    x = torch.randn(2, 8, 8, 4)
    m = upsample_cells(active[:, 0], 4).unsqueeze(-1)
    with ctx.active(active):
        y = block(x)
    assert torch.count_nonzero(y * ~m) == 0
    torch.testing.assert_close(y * m, block(x) * m)  # outside the block: dense


def test_two_contexts_do_not_interfere():
    torch.manual_seed(8)
    base = create_encoder("resnet10t").train()
    ctx_a, ctx_b = SparseContext(), SparseContext()
    enc_a, enc_b = sparsify(base, ctx_a), sparsify(base, ctx_b)
    x = torch.randn(2, 3, 64, 64)
    mask_a, mask_b = _mask(2, (2, 2), 0.5, seed=1), _mask(2, (2, 2), 0.25, seed=2)
    with ctx_a.active(mask_a):
        alone_a = enc_a(x)
    with ctx_b.active(mask_b):
        alone_b = enc_b(x)
        with ctx_a.active(mask_a):
            nested_a = enc_a(x)
        after_b = enc_b(x)
    assert ctx_a.active_b1hw is None and ctx_b.active_b1hw is None
    for u, v in zip(alone_a, nested_a):
        torch.testing.assert_close(u, v)
    for u, v in zip(alone_b, after_b):
        torch.testing.assert_close(u, v)
    assert not torch.equal(alone_a[-1], alone_b[-1])


def test_context_rejects_bad_masks():
    ctx = SparseContext()
    with pytest.raises(ValueError, match="B, 1, gh, gw"):
        with ctx.active(torch.ones(2, 3, 3, dtype=torch.bool)):
            pass


def test_mask_at_coarser_finer_and_other_resolutions():
    """Finer maps repeat each cell; coarser ones by an integer factor are visible where any
    sub-cell is (the fine-mask rule); other sizes stay nearest-neighbour."""
    ctx = SparseContext()
    active = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]],
                          dtype=torch.bool).view(1, 1, 4, 4)
    with ctx.active(active):
        assert ctx.mask_bool(4, 4) is active
        assert torch.equal(ctx.mask_bool(8, 8), upsample_cells(active[:, 0], 2).unsqueeze(1))
        coarse = torch.tensor([[True, False], [False, True]]).view(1, 1, 2, 2)
        assert torch.equal(ctx.mask_bool(2, 2), coarse)
        assert ctx.mask_bool(1, 1).item()                       # one visible cell is enough
        rows = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)  # pairs of rows pooled
        assert torch.equal(ctx.mask_bool(2, 8)[0, 0], rows.repeat_interleave(2, dim=1))  # columns repeated
        nearest = nn.functional.interpolate(active.to(torch.uint8), size=(3, 3), mode="nearest") > 0
        assert torch.equal(ctx.mask_bool(3, 3), nearest)
        assert torch.equal(ctx.count(2, 2), torch.tensor([2.0]))
