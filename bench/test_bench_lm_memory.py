"""Peak memory and time of one early-exit LM training step (issue 25) against the stock last-layer CE step.

One small Hugging Face ``LlamaForCausalLM`` built from a config (no download): 4 decoder layers, hidden 256,
4 attention heads (4 KV heads), MLP 1024, untied input and output embeddings (Llama's default), fp32,
``sdpa`` attention. A step is forward and backward into every parameter (gradients set to ``None`` first, as
``zero_grad()`` does; no optimizer step) on ``B × T`` random token ids, labels = the ids (shifted inside, so
``N = B·(T − 1)`` predicted positions). Cells (``impl``):

- ``ce``: stock Hugging Face, ``model(ids, labels=ids).loss.backward()``: the last layer's cross-entropy on
  materialized ``[B, T, V]`` logits.
- ``fused``: ``EarlyExitLM(model, exit_layers=(1, 2, 3))``, 4 exits (after layers 1, 2, 3, 4), every exit's CE
  plus dense KD between all 6 pairs (T = 2, weights 1) through ``FusedLinearDenseKD`` at its default chunk
  size (``chunk_size_for``: 256 MiB for 4 fp32 ``[K, c, V]`` buffers).
- ``fused-c32``: the same with ``chunk_size=32``.
- ``materialized``: the same loss on materialized logits: each exit's ``lm_head(norm(h_E))`` ``[N, V]``, then
  ``hk.dense_kd`` on the four (what the fused op saves).

Sanity, asserted on the warm-up step with float32 tolerances: every loss is finite, the fused cells'
last-exit CE equals ``ce``'s loss (same model, same batch) and ``materialized``'s loss equals the fused one.

Grids: ``pytest bench/`` V = 4000, B × T = 2 × 256, hidden 64, MLP 256; ``--full`` the issue's cell, V = 32000,
B × T = 4 × 1024 (N = 4092); ``--tiny`` a dry run. Peak extra memory (``extra_info["peak_extra_bytes"]``,
``bench/peak_memory.py``): on the CPU a fresh process (this file as a script) builds the model and the batch,
runs a tiny warm-up step, then measures one step's peak resident set above everything resident before it
(interpreter, torch, parameters, inputs); on CUDA ``max_memory_allocated`` above what was allocated before
the step. Time: pytest-benchmark, rounds of one step after the warm-up step.

``python bench/test_bench_lm_memory.py --impl ce --grid full --breakdown`` prints instead the tensors alive at
the peak of the step (``peak_memory.live_tensor_peak``), grouped by the op that made them.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from peak_memory import available_bytes, cuda_peak, live_tensor_peak, peak_in_subprocess, peak_rss
from torch import Tensor, nn

import hdkd_fast as hk
from hdkd_fast.fused_linear import DEFAULT_CHUNK_BUDGET_BYTES, chunk_size_for
from hdkd_fast.lm import EarlyExitLM

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = {"ce": None, "fused": None, "fused-c32": 32, "materialized": None}
"""Each cell and the ``chunk_size`` its ``EarlyExitLM`` passes (``None``: the default)."""
EXIT_LAYERS = (1, 2, 3)
TEMPERATURE = 2.0


class Shape(NamedTuple):
    vocab: int
    batch: int
    seq: int
    hidden: int
    mlp: int
    heads: int
    layers: int = 4

    @property
    def id(self) -> str:
        return f"V{self.vocab}-{self.batch}x{self.seq}-H{self.hidden}"


GRIDS = {
    "full": Shape(vocab=32000, batch=4, seq=1024, hidden=256, mlp=1024, heads=4),
    "quick": Shape(vocab=4000, batch=2, seq=256, hidden=64, mlp=256, heads=4),
    "tiny": Shape(vocab=64, batch=2, seq=16, hidden=16, mlp=32, heads=2),
}


def grid_name(full: bool, tiny: bool) -> str:
    return "tiny" if tiny else "full" if full else "quick"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "grid" not in metafunc.fixturenames:
        return
    name = grid_name(bool(metafunc.config.getoption("--full")), bool(metafunc.config.getoption("--tiny")))
    metafunc.parametrize("grid", [pytest.param(name, id=GRIDS[name].id)])
    metafunc.parametrize("impl", list(IMPLS))


def build(shape: Shape) -> tuple[nn.Module, Tensor]:
    """The model (seeded: the same weights in every process) and a batch of random ids ``[B, T]``."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=shape.seq, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g).to(DEVICE)
    return model, ids


def make_step(impl: str, model: nn.Module) -> Callable[[Tensor], tuple[Tensor, Tensor | None]]:
    """One training step of ``impl`` on ids ``[B, T]``: the parameters' gradients set to ``None``, the loss,
    its backward. Returns the loss and the last exit's cross-entropy (``None`` for ``materialized``), detached."""
    wrapper = EarlyExitLM(model, EXIT_LAYERS, temperature=TEMPERATURE, chunk_size=IMPLS[impl])
    head: Any = model.lm_head

    def step(ids: Tensor) -> tuple[Tensor, Tensor | None]:
        for p in model.parameters():
            p.grad = None
        last: Tensor | None
        if impl == "ce":
            loss = model(ids, labels=ids).loss
            last = loss
        elif impl == "materialized":
            target = ids[:, 1:].reshape(-1)
            logits = [head(h[:, :-1]).flatten(0, 1) for h in wrapper.exit_hidden_states(ids)]
            loss, last = hk.dense_kd(logits, target, temperature=TEMPERATURE, pairs="dense"), None
        else:
            out = wrapper(ids)
            assert out.exit_losses.ce is not None
            loss, last = out.loss, out.exit_losses.ce[-1]
        loss.backward()
        return loss.detach(), (last.detach() if last is not None else None)
    return step


def params_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def estimated_bytes(impl: str, shape: Shape) -> int:
    """A rough upper bound of one step's extra memory in fp32 (for skipping): the parameters' gradients and
    the decoder's saved activations, plus ``ce``: 4 ``[B·T, V]`` buffers (logits, log-softmax, their
    gradients); ``fused``: the chunk budget; ``materialized``: 4 such buffers per exit."""
    n = shape.batch * shape.seq
    base = 2 * (shape.vocab * shape.hidden * 2 + shape.layers * (4 * shape.hidden + 3 * shape.mlp) * shape.hidden) * 4
    base += shape.layers * (12 * shape.hidden + 4 * shape.mlp) * n * 4
    logits = n * shape.vocab * 4
    if impl == "ce":
        return base + 4 * logits
    if impl == "materialized":
        return base + 4 * (len(EXIT_LAYERS) + 1) * logits
    return base + DEFAULT_CHUNK_BUDGET_BYTES


def test_lm_training_step_memory(benchmark, tiny_grid: bool, full_grid: bool, impl: str, grid: str) -> None:
    shape = GRIDS[grid]
    need = estimated_bytes(impl, shape)
    if need > 0.8 * available_bytes(DEVICE):
        pytest.skip(f"needs ~{need / 1e9:.1f} GB, more than 80 % of the {available_bytes(DEVICE) / 1e9:.1f} GB "
                    "available")
    model, ids = build(shape)
    num_exits = len(EXIT_LAYERS) + 1
    chunk = IMPLS[impl] if IMPLS[impl] is not None else chunk_size_for(num_exits, shape.vocab, torch.float32)
    info: dict[str, object] = dict(
        impl=impl, V=shape.vocab, B=shape.batch, T=shape.seq, N=shape.batch * (shape.seq - 1), H=shape.hidden,
        mlp=shape.mlp, layers=shape.layers, exits=1 if impl == "ce" else num_exits,
        chunk_size=None if impl in ("ce", "materialized") else min(chunk, shape.batch * (shape.seq - 1)),
        tied_embeddings=False, dtype="float32", device=DEVICE.type, attn=model.config._attn_implementation,
        params_bytes=params_bytes(model), logits_bytes=shape.batch * shape.seq * shape.vocab * 4)
    if DEVICE.type == "cpu":
        info.update(peak_in_subprocess(__file__, ["--impl", impl, "--grid", grid]))
    step = make_step(impl, model)
    loss, last = step(ids)  # warm-up, and the sanity checks
    assert torch.isfinite(loss), f"{impl}: loss {loss}"
    with torch.no_grad():
        if impl.startswith("fused"):
            assert last is not None
            torch.testing.assert_close(last, model(ids, labels=ids).loss)
        elif impl == "materialized":
            wrapper = EarlyExitLM(model, EXIT_LAYERS, temperature=TEMPERATURE)
            torch.testing.assert_close(loss, wrapper(ids).loss)
    info.update(loss=loss.item(), last_exit_ce=last.item() if last is not None else None)
    if DEVICE.type == "cuda":
        info["peak_extra_bytes"] = cuda_peak(lambda: step(ids))

    def timed() -> None:
        step(ids)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"LM training step {shape.id} L{shape.layers} {DEVICE.type}"
    benchmark.extra_info.update(info)
    benchmark.pedantic(timed, rounds=1 if tiny_grid else 2 if full_grid else 3, iterations=1, warmup_rounds=0)


def main() -> None:
    """``python bench/test_bench_lm_memory.py --impl fused --grid full``: the peak-RSS measurement of one cell
    (``--breakdown``: the tensors alive at its peak instead), printed as one JSON line."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--impl", choices=list(IMPLS), required=True)
    parser.add_argument("--grid", choices=list(GRIDS), required=True)
    parser.add_argument("--breakdown", action="store_true")
    args = parser.parse_args()
    model, ids = build(GRIDS[args.grid])
    step = make_step(args.impl, model)
    step(ids[:1, :16])  # loads the extension, initializes what is lazy
    for p in model.parameters():
        p.grad = None
    start = time.perf_counter()
    if args.breakdown:
        result = live_tensor_peak(lambda: step(ids), ignore=[*model.parameters(), ids])
    else:
        result = peak_rss(lambda: step(ids))
    print(json.dumps({**result, "step_s": round(time.perf_counter() - start, 3)}))


if __name__ == "__main__":
    main()
