"""hdkd_fast.HDKD on hdkd_fast.lm.EarlyExitLM (a model that defines its own objectives through the fused
shared-head op), in float64 on a tiny Hugging Face Llama and Qwen2: the "fd" hypergradient against the
reverse-mode ("exact") hypergradient of the same model with materialized logits, full steps against the logits
path, and the argument errors."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import hdkd_fast as hk
from hdkd_fast.lm import EarlyExitLM, next_token_targets
from tests.support.hf import require_transformers

transformers = require_transformers()

V = 61
ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def tiny(arch: str, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config, cls = ARCHS[arch]
    model = getattr(transformers, cls)(getattr(transformers, config)(
        vocab_size=V, hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=6, pad_token_id=0, eos_token_id=None, bos_token_id=None,
        attn_implementation=CAUSAL_ATTENTION))
    with torch.no_grad():  # move the norms off 1 and the weights off their tiny init, so every term matters
        for name, p in model.named_parameters():
            p.add_((0.3 if "norm" in name else 0.05) * torch.randn_like(p))
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_norm_in_input_dtype, module)
    return model.double().train()


def causal_attention_in_input_dtype(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                                    scaling: float, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """softmax(q kᵀ · scaling + causal mask) v in the inputs' dtype, twice differentiable (the reference's
    "exact" mode; SDPA on CPU has no double backward, and HF's eager attention takes its softmax in float32).
    Causal only: these batches have no padding."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(2, 3) * scaling
    t = scores.shape[-1]
    future = torch.ones(t, t, dtype=torch.bool, device=scores.device).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    return (weights @ value).transpose(1, 2).contiguous(), weights


CAUSAL_ATTENTION = "hdkd_test_causal"
transformers.AttentionInterface.register(CAUSAL_ATTENTION, causal_attention_in_input_dtype)


def rms_norm_in_input_dtype(self: Any, x: Tensor) -> Tensor:
    """Llama's RMSNorm, w x / sqrt(mean(x²) + ε), in x's dtype. Hugging Face's computes it in float32 whatever
    the dtype, which would cap this float64 test at float32 precision (and "fd" sizes its step by the dtype:
    docs/hdkd.md)."""
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class MaterializedLogits(nn.Module):
    """The same exits as EarlyExitLM, with logits: ``[K, B (T - 1), V]`` = lm_head(norm(hidden_states[E]))."""

    def __init__(self, model: Any, exits: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.exits = model, exits

    def forward(self, ids: Tensor) -> Tensor:
        out = self.model.model(input_ids=ids, output_hidden_states=True, use_cache=False)
        hidden = [self.model.model.norm(out.hidden_states[e]) for e in self.exits[:-1]] + [out.last_hidden_state]
        return torch.stack([self.model.lm_head(h[:, :-1]).reshape(-1, V) for h in hidden])


def batches(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (2, 7), generator=g)
    val = torch.randint(1, V, (2, 7), generator=g)
    labels = ids.clone()
    labels[0, 3] = -100  # an ignored label: out of the cross-entropy, in the KD
    return ids, labels, val, val.clone()


def pair(arch: str, pairs: str, **kw: Any) -> tuple[hk.HDKD, hk.HDKD]:
    """(HDKD on EarlyExitLM, HDKD on a copy with materialized logits), same parameters, weights and rules."""
    model = tiny(arch)
    twin = tiny(arch)
    twin.load_state_dict(model.state_dict())
    wrapper = EarlyExitLM(model, exit_layers=(1, 2), temperature=2.0, pairs=pairs)
    reference = MaterializedLogits(twin, wrapper.exit_layers)
    fused = hk.HDKD(wrapper, torch.optim.SGD(wrapper.parameters(), lr=0.3, momentum=0.9), **kw)
    plain = hk.HDKD(reference, torch.optim.SGD(reference.parameters(), lr=0.3, momentum=0.9),
                    criterion=hk.DenseKD(3, temperature=2.0, pairs=pairs), **kw)
    with torch.no_grad():  # the same φ, off their start, on both
        for p, q in zip(fused.weights.parameters(), plain.weights.parameters(), strict=True):
            p.copy_(0.5 * torch.randn_like(p))
            q.copy_(p)
    return fused, plain


@pytest.mark.parametrize(("arch", "pairs"), [("llama", "dense"), ("qwen2", "last")])
def test_fd_hypergradient_matches_reverse_mode_on_materialized_logits(arch: str, pairs: str) -> None:
    fused, plain = pair(arch, pairs, hypergrad="fd")
    ids, labels, val, val_labels = batches(3)
    got = fused.hypergradient(ids, labels, val, val_labels)
    plain.hypergrad = "exact"
    want = plain.hypergradient(ids, next_token_targets(labels), val, next_token_targets(val_labels))
    assert len(got) == len(want) > 0
    scale = max(float(w.abs().max()) for w in want)
    assert scale > 1e-6  # the weights matter on this batch
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * scale)


def test_steps_match_the_logits_path() -> None:
    """Three steps with an update every second one (validation "balanced"): the same losses, weights and
    parameters as HDKD on the materialized logits (whose "fd" differences the logits instead)."""
    fused, plain = pair("llama", "dense", hypergrad="fd", update_every=2, validation="balanced")
    for seed in range(3):
        ids, labels, val, val_labels = batches(10 + seed)
        a = fused.step(ids, labels, val, val_labels)
        b = plain.step(ids, next_token_targets(labels), val, next_token_targets(val_labels))
        assert a["updated"] == b["updated"] == float(seed % 2 == 0)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-10)
        for key in a:
            if key.startswith(("weight/", "val_ce/")):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-8), key
    for p, q in zip(fused.module.parameters(), plain.module.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-8)
    assert fused.last_logits is None and plain.last_logits is not None


def test_jvp_mode_through_the_decoder_matches_fd() -> None:
    fused, _ = pair("llama", "dense", hypergrad="fd")
    ids, labels, val, val_labels = batches(5)
    fd = fused.hypergradient(ids, labels, val, val_labels)
    fused.hypergrad = "jvp"
    jvp = fused.hypergradient(ids, labels, val, val_labels)
    for a, b in zip(fd, jvp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_errors_name_the_argument() -> None:
    wrapper = EarlyExitLM(tiny("llama"), exit_layers=(1, 2))
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="criterion must be None"):
        hk.HDKD(wrapper, opt, criterion=hk.DenseKD())
    with pytest.raises(ValueError, match="hypergrad='exact' needs second derivatives"):
        hk.HDKD(wrapper, opt, hypergrad="exact")
    with pytest.raises(ValueError, match="other pairs than the criterion's"):
        hk.HDKD(wrapper, opt, weights=hk.HarmonizedWeights(3, "last").double())
    with pytest.raises(ValueError, match="num_exits=3"):
        hk.HDKD(wrapper, opt, weights=hk.HarmonizedWeights(4).double())
