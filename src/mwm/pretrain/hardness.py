"""The loss table of ``--masking loss-guided``: each image's last reconstruction loss per cell.

:func:`mwm.masking.loss_guided_masks` masks the cells that were hardest to reconstruct;
this module remembers how hard they were. :class:`LossTable` holds one float32 row per
training image (keyed by the image's dataset index) and one column per cell of the mask
grid, NaN where nothing was measured yet:

* **read** (before a batch's masks are drawn): the batch's rows, as seen through each
  item's crop, become ``losses_bhw`` for the sampler. An image not seen yet reads all
  NaN and is masked uniformly at random (the whole first epoch).
* **update** (after the forward pass): every cell the batch masked gets the loss the model
  just measured there (``output.cell_loss_bn``, the per-cell error whose masked mean is
  the training loss); cells left visible keep their old value.

**The source frame.** Pretraining crops and flips every item anew each epoch
(``pretrain.data.Augment``), so grid cell ``(i, j)`` of this epoch's view is not the
anatomy it was in the last one. The table is therefore kept on a grid over the whole
source image, and each item's view (``RegionImageDataset(views=True)``: crop box and flip
as fractions of the source size) maps between the two by nearest cell centre: a view cell
reads the source cell under its centre; a source cell whose centre lies in the crop takes
the loss of the view cell under it (a cell outside the crop keeps its value). Without
augmentation the map is the identity.

**Distributed.** Each rank sees its share of every global batch, and the images move
between ranks from epoch to epoch. :meth:`LossTable.update` therefore all-gathers the
(index, view, per-cell loss, mask) of every rank's micro-batch and applies them all, in
rank order, on every rank: all ranks hold the same full table, and rank 0 saves it with
the checkpoint.

Memory: images × cells × 4 bytes on the training device (10 000 images on a 14 x 14
grid: 7.8 MB; 1.28 M images: 1 GB).
"""

from __future__ import annotations

import torch

from ..errors import DataError

__all__ = ["LossTable", "view_to_source", "source_to_view"]


def _centres(cells: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(cells, dtype=torch.float64, device=device) + 0.5) / cells


def _cell(position: torch.Tensor, cells: int) -> torch.Tensor:
    return (position * cells).floor().long().clamp_(0, cells - 1)


def view_to_source(view_b5: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N) long: the source cell under the centre of each view cell (row-major)."""
    gh, gw = grid
    top, left, height, width, flip = view_b5.double().unbind(1)
    rows_bh = top[:, None] + height[:, None] * _centres(gh, view_b5.device)[None]
    cols_w = _centres(gw, view_b5.device)[None]
    cols_bw = torch.where(flip[:, None] > 0.5, 1.0 - cols_w, cols_w)  # mirrored after the crop
    x_bw = left[:, None] + width[:, None] * cols_bw
    index_bhw = _cell(rows_bh, gh)[:, :, None] * gw + _cell(x_bw, gw)[:, None, :]
    return index_bhw.flatten(1)


def source_to_view(view_b5: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N) long: the view cell under the centre of each source cell, -1 outside the crop."""
    gh, gw = grid
    top, left, height, width, flip = view_b5.double().unbind(1)
    v_bh = (_centres(gh, view_b5.device)[None] - top[:, None]) / height[:, None]
    u_bw = (_centres(gw, view_b5.device)[None] - left[:, None]) / width[:, None]
    inside_bhw = ((v_bh >= 0) & (v_bh < 1))[:, :, None] & ((u_bw >= 0) & (u_bw < 1))[:, None, :]
    u_bw = torch.where(flip[:, None] > 0.5, 1.0 - u_bw, u_bw)
    index_bhw = _cell(v_bh, gh)[:, :, None] * gw + _cell(u_bw, gw)[:, None, :]
    return torch.where(inside_bhw, index_bhw, -1).flatten(1)


class LossTable:
    """``loss_in``: float32 (n_images, gh * gw) on ``device``, NaN = not measured."""

    def __init__(self, n_images: int, grid: tuple[int, int], device: torch.device | str = "cpu"):
        self.grid = (int(grid[0]), int(grid[1]))
        self.loss_in = torch.full((n_images, self.grid[0] * self.grid[1]), float("nan"),
                                  dtype=torch.float32, device=device)

    def read(self, index_b: torch.Tensor, view_b5: torch.Tensor) -> torch.Tensor:
        """(B, gh, gw): the rows of the batch's images, each on its own view's grid."""
        rows_bn = self.loss_in.index_select(0, index_b)
        return rows_bn.gather(1, view_to_source(view_b5, self.grid)).view(-1, *self.grid)

    def update(self, index_b: torch.Tensor, view_b5: torch.Tensor, cell_loss_bn: torch.Tensor,
               masked_bhw: torch.Tensor, world: int = 1) -> None:
        """Write the batch's measured losses on its masked cells (all ranks' when ``world > 1``)."""
        if world > 1:
            index_b, view_b5, cell_loss_bn, masked_bhw = _gather_ranks(
                index_b, view_b5, cell_loss_bn, masked_bhw, world=world)
        to_view_bn = source_to_view(view_b5, self.grid)
        safe_bn = to_view_bn.clamp_min(0)
        hit_bn = (to_view_bn >= 0) & masked_bhw.flatten(1).bool().gather(1, safe_bn)
        measured_bn = cell_loss_bn.detach().float().gather(1, safe_bn)
        rows_bn = self.loss_in.index_select(0, index_b)
        # Indices are distinct within a (global) batch, so rows are written once each.
        self.loss_in.index_copy_(0, index_b, torch.where(hit_bn, measured_bn, rows_bn))

    def seen(self) -> torch.Tensor:
        """(n_images,) bool: images with at least one measured cell."""
        return ~self.loss_in.isnan().all(1)

    def state(self) -> torch.Tensor:
        """The table for a checkpoint (a CPU tensor: safe for ``weights_only`` loading)."""
        return self.loss_in.detach().cpu()

    def restore(self, saved: torch.Tensor) -> None:
        if tuple(saved.shape) != tuple(self.loss_in.shape):
            raise DataError(f"--resume: the checkpoint's loss table is {tuple(saved.shape)} "
                            f"(images x cells) but this run needs {tuple(self.loss_in.shape)}; "
                            "resume with the same images and sizes or start a new run folder.")
        self.loss_in.copy_(saved.to(self.loss_in.device, torch.float32))


def _gather_ranks(index_b, view_b5, cell_loss_bn, masked_bhw, *, world: int):
    """Every rank's batch, concatenated in rank order (one all-gather of packed float64:
    indices exact up to 2**53, float32 losses exact)."""
    import torch.distributed as torch_dist

    batch = index_b.shape[0]
    parts = (index_b.reshape(batch, 1), view_b5, cell_loss_bn.detach().float(),
             masked_bhw.reshape(batch, -1))
    packed = torch.cat([p.to(torch.float64) for p in parts], dim=1)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    torch_dist.all_gather(gathered, packed)
    packed = torch.cat(gathered, dim=0)
    n_cells = cell_loss_bn.shape[1]
    index, view, loss, masked = packed.split([1, 5, n_cells, n_cells], dim=1)
    return index[:, 0].long(), view, loss.float(), masked > 0.5
