"""Loss-guided masking, the text-free baseline: exact counts, the hardest cells first, uniform
where nothing is known, the loss table kept in each image's own frame, filled by pretraining,
saved and restored on resume, gathered across ranks, and the other strategies' loss untouched."""

import pytest
import torch

from mwm.masking import MASKINGS, MaskingParams, exact_count, loss_guided_masks
from mwm.pretrain.hardness import LossTable, source_to_view, view_to_source

IDENTITY = (0.0, 0.0, 1.0, 1.0, 0.0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def distinct_losses(batch, grid, seed=0):
    """(B, gh, gw) float losses, all different within an image (a random permutation)."""
    g = gen(seed)
    n = grid[0] * grid[1]
    return torch.stack([torch.randperm(n, generator=g).float() for _ in range(batch)]).view(
        batch, *grid)


def frequencies(draw, draws):
    """Per-cell mask frequency over ``draws`` calls of ``draw(seed)`` (a (B, gh, gw) bool)."""
    return sum(draw(seed).float() for seed in range(draws)) / draws


def views(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------- the sampler

@pytest.mark.parametrize("ratio, hard", [(0.6, 0.5), (0.75, 1.0), (0.4, 0.0), (0.0, 0.5),
                                         (1.0, 0.5), (0.6, 0.33)])
def test_exact_count_per_image(ratio, hard):
    losses = distinct_losses(16, (7, 7))
    losses[::3] = float("nan")                       # unseen images
    losses[1, :, :3] = float("nan")                  # a partly measured one
    masks = loss_guided_masks(16, (7, 7), ratio, hard, losses_bhw=losses, generator=gen())
    expected = int(exact_count(torch.tensor(49), ratio))
    assert (masks.masked_bhw.flatten(1).sum(1) == expected).all()
    assert not masks.salient_bhw.any() and not masks.empty_b.any()


@pytest.mark.parametrize("grid", [(4, 4), (20, 20)])   # int32 and int64 sort keys
def test_hard_fraction_one_masks_exactly_the_top_loss_cells(grid):
    n = grid[0] * grid[1]
    losses = distinct_losses(8, grid, seed=3) / n - 0.5   # negative losses sort right too
    k = int(exact_count(torch.tensor(n), 0.6))
    masks = loss_guided_masks(8, grid, 0.6, 1.0, losses_bhw=losses, generator=gen())
    top = torch.zeros(8, n, dtype=torch.bool).scatter_(1, losses.flatten(1).topk(k).indices, True)
    assert torch.equal(masks.masked_bhw.flatten(1), top)


def test_the_hard_share_is_always_masked_and_the_rest_is_random():
    losses = distinct_losses(4, (7, 7), seed=1)
    k = int(exact_count(torch.tensor(49), 0.6))      # 29
    k_hard = int(exact_count(torch.tensor(k), 0.5))  # 15
    hardest = losses.flatten(1).topk(k_hard).indices
    seen = torch.zeros(4, 49)
    for seed in range(50):
        masked = loss_guided_masks(4, (7, 7), 0.6, 0.5, losses_bhw=losses,
                                   generator=gen(seed)).masked_bhw.flatten(1)
        assert masked.gather(1, hardest).all()
        seen += masked.float()
    others = torch.ones(4, 49, dtype=torch.bool).scatter_(1, hardest, False)
    # the other 14 masked cells are spread over the 34 others, not always the same ones
    assert (seen[others] < 50).all() and (seen[others] > 0).float().mean() > 0.9


def test_hard_fraction_zero_is_uniform_whatever_the_losses():
    losses = distinct_losses(2, (7, 7)) ** 4         # strongly skewed
    draws = 1500
    freq = frequencies(lambda s: loss_guided_masks(2, (7, 7), 0.6, 0.0, losses_bhw=losses,
                                                   generator=gen(s)).masked_bhw, draws)
    k = int(exact_count(torch.tensor(49), 0.6))
    tolerance = 4 * (0.25 / draws) ** 0.5
    assert (freq - k / 49).abs().max() < tolerance
    # the same check sees hardness when it is there: the top cells are masked every time
    guided = frequencies(lambda s: loss_guided_masks(2, (7, 7), 0.6, 0.5, losses_bhw=losses,
                                                     generator=gen(s)).masked_bhw, 200)
    assert (guided - k / 49).abs().max() > tolerance


def test_unseen_images_are_masked_uniformly():
    grid, draws = (6, 6), 1500
    losses = distinct_losses(4, grid)
    losses[1:3] = float("nan")                       # images 1, 2: first epoch
    freq = frequencies(lambda s: loss_guided_masks(4, grid, 0.5, 1.0, losses_bhw=losses,
                                                   generator=gen(s)).masked_bhw, draws)
    tolerance = 4 * (0.25 / draws) ** 0.5
    assert (freq[1:3] - 0.5).abs().max() < tolerance
    assert set(freq[0].flatten().tolist()) == {0.0, 1.0}   # measured: the top half, always
    # no table at all = every image unseen, with the same draws
    all_nan = torch.full((4, *grid), float("nan"))
    assert torch.equal(loss_guided_masks(4, grid, 0.5, 1.0, generator=gen(7)).masked_bhw,
                       loss_guided_masks(4, grid, 0.5, 1.0, losses_bhw=all_nan,
                                         generator=gen(7)).masked_bhw)


def test_measured_cells_come_before_unmeasured_ones():
    losses = distinct_losses(3, (4, 4)) - 100.0      # negative: NaN does not read as 0
    losses[:, 2:] = float("nan")                     # 8 measured cells per image
    masks = loss_guided_masks(3, (4, 4), 0.5, 1.0, losses_bhw=losses, generator=gen())
    assert masks.masked_bhw[:, :2].all() and not masks.masked_bhw[:, 2:].any()


def test_same_seed_same_masks_and_the_registry_entry():
    strategy = MASKINGS.get("loss-guided")
    assert strategy.reads_losses and not strategy.needs_regions
    assert set(strategy.params) == {"ratio", "hard_fraction"}
    assert MaskingParams().hard_fraction == 0.5
    assert not any(s.reads_losses for s in MASKINGS if s is not strategy)
    regions = torch.zeros(4, 64, 64, dtype=torch.bool)
    losses = distinct_losses(4, (4, 4))
    params = MaskingParams(ratio=0.75, hard_fraction=0.5)
    first = strategy.sample(regions, 16, params, gen(5), losses_bhw=losses).masked_bhw
    assert torch.equal(first, strategy.sample(regions, 16, params, gen(5),
                                              losses_bhw=losses).masked_bhw)
    assert not torch.equal(first, strategy.sample(regions, 16, params, gen(6),
                                                  losses_bhw=losses).masked_bhw)
    with pytest.raises(ValueError, match="hard-fraction"):
        MaskingParams(hard_fraction=1.5)
    with pytest.raises(ValueError, match="hard_fraction"):
        loss_guided_masks(1, (2, 2), 0.5, -0.1)


def test_the_cli_and_the_experiment_pass_hard_fraction():
    from mwm.cli import parse_args
    from mwm.cli.flags import config_from_args
    from mwm.experiment import parse_experiment
    from mwm.pretrain.config import PretrainConfig

    args = parse_args(["pretrain", "imgs", "--out", "o", "--masking", "loss-guided",
                       "--hard-fraction", "0.25"])
    cfg = config_from_args(PretrainConfig, args)
    assert (cfg.masking, cfg.hard_fraction, cfg.strategy.reads_losses) == ("loss-guided", 0.25,
                                                                            True)
    raw = {"name": "t", "data": {"images": "x"}, "pretrain": {}, "evaluate": [{"name": "e"}],
           "strategies": [{"name": "lg", "masking": "loss-guided", "ratio": 0.6,
                           "hard_fraction": 0.3}]}
    strategy = parse_experiment(raw).strategies[0]
    assert not strategy.reads_regions
    assert PretrainConfig(images="x", out="o", masking="loss-guided",
                          **strategy.params).hard_fraction == 0.3


# --------------------------------------------------------------------------- the table

def test_views_map_cells_between_the_crop_and_the_source():
    grid = (4, 4)
    cells = torch.arange(16)
    flipped = cells.view(4, 4).flip(1).flatten()
    assert torch.equal(view_to_source(views(IDENTITY), grid)[0], cells)
    assert torch.equal(source_to_view(views(IDENTITY), grid)[0], cells)
    assert torch.equal(view_to_source(views((0, 0, 1, 1, 1)), grid)[0], flipped)
    assert torch.equal(source_to_view(views((0, 0, 1, 1, 1)), grid)[0], flipped)
    # the right half, zoomed 2x: view columns 0-1 show source column 2, columns 2-3 column 3
    right = view_to_source(views((0, 0.5, 1, 0.5, 0)), grid)[0].view(4, 4)
    assert right[0].tolist() == [2, 2, 3, 3] and right[:, 0].tolist() == [2, 6, 10, 14]
    back = source_to_view(views((0, 0.5, 1, 0.5, 0)), grid)[0].view(4, 4)
    assert back[0].tolist() == [-1, -1, 1, 3]        # outside the crop: -1


def test_update_writes_masked_cells_and_keeps_the_rest():
    table = LossTable(5, (2, 2))
    assert not table.seen().any()
    index = torch.tensor([3, 1])
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    masked = torch.tensor([[True, False, True, False], [False, False, False, True]]).view(2, 2, 2)
    table.update(index, views(IDENTITY, IDENTITY), loss, masked)
    nan = float("nan")
    want = torch.tensor([[nan, nan, nan, nan], [nan, nan, nan, 8.0], [nan] * 4,
                         [1.0, nan, 3.0, nan], [nan] * 4])
    torch.testing.assert_close(table.loss_in, want, equal_nan=True, rtol=0, atol=0)
    assert table.seen().tolist() == [False, True, False, True, False]
    # a second visit, mirrored: view cell 1 is source cell 0; old values stay where visible
    table.update(torch.tensor([3]), views((0, 0, 1, 1, 1)), torch.tensor([[9.0, 10, 11, 12]]),
                 torch.tensor([[False, True, False, False]]).view(1, 2, 2))
    assert table.loss_in[3].tolist()[0] == 10.0 and table.loss_in[3].tolist()[2] == 3.0
    read = table.read(torch.tensor([3, 0]), views((0, 0, 1, 1, 1), IDENTITY))
    assert read[0].flatten()[1].item() == 10.0 and read[1].isnan().all()


def test_a_saved_table_of_another_size_is_refused():
    """Resuming after the training images changed in number (same settings otherwise)."""
    from mwm.errors import DataError

    saved = LossTable(5, (2, 2)).state()
    with pytest.raises(DataError, match=r"loss table is \(5, 4\).*needs \(4, 4\)"):
        LossTable(4, (2, 2)).restore(saved)
    restored = LossTable(5, (2, 2))
    restored.restore(saved.fill_(1.5))
    assert (restored.loss_in == 1.5).all()


# --------------------------------------------------------------------------- the loss path

def reference_loss(reconstruction, images, active, patch):
    """The masked loss as written before loss-guided masking (norm_pix_loss), in full."""
    from mwm.pretrain.spark import patchify

    target = patchify(images.float(), patch)
    pred = patchify(reconstruction.float(), patch)
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True, unbiased=True) + 1e-6).sqrt()
    l2 = (pred - ((target - mean) / std)).pow(2).mean(dim=-1)
    masked = (~active).flatten(1).to(l2.dtype)
    return (l2 * masked).sum() / (masked.sum() + 1e-8)


def decoder_output(model, images, active):
    caught = []
    handle = model.decoder.register_forward_hook(lambda m, i, out: caught.append(out))
    output = model(images, active)
    handle.remove()
    return output, caught[0]


def test_spark_and_mae_losses_are_unchanged_bit_for_bit():
    from mwm.masking import random_masks
    from mwm.pretrain.mae import MAEModel
    from mwm.pretrain.spark import SparKModel, unpatchify

    torch.manual_seed(0)
    images = torch.randn(3, 3, 64, 64, generator=gen(1))
    spark = SparKModel("resnet10t", input_size=64, decoder_width=32, mask_patch=16)
    active = random_masks(3, (4, 4), 0.6, generator=gen(2)).active_b1hw
    output, reconstruction = decoder_output(spark, images, active)
    assert torch.equal(output.loss, reference_loss(reconstruction, images, active, 16))
    assert output.cell_loss_bn.shape == (3, 16) and not output.cell_loss_bn.requires_grad
    mae = MAEModel("vit_tiny_patch16_224", input_size=32, patch_size=8, decoder_width=32,
                   decoder_depth=1)
    small = images[:, :, :32, :32]
    active = random_masks(3, (4, 4), 0.6, generator=gen(3)).active_b1hw
    output, pred_bnd = decoder_output(mae, small, active)
    reconstruction = unpatchify(pred_bnd, 8, (4, 4), 3)
    assert torch.equal(output.loss, reference_loss(reconstruction, small, active, 8))
    masked = (~active).flatten(1).float()
    assert torch.equal(output.loss, (output.cell_loss_bn * masked).sum() / (masked.sum() + 1e-8))


# --------------------------------------------------------------------------- pretraining

TINY = dict(model="resnet10t", input_size=64, decoder_width=32, batch_size=4, epochs=2, workers=0,
            amp="none", channels_last=False, checkpoint_every=1, log_every=1, quiet=True,
            device="cpu", warmup_epochs=0.5, stat_images=8, masking="loss-guided", mask_patch=8)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from mwm.data.phantoms import generate_phantoms

    out = tmp_path_factory.mktemp("ph")
    generate_phantoms(out, modality="brain-mri", n=20, size=64, seed=0, workers=1, progress=False)
    return out


def spy_on_masks(monkeypatch):
    """Record (step, losses read, masks drawn) of every micro-batch the trainer samples."""
    import mwm.pretrain.train as train

    calls, real = [], train.sample_masks

    def recording(cfg, regions, patch, step, rank, losses_bhw=None):
        masks = real(cfg, regions, patch, step, rank, losses_bhw)
        calls.append((step, losses_bhw.clone(), masks.masked_bhw.clone()))
        return masks

    monkeypatch.setattr(train, "sample_masks", recording)
    return calls


@pytest.fixture(scope="module")
def full_run(phantoms, tmp_path_factory):
    """Two uninterrupted epochs: (trainer, its run folder, the recorded mask calls)."""
    from mwm.pretrain.train import PretrainConfig, Trainer

    out = tmp_path_factory.mktemp("full")
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = spy_on_masks(monkeypatch)
        trainer = Trainer(PretrainConfig(images=str(phantoms), out=str(out), **TINY))
        trainer.run()
    return trainer, out, calls


def seen_indices(trainer, epochs):
    from mwm.engine import epoch_batches

    return {i for epoch in range(epochs)
            for batch in epoch_batches(len(trainer.dataset), 4, epoch, 0, trainer.dist,
                                       trainer.steps_per_epoch) for i in batch}


def test_pretraining_fills_the_table_and_masks_the_hard_cells_next_epoch(full_run):
    from mwm.pretrain.train import load_checkpoint

    trainer, out, calls = full_run
    spe = trainer.steps_per_epoch
    assert len(calls) == 2 * spe
    assert all(losses.isnan().all() for step, losses, _ in calls if step < spe)  # first epoch
    table = load_checkpoint(out)["loss_table"]
    assert table.shape == (len(trainer.dataset), 64)
    seen = seen_indices(trainer, 2)
    assert {i for i, row in enumerate(table) if not row.isnan().all()} == seen
    assert (table[sorted(seen)].nan_to_num() > 0).any(1).all()
    k_hard = int(exact_count(exact_count(torch.tensor(64), 0.6), 0.5))   # 19 of 38
    gaps, first_visits = [], 0
    for step, losses, masked in calls[spe:]:                             # second epoch
        for loss_n, masked_n in zip(losses.flatten(1), masked.flatten(1)):
            measured = ~loss_n.isnan()
            if not measured.any():              # an image the first epoch left out
                first_visits += 1
                continue
            assert measured.sum() >= k_hard     # ~60 % of the cells were masked last time
            hardest = torch.where(measured, loss_n, -1.0).topk(k_hard).indices
            assert masked_n[hardest].all()
            gaps.append(loss_n[measured & masked_n].mean() - loss_n[measured & ~masked_n].mean())
    assert first_visits == len(seen) - len(seen_indices(trainer, 1)) and len(gaps) >= 8
    gaps = torch.stack(gaps)
    assert (gaps > 0).float().mean() > 0.9 and gaps.mean() > 0


def test_resume_restores_the_table_and_repeats_the_masks(full_run, phantoms, tmp_path,
                                                         monkeypatch):
    from mwm.pretrain.train import PretrainConfig, Trainer, load_checkpoint, pretrain

    trainer, full_out, full_calls = full_run
    calls = spy_on_masks(monkeypatch)
    common = dict(images=str(phantoms), out=str(tmp_path), **TINY)
    pretrain(PretrainConfig(max_steps=trainer.steps_per_epoch, **common))
    saved = load_checkpoint(tmp_path)["loss_table"]
    assert not saved.isnan().all()
    resumed = Trainer(PretrainConfig(resume="auto", **common))
    torch.testing.assert_close(resumed.losses.loss_in, saved, equal_nan=True, rtol=0, atol=0)
    resumed.run()
    assert [c[0] for c in calls] == [c[0] for c in full_calls]
    for (_, losses_a, masks_a), (_, losses_b, masks_b) in zip(calls, full_calls):
        torch.testing.assert_close(losses_a, losses_b, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(masks_a, masks_b)
    torch.testing.assert_close(load_checkpoint(tmp_path)["loss_table"],
                               load_checkpoint(full_out)["loss_table"],
                               equal_nan=True, rtol=0, atol=0)


def test_checkpoints_from_before_hard_fraction_still_resume():
    from mwm.pretrain.train import PretrainConfig, saved_settings

    mine = PretrainConfig(images="x", out="o", masking="random").to_dict()
    old = {k: v for k, v in mine.items() if k != "hard_fraction"}
    assert saved_settings(old) == mine
    assert saved_settings({**old, "hard_fraction": 0.9})["hard_fraction"] == 0.9


def _two_ranks(rank, init, out):
    """One of two gloo processes: each updates the shared table with its own batch."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    table = LossTable(6, (2, 2))
    index = torch.tensor([rank * 3, rank * 3 + 1])                    # 0, 1 | 3, 4
    loss = torch.arange(8, dtype=torch.float32).view(2, 4) + 10 * rank
    masked = torch.tensor([[True, True, False, False], [False, True, True, True]]).view(2, 2, 2)
    table.update(index, views(IDENTITY, (0, 0, 1, 1, 1)), loss, masked, world=2)
    torch.save(table.state(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_gather_every_batch_into_one_table(tmp_path):
    """Under torchrun each rank sees its share of a global batch; after an update every
    rank holds the rows of all of them, identical on both (rank 0 saves them)."""
    import torch.multiprocessing as mp

    mp.start_processes(_two_ranks, args=(f"file://{tmp_path}/rendezvous", str(tmp_path)),
                       nprocs=2, start_method="fork")  # fork: no re-import of torch per child
    tables = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    torch.testing.assert_close(tables[0], tables[1], equal_nan=True, rtol=0, atol=0)
    one = LossTable(6, (2, 2))                       # the same four images in one process
    masked = torch.tensor([[True, True, False, False], [False, True, True, True]]).view(2, 2, 2)
    for rank in (0, 1):
        one.update(torch.tensor([rank * 3, rank * 3 + 1]), views(IDENTITY, (0, 0, 1, 1, 1)),
                   torch.arange(8, dtype=torch.float32).view(2, 4) + 10 * rank, masked)
    torch.testing.assert_close(tables[0], one.state(), equal_nan=True, rtol=0, atol=0)
    assert one.seen().tolist() == [True, True, False, True, True, False]
