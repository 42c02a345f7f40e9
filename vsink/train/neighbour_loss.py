"""The SINDER neighbour loss (Wang et al., ECCV 2024; the reference's ``neighbor_loss.py``): on one
image's patch grid after a block, the patches whose direction is anomalously close to that
block's defect direction are pulled toward a weighted average of their 3×3 neighbourhood.

For a grid ``x`` [h, w, D] and the unit defect direction ``d``:

* ``c = |cos(x_ij, d)|``; a patch is *anomalous* when ``c_ij > mean(c) + sigmas·std(c)`` (mean and
  unbiased standard deviation over the image's patches), patches on the grid's border excepted;
* its target is ``T_ij = Σ_k g_k p_k x_k / Σ_k g_k p_k`` over its 3×3 window, ``p = exp(−c / temperature)``
  (near-direction patches, itself included, get little weight) and ``g`` the 3×3 Gaussian
  ``[[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16``;
* the loss is ``mean_ij ‖x_ij − T_ij‖ / α`` over the anomalous patches, ``α`` the mean norm of the
  interior patches. Cosines, mask, targets and ``α`` carry no gradient; only ``x_ij`` does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

#: the 3×3 Gaussian of the neighbour average
GAUSSIAN_3X3 = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16


def abs_cosines(grid: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``|cos|`` [h, w] of every patch of ``grid`` [h, w, D] with ``direction`` [D]."""
    d = direction.to(grid.device, grid.dtype)
    return (F.normalize(grid, dim=-1) * F.normalize(d, dim=0)).sum(-1).abs()


def anomalous(grid: torch.Tensor, direction: torch.Tensor, sigmas: float) -> torch.Tensor:
    """Bool [h, w]: the anomalous patches (module docstring; border patches never)."""
    with torch.no_grad():
        c = abs_cosines(grid.detach().float(), direction.float())
        mask = c > c.mean() + sigmas * c.std()
        mask[0, :] = mask[-1, :] = False
        mask[:, 0] = mask[:, -1] = False
    return mask


def neighbour_targets(grid: torch.Tensor, direction: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T`` [h − 2, w − 2, D]: each interior patch's weighted 3×3 neighbourhood average."""
    with torch.no_grad():
        x = grid.detach().float()
        p = torch.exp(-abs_cosines(x, direction.float()) / temperature)
        weights = p.unfold(0, 3, 1).unfold(1, 3, 1) * GAUSSIAN_3X3.to(p.device)  # [h-2, w-2, 3, 3]
        weights = weights / weights.sum(dim=(-1, -2), keepdim=True)
        windows = x.unfold(0, 3, 1).unfold(1, 3, 1)  # [h-2, w-2, D, 3, 3]
        return (windows * weights[:, :, None]).sum(dim=(-1, -2))


def neighbour_loss(grid: torch.Tensor, direction: torch.Tensor, *, sigmas: float = 4.0,
                   temperature: float = 0.1) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(the loss, or None when no patch is anomalous; the anomalous mask [h, w]) of one image's
    patch grid ``grid`` [h, w, D] after a block with defect direction ``direction`` [D]."""
    if grid.shape[0] < 3 or grid.shape[1] < 3:
        return None, torch.zeros(grid.shape[:2], dtype=torch.bool, device=grid.device)
    mask = anomalous(grid, direction, sigmas)
    if not mask.any():
        return None, mask
    rows, cols = torch.nonzero(mask, as_tuple=True)
    targets = neighbour_targets(grid, direction, temperature)
    with torch.no_grad():
        alpha = grid.detach().float()[1:-1, 1:-1].norm(dim=-1).mean()
    loss = (grid[rows, cols].float() - targets[rows - 1, cols - 1]).norm(dim=-1).mean() / alpha
    return loss, mask
