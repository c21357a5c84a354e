"""BSS, batch spectral shrinkage (Chen, Wang, Fu, Long, Wang, NeurIPS 2019, "Catastrophic
forgetting meets negative transfer"): penalise the smallest singular values of the batch's feature
matrix, whose directions carry the pretrained knowledge that does not transfer.

    Omega(F) = eta * sum_{i=1..k} sigma_{-i}(F)^2

``F`` (B x C) holds one feature vector per sample; ``sigma_{-i}`` are its k smallest singular
values. Defaults k = 1, eta = 1e-3 (the paper's). Features: the input of the classifier for
classification; for a U-Net the bottleneck (the last encoder stage) averaged over its positions,
one row per sample (docs/baselines.md). With batch size B there are min(B, C) singular values.

Under DDP each rank holds only its share of the batch (nnU-Net splits the batch over the GPUs:
batch 2 on 2 GPUs is one sample per rank, and the one singular value of a 1 x C matrix is its norm,
which would turn BSS into a feature-norm penalty). :func:`bss_penalty` with ``rows_per_rank``
therefore gathers the rows of every rank first (:func:`gather_rows`) and penalises the spectrum of
the global batch, as one process with the whole batch would; the gradients are those of that one
penalty (checked against a one-process run in ``tests/test_distributed.py``).

On CUDA ``torch.linalg.svdvals`` waits for the GPU once per call (torch checks the solver's
convergence on the host).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from nnunet_acnorm.finetuning.features import pooled
from nnunet_acnorm.norms.torch_compat import autocast_off

BSS_K = 1
BSS_ETA = 1e-3


def bss_penalty(features: Tensor, k: int = BSS_K, eta: float = BSS_ETA, rows_per_rank: Sequence[int] | None = None,
                group=None) -> Tensor:
    """eta * (sum of the k smallest squared singular values) of ``pooled(features)`` (at least
    float32: half-precision features of an autocast step are cast up).

    Args:
        features: (B, C, *spatial) or (B, C), this process's samples.
        rows_per_rank: in a distributed run, the number of samples of every rank (rank order; this
            rank's must be B): the penalty is then that of all ranks' samples together, the same
            value on every rank. None (or one rank): this process's samples only.
        group: the process group (default: the whole world).

    Examples:
        >>> bss_penalty(torch.eye(3)[:2] * torch.tensor([[2.0], [1.0]]))   # sigma = (2, 1): 1e-3 * 1
        tensor(0.0010)
    """
    matrix = pooled(features)
    if matrix.dtype not in (torch.float32, torch.float64):
        matrix = matrix.float()
    if rows_per_rank is not None and len(rows_per_rank) > 1:
        matrix = gather_rows(matrix, rows_per_rank, group)
    with autocast_off(matrix.device.type):
        sigma = torch.linalg.svdvals(matrix)  # descending
    k = min(int(k), sigma.numel())
    return eta * sigma[sigma.numel() - k:].pow(2).sum()


def gather_rows(matrix: Tensor, rows_per_rank: Sequence[int], group=None) -> Tensor:
    """The rows of ``matrix`` of every rank, stacked in rank order (sum(rows_per_rank) x C), on
    every rank. Differentiable: the gradient a rank's own rows receive is the sum of the gradients
    every rank computes for them, so that after DDP averages the parameter gradients over the W
    ranks, a penalty every rank computes on the gathered rows has exactly the gradient of that
    penalty in one process."""
    rows = [int(n) for n in rows_per_rank]
    group = group or dist.group.WORLD
    rank = dist.get_rank(group)
    if len(rows) != dist.get_world_size(group) or rows[rank] != matrix.shape[0]:
        raise ValueError(f"gather_rows: rows_per_rank {rows} does not fit {dist.get_world_size(group)} ranks with "
                         f"{matrix.shape[0]} row(s) on rank {rank}")
    return _GatherRows.apply(matrix, tuple(rows), rank, group)


class _GatherRows(torch.autograd.Function):
    """all_gather of rows (padded to the largest count), backward: all_reduce, own rows."""

    @staticmethod
    def forward(ctx, matrix, rows, rank, group):
        padded = matrix.new_zeros((max(rows),) + tuple(matrix.shape[1:]))
        padded[:matrix.shape[0]] = matrix
        parts = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(parts, padded, group=group)
        ctx.rows, ctx.rank, ctx.group = rows, rank, group
        return torch.cat([part[:n] for part, n in zip(parts, rows)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)   # every rank's gradient of every row, summed
        start = sum(ctx.rows[:ctx.rank])
        return grad[start:start + ctx.rows[ctx.rank]], None, None, None
