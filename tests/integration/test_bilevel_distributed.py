"""HDKD under torch.distributed: 2 gloo processes keep φ and the model bit-identical (issue 5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import hdkd_fast as hk
from hdkd_fast.bilevel import HDKD

WORLD = 2
STEPS = 4


class MLP(nn.Module):
    num_exits = 3

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6 if i == 0 else 8, 8), nn.BatchNorm1d(8), nn.Tanh())
                                    for i in range(3))
        self.heads = nn.ModuleList(nn.Linear(8, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for block, head in zip(self.blocks, self.heads, strict=True):
            x = block(x)
            out.append(head(x))
        return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # same initial model on every rank
        model = DistributedDataParallel(MLP().double())
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        # "fd" (not the default "jvp") only to skip the seconds-long first use of forward-mode AD in each
        # process; the distributed logic does not depend on the mode.
        hdkd = HDKD(model, opt, criterion=hk.DenseKD(temperature=2.0, backend="torch"), hypergrad="fd",
                    validation="balanced")
        with pytest.raises(ValueError, match="reuse_inner_gradient"):
            HDKD(model, opt, reuse_inner_gradient=True)
        g = torch.Generator().manual_seed(1000 + rank)  # every rank sees its own shard
        norms = []
        for _ in range(STEPS):
            x, xv = torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randn(7, 6, generator=g,
                                                                                     dtype=torch.float64)
            y, yv = torch.randint(0, 4, (9,), generator=g), torch.randint(0, 4, (7,), generator=g)
            norms.append(hdkd.hypergradient(x, y, xv, yv)[0].norm())  # local: differs between ranks
            hdkd.step(x, y, xv, yv)
        torch.save({"phi": hdkd.weights.phi.detach(), "model": hdkd.module.state_dict(),
                    "ema": hdkd.val_ema, "local_norms": torch.stack(norms)}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_keep_phi_and_model_identical(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert not torch.equal(r0["phi"], torch.zeros_like(r0["phi"]))  # φ moved
    assert torch.equal(r0["phi"], r1["phi"])
    assert torch.equal(r0["ema"], r1["ema"])
    assert r0["model"].keys() == r1["model"].keys()
    for name in r0["model"]:
        if "running" in name:  # BatchNorm statistics are per rank (DDP broadcasts rank 0's at forward)
            continue
        assert torch.equal(r0["model"][name], r1["model"][name]), name
    assert not torch.equal(r0["local_norms"], r1["local_norms"])  # the shards really differ
