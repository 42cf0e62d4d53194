"""Collectives shared by the bilevel loop and the training methods."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def all_reduce_mean(tensors: list[Tensor], group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """The mean over the ranks of ``group`` of every tensor, in one collective: flattened into one
    buffer (in the first tensor's dtype), all-reduced, divided by the world size, and split back into
    tensors of the original shapes and dtypes."""
    flat = torch.cat([t.to(tensors[0].dtype).reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()
    return out
