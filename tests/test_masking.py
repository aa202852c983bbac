"""Mask samplers: exact counts, occupancy, determinism, no per-sample loops needed."""

import pytest
import torch

from mwm.masking import (_cells_in_key_order, _kth_smallest, _random_keys, budget_masks,
                         cell_occupancy, exact_count, grid_shape, masks_from_salient_cells,
                         random_masks, region_masks, salient_cells, upsample_cells)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def box_regions(batch, size, boxes):
    regions = torch.zeros(batch, size, size, dtype=torch.bool)
    for b, (y0, y1, x0, x1) in enumerate(boxes):
        regions[b, y0:y1, x0:x1] = True
    return regions


@pytest.mark.parametrize("ratio", [0.0, 0.4, 0.6, 0.75, 1.0])
def test_random_exact_count(ratio):
    masks = random_masks(64, (7, 7), ratio, generator=gen())
    expected = int(exact_count(torch.tensor(49), ratio))
    assert (masks.masked_bhw.flatten(1).sum(1) == expected).all()
    assert expected == int(49 * ratio + 0.5)


def test_exact_count_has_no_float_drift():
    assert int(exact_count(torch.tensor(5), 0.8)) == 4     # keeps exactly 1 visible
    assert int(exact_count(torch.tensor(10), 0.7)) == 7    # 10 * 0.7 = 6.999...
    assert int(exact_count(torch.tensor(3), 0.5)) == 2     # half up
    assert int(exact_count(torch.tensor(49), 0.6)) == 29


def test_five_salient_cells_at_08_keep_exactly_one_visible():
    regions = torch.zeros(4, 224, 224, dtype=torch.bool)
    regions[:, 0:32, 0:160] = True  # 5 full cells in the first row of the 7x7 grid
    masks = region_masks(regions, 32, 0.8, 0.4, generator=gen())
    salient = masks.salient_bhw.flatten(1)
    masked = masks.masked_bhw.flatten(1)
    assert (salient.sum(1) == 5).all()
    assert ((salient & ~masked).sum(1) == 1).all()
    assert ((~salient & masked).sum(1) == round(44 * 0.4)).all()


def test_region_counts_exact_for_many_shapes():
    torch.manual_seed(0)
    regions = torch.rand(32, 128, 128) > 0.97  # scattered pixels → varied occupancy
    regions[:, 10:70, 20:90] = True
    masks = region_masks(regions, 16, 0.7, 0.3, generator=gen(1))
    salient = masks.salient_bhw.flatten(1)
    masked = masks.masked_bhw.flatten(1)
    n_s = salient.sum(1)
    assert ((salient & masked).sum(1) == exact_count(n_s, 0.7)).all()
    assert ((~salient & masked).sum(1) == exact_count(64 - n_s, 0.3)).all()


def salient_with_counts(counts, grid=(7, 7), seed=0):
    """Bool (B, gh, gw) with counts[b] salient cells at random places."""
    n = grid[0] * grid[1]
    g = gen(seed)
    rows = [torch.randperm(n, generator=g) < c for c in counts]
    return torch.stack(rows).view(len(counts), *grid)


@pytest.mark.parametrize("ratios", [(0.8, 0.4, None), (0.75, 0.25, 0.6), (1.0, 0.0, 0.0),
                                    (0.0, 1.0, 1.0), (0.5, 0.5, 0.5)])
def test_counts_exact_for_every_salient_count(ratios):
    r_s, r_b, r_e = ratios
    counts = [n for n in range(50) for _ in range(3)]  # every n in 0..49, incl. empty
    salient = salient_with_counts(counts)
    masks = masks_from_salient_cells(salient, r_s, r_b, empty_ratio=r_e, generator=gen())
    s, m = salient.flatten(1), masks.masked_bhw.flatten(1)
    n_s = s.sum(1)
    assert ((s & m).sum(1) == exact_count(n_s, r_s)).all()
    k_b = torch.where(n_s == 0, exact_count(torch.tensor(49), r_b if r_e is None else r_e),
                      exact_count(49 - n_s, r_b))
    assert ((~s & m).sum(1) == k_b).all()
    assert masks.empty_b.tolist() == (n_s == 0).tolist()


def test_every_cell_equally_likely():
    """No cell position is favoured (keys pack random bits above the cell index)."""
    masks = random_masks(8192, (7, 7), 0.6, generator=gen(2)).masked_bhw.flatten(1).float()
    freq = masks.mean(0)
    assert (freq - 29 / 49).abs().max() < 0.03  # ~5.5 standard errors
    salient = torch.zeros(8192, 7, 7, dtype=torch.bool)
    salient[:, 2, 1:6] = True  # 5 salient cells, odd and even positions
    region = masks_from_salient_cells(salient, 0.8, 0.4, generator=gen(3)).masked_bhw.float()
    assert (region[:, 2, 1:6].mean(0) - 0.8).abs().max() < 0.03
    background = region.flatten(1)[:, ~salient[0].flatten()]
    assert (background.mean(0) - round(44 * 0.4) / 44).abs().max() < 0.03


@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (16, 16), (32, 32)])
def test_exact_counts_on_other_grids(grid):
    """Odd sizes and grids past 256 cells (64-bit keys)."""
    n = grid[0] * grid[1]
    random = random_masks(3, grid, 0.3, generator=gen()).masked_bhw.flatten(1)
    assert (random.sum(1) == exact_count(torch.tensor(n), 0.3)).all()
    salient = salient_with_counts([0, 1, n // 3, n], grid)
    masks = masks_from_salient_cells(salient, 0.7, 0.2, generator=gen()).masked_bhw.flatten(1)
    s = salient.flatten(1)
    n_s = s.sum(1)
    assert ((s & masks).sum(1) == exact_count(n_s, 0.7)).all()
    assert ((~s & masks).sum(1) == torch.where(n_s == 0, exact_count(torch.tensor(n), 0.2),
                                               exact_count(n - n_s, 0.2))).all()


@pytest.mark.parametrize("n_cells", [49, 1024])
def test_key_order_matches_torch_sort(n_cells):
    """The CPU (NumPy) sort and partition agree with torch's, used on other devices."""
    keys = _random_keys(16, n_cells, gen(), torch.device("cpu"))
    assert all(row.unique().numel() == n_cells for row in keys)  # unique within a row
    assert torch.equal(_cells_in_key_order(keys), keys.argsort(dim=1))
    for k in (1, n_cells // 2, n_cells):
        assert torch.equal(_kth_smallest(keys, k), keys.kthvalue(k, dim=1, keepdim=True).values)


def test_salient_cells_matches_definition():
    g = gen(4)
    occ = torch.randint(0, 5, (256, 7, 7), generator=g).float() / 4
    occ = occ * (torch.rand(256, 7, 7, generator=g) < 0.3)
    occ[:8] = 0
    occ[8:64] *= 0.3  # below the threshold everywhere: the peak cells are kept
    for threshold in (0.25, 0.5, 1.0, 1.5):
        peak = occ.flatten(1).amax(1).view(-1, 1, 1)
        above = occ >= threshold
        vanished = (peak > 0) & ~above.flatten(1).any(1).view(-1, 1, 1)
        assert torch.equal(salient_cells(occ, threshold), above | (vanished & (occ == peak)))


def test_random_and_budget_deterministic():
    a = random_masks(32, (7, 7), 0.6, generator=gen(9)).masked_bhw
    assert torch.equal(a, random_masks(32, (7, 7), 0.6, generator=gen(9)).masked_bhw)
    assert not torch.equal(a, random_masks(32, (7, 7), 0.6, generator=gen(10)).masked_bhw)
    regions = box_regions(8, 128, [(20, 80, 20, 80)] * 8)
    b = budget_masks(16, 0.5, 3.0, regions_bhw=regions, generator=gen(9)).masked_bhw
    assert torch.equal(b, budget_masks(16, 0.5, 3.0, regions_bhw=regions, generator=gen(9)).masked_bhw)
    for ratio in (0.0, 1.0):
        full = budget_masks(16, ratio, 3.0, regions_bhw=regions, generator=gen()).masked_bhw
        assert (full.flatten(1).sum(1) == round(64 * ratio)).all()


def test_occupancy_is_area_fraction():
    regions = torch.zeros(1, 64, 64)
    regions[0, 0:32, 0:16] = 1  # half of cell (0,0)
    regions[0, 32:40, 32:64] = 1  # a quarter of cell (1,1)
    occ = cell_occupancy(regions, 32)
    torch.testing.assert_close(occ[0], torch.tensor([[0.5, 0.0], [0.0, 0.25]]))
    assert salient_cells(occ, 0.5)[0].tolist() == [[True, False], [False, False]]


def test_thin_region_never_vanishes():
    regions = box_regions(2, 224, [(100, 102, 10, 200), (0, 0, 0, 0)])  # 2 px thick line
    masks = region_masks(regions, 32, 0.8, 0.4, generator=gen())
    assert masks.salient_bhw[0].any()  # the line keeps its most-covered cells
    assert not masks.salient_bhw[1].any() and masks.empty_b.tolist() == [False, True]
    # the empty image falls back to random masking at ratio_background
    assert int(masks.masked_bhw[1].sum()) == round(49 * 0.4)


def test_same_seed_same_masks_and_different_seed_differs():
    regions = box_regions(8, 128, [(20, 80, 20, 80)] * 8)
    a = region_masks(regions, 16, 0.8, 0.4, generator=gen(5)).masked_bhw
    b = region_masks(regions, 16, 0.8, 0.4, generator=gen(5)).masked_bhw
    c = region_masks(regions, 16, 0.8, 0.4, generator=gen(6)).masked_bhw
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_realized_ratios_are_measured():
    regions = box_regions(16, 224, [(0, 64, 0, 64)] * 16)  # 4 salient cells of 49
    masks = region_masks(regions, 32, 0.75, 0.4, generator=gen())
    ratios = {k: float(v) for k, v in masks.ratios().items()}
    assert ratios["salient"] == pytest.approx(3 / 4)
    assert ratios["background"] == pytest.approx(round(45 * 0.4) / 45)
    assert ratios["overall"] == pytest.approx((3 + 18) / 49)
    assert ratios["empty_fraction"] == 0.0


def test_budget_exact_overall_count_and_emphasis():
    regions = box_regions(512, 224, [(0, 96, 0, 96)] * 512)  # 9 salient cells
    masks = budget_masks(32, 0.4, 4.0, regions_bhw=regions, generator=gen())
    masked = masks.masked_bhw.flatten(1)
    assert (masked.sum(1) == round(49 * 0.4)).all()
    ratios = masks.ratios()
    assert float(ratios["salient"]) > 1.5 * float(ratios["background"])
    plain = budget_masks(32, 0.4, 1.0, regions_bhw=regions, generator=gen()).ratios()
    assert abs(float(plain["salient"]) - float(plain["background"])) < 0.05


def test_budget_soft_saliency_prefers_high_saliency():
    saliency = torch.zeros(256, 64, 64)
    saliency[:, :, :32] = 1.0  # left half fully salient
    masks = budget_masks(16, 0.5, 5.0, saliency_bhw=saliency, generator=gen())
    left = masks.masked_bhw[:, :, :2].float().mean()
    right = masks.masked_bhw[:, :, 2:].float().mean()
    assert left > right + 0.2
    assert (masks.masked_bhw.flatten(1).sum(1) == 8).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        grid_shape(100, 100, 32)
    with pytest.raises(ValueError, match="ratio_salient"):
        region_masks(torch.zeros(1, 64, 64), 32, 1.2, 0.4)
    with pytest.raises(ValueError, match="exactly one"):
        budget_masks(32, 0.4, 2.0)


def test_upsample_cells():
    cells = torch.tensor([[[True, False]]])
    pixels = upsample_cells(cells, 2)
    assert pixels.shape == (1, 2, 4) and pixels[0, :, :2].all() and not pixels[0, :, 2:].any()


# --------------------------------------------------------------------------- the specification

def _salient_patterns():
    """A batch covering empty, partial and full regions on a 4x4 grid."""
    salient = torch.zeros(5, 4, 4, dtype=torch.bool)
    salient[1, 0, 0] = True
    salient[2, :2, :3] = True
    salient[3, 1:, 1:] = True
    salient[4] = True
    return salient


def _frequencies(sample, draws: int) -> torch.Tensor:
    return torch.stack([sample(seed).float() for seed in range(draws)]).mean(0)


def test_reference_and_fast_region_masks_agree():
    """Same exact per-image counts, and the same per-cell probabilities (each cell of a
    group is masked with probability k / n for its group), fast path and specification."""
    from mwm.masking import reference_region_masks

    salient = _salient_patterns()
    args = (0.8, 0.4)
    fast = lambda seed: masks_from_salient_cells(salient, *args, empty_ratio=0.6,  # noqa: E731
                                                 generator=gen(seed)).masked_bhw
    spec = lambda seed: reference_region_masks(salient, *args, empty_ratio=0.6,  # noqa: E731
                                               generator=gen(seed))
    for seed in range(20):
        a, b = fast(seed), spec(seed)
        assert torch.equal((a & salient).flatten(1).sum(1), (b & salient).flatten(1).sum(1))
        assert torch.equal((a & ~salient).flatten(1).sum(1), (b & ~salient).flatten(1).sum(1))
    draws = 3000
    p_fast, p_spec = _frequencies(fast, draws), _frequencies(spec, draws)
    # the exact probability of each cell, from its group's size and count
    expected = torch.empty(salient.shape)
    for i, image in enumerate(salient):
        n = int(image.sum())
        k_s, k_b = (round(n * 0.8 + 1e-9), round((16 - n) * 0.4 + 1e-9)) if n else (0, round(9.6))
        expected[i][image] = k_s / max(n, 1)
        expected[i][~image] = k_b / (16 - n) if n < 16 else 0.0
    tolerance = 4 * (0.25 / draws) ** 0.5  # four binomial standard errors at p = 0.5
    assert (p_fast - expected).abs().max() < tolerance
    assert (p_spec - expected).abs().max() < tolerance


def test_reference_and_fast_random_masks_agree():
    from mwm.masking import reference_random_masks

    fast = lambda seed: random_masks(3, (5, 5), 0.6, generator=gen(seed)).masked_bhw  # noqa: E731
    spec = lambda seed: reference_random_masks(3, (5, 5), 0.6, generator=gen(seed))  # noqa: E731
    assert all(fast(s).flatten(1).sum(1).tolist() == spec(s).flatten(1).sum(1).tolist() == [15] * 3
               for s in range(10))
    draws = 2000
    tolerance = 4 * (0.25 / draws) ** 0.5
    assert (_frequencies(fast, draws) - 0.6).abs().max() < tolerance
    assert (_frequencies(spec, draws) - 0.6).abs().max() < tolerance


def test_registry_describes_every_strategy():
    from mwm.masking import MASKINGS, MaskingParams, default_masking

    assert set(MASKINGS.names()) >= {"random", "region", "budget", "soft"}
    regions = box_regions(2, 64, [(0, 32, 0, 32), (10, 20, 10, 60)])
    params = MaskingParams()
    for strategy in MASKINGS:
        assert strategy.help and set(strategy.params) <= set(MaskingParams.__dataclass_fields__)
        source = regions.float() if strategy.continuous else regions
        masks = strategy.sample(source, 32, params, gen())
        assert masks.masked_bhw.shape == (2, 2, 2)
    assert not MASKINGS.get("random").needs_regions and MASKINGS.get("soft").continuous
    assert default_masking(True) in MASKINGS and default_masking(False) in MASKINGS
    with pytest.raises(ValueError, match="ratio"):
        MaskingParams(ratio=1.5)
    with pytest.raises(ValueError, match="unknown masking strategy 'rand'"):
        MASKINGS.get("rand")
