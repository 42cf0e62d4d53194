"""EarlyExitLM under DistributedDataParallel: 2 gloo processes, each with half of a batch, get the gradients of
one process on the whole batch, with and without find_unused_parameters (docs/lm.md, "What composes")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from hdkd_fast.lm import EarlyExitLM
from tests.support.hf import require_transformers

transformers = require_transformers()

WORLD, V, T = 2, 97, 8


def tiny() -> Any:
    torch.manual_seed(0)  # the same model in every process
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    return transformers.LlamaForCausalLM(config).double().train()


def whole_batch(step: int) -> dict[str, Tensor]:
    """4 rows; rows r and r + 2 have the same padding and ignored-label counts, so both halves (rows 0-1, 2-3)
    have as many loss rows and labelled tokens, and the mean of the halves' losses is the whole batch's."""
    g = torch.Generator().manual_seed(10 + step)
    ids = torch.randint(1, V, (4, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100
    labels[3, 5] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(model: torch.nn.Module, rows: slice) -> list[dict[str, Tensor]]:
    """Two SGD steps on ``rows`` of each step's batch; the gradients of each step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for step in range(2):  # step 2 would fail without find_unused_parameters if a parameter had no gradient
        loss = model(**{k: v[rows] for k, v in whole_batch(step).items()}).loss
        opt.zero_grad()
        loss.backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        half = slice(2 * rank, 2 * rank + 2)
        result = {}
        for find_unused in (False, True):
            ddp = DistributedDataParallel(EarlyExitLM(tiny(), exit_layers=(1, 2)), find_unused_parameters=find_unused)
            result[find_unused] = [{n.removeprefix("module."): g for n, g in step.items()}
                                   for step in train(ddp, half)]
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_halves_give_the_whole_batch_gradients(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    wrapper = EarlyExitLM(tiny(), exit_layers=(1, 2))
    want = train(wrapper, slice(None))
    names = {n for n, _ in wrapper.named_parameters()}
    assert all(set(step) == names for step in want)  # every parameter gets a gradient: no unused parameters
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for find_unused in (False, True):
            for step, (g_step, w_step) in enumerate(zip(got[find_unused], want, strict=True)):
                assert set(g_step) == names
                for name in names:
                    torch.testing.assert_close(g_step[name], w_step[name], rtol=1e-10, atol=1e-13,
                                               msg=f"rank {rank}, find_unused={find_unused}, step {step}: {name}")
