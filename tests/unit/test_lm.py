"""hdkd_fast.lm.EarlyExitLM on tiny Hugging Face causal LMs (Llama, Qwen2, Mistral, Gemma), in float64: the
fused losses and their gradients against dense_kd_losses on logits computed by hand from output_hidden_states, the exits
against transformers' own assistant_early_exit truncation, padding and ignored labels, argument errors,
a save_pretrained round trip, and early-exit speculative decoding after a few training steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import hdkd_fast as hk
from hdkd_fast.lm import EarlyExitLM
from tests.support.hf import require_transformers

transformers = require_transformers()

V, LAYERS = 97, 4
ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
         "mistral": ("MistralConfig", "MistralForCausalLM"), "gemma": ("GemmaConfig", "GemmaForCausalLM")}


def tiny(arch: str, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=None,
                  bos_token_id=None)
    config, cls = ARCHS[arch]
    model = getattr(transformers, cls)(getattr(transformers, config)(head_dim=8, **common))
    # random init leaves the norms at 1: perturb them so that a missing or doubled norm shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.double().eval()


def batch(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    labels = ids.clone()
    labels[0, 2:4] = -100  # ignored labels
    labels[mask == 0] = -100
    return ids, mask, labels


def reference_losses(model: Any, exits: tuple[int, ...], ids: Tensor, mask: Tensor | None, labels: Tensor,
                     **kw: Any) -> Any:
    """dense_kd_losses on logits lm_head(norm(hidden_states[E])) (the last exit: HF's own logits), shifted."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    logits = [model.lm_head(model.model.norm(out.hidden_states[e])) for e in exits[:-1]] + [out.logits]
    target = labels[:, 1:]
    rows = torch.ones_like(target, dtype=torch.bool)
    if mask is not None:
        target = target.masked_fill(mask[:, 1:] == 0, -100)
        rows = mask[:, :-1] != 0
    z = torch.stack([lg[:, :-1][rows] for lg in logits])
    return hk.dense_kd_losses(z, target[rows], **kw)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("padded", [True, False])
def test_losses_and_gradients_match_materialized_reference(arch: str, padded: bool) -> None:
    model = tiny(arch)
    ids, mask, labels = batch()
    if not padded:
        mask, labels = None, ids.clone()
        labels[0, 2:4] = -100
    wrapper = EarlyExitLM(model, exit_layers=(1, 3), temperature=2.0)
    assert wrapper.exit_layers == (1, 3, LAYERS)
    out = wrapper(ids, attention_mask=mask, labels=labels)
    ref = reference_losses(model, wrapper.exit_layers, ids, mask, labels, temperature=2.0)
    assert out.exit_losses.ce is not None and ref.ce is not None
    torch.testing.assert_close(out.exit_losses.ce, ref.ce, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.exit_losses.kd, ref.kd, rtol=1e-10, atol=1e-12)
    ref_loss = ref.ce.sum() + ref.kd.sum()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-10, atol=1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    want = torch.autograd.grad(ref_loss, params, allow_unused=True)
    for (name, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        if w is None:
            assert g is None or not g.any(), name
        else:
            assert g is not None, name
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-11, msg=name)
    rows = int((mask[:, :-1] != 0).sum()) if mask is not None else ids.shape[0] * (ids.shape[1] - 1)
    assert out.num_tokens == rows


def test_weights_and_pairs() -> None:
    model = tiny("llama")
    ids, mask, labels = batch()
    cw = torch.tensor([0.5, 2.0], dtype=torch.float64)
    wrapper = EarlyExitLM(model, exit_layers=[2], temperature=3.0, pairs="last", ce_weight=cw, kd_weight=0.25)
    out = wrapper(ids, mask, labels)
    ref = reference_losses(model, (2, LAYERS), ids, mask, labels, temperature=3.0, pairs="last")
    torch.testing.assert_close(out.exit_losses.kd, ref.kd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, (cw * ref.ce).sum() + 0.25 * ref.kd.sum(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="ce_weight"):
        EarlyExitLM(model, exit_layers=[2], ce_weight=torch.ones(3))(ids)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_exits_are_transformers_assistant_early_exit(arch: str) -> None:
    """Exit E is what generate(assistant_early_exit=E) drafts with: the model with config.num_hidden_layers
    set to E (transformers/generation/candidate_generator.py, EarlyExitCandidateGenerator.get_candidates)."""
    model = tiny(arch)
    ids, mask, _ = batch()
    wrapper = EarlyExitLM(model, exit_layers=(1, 2, 3))
    hidden = wrapper.exit_hidden_states(ids, mask)
    for e, h in zip(wrapper.exit_layers, hidden, strict=True):
        model.config.num_hidden_layers = e
        try:
            truncated = model(input_ids=ids, attention_mask=mask).logits
        finally:
            model.config.num_hidden_layers = LAYERS
        torch.testing.assert_close(model.lm_head(h), truncated, rtol=1e-12, atol=1e-12)


def test_bad_exit_layers() -> None:
    model = tiny("llama")
    for bad, err, match in [((0,), ValueError, r"exit_layers\[0\] must be in \[1, 4\)"),
                            ((5,), ValueError, r"exit_layers\[0\]"), ((1, 4, 4), ValueError, "exit_layers"),
                            ((2, 1), ValueError, "strictly increasing"), ((2, 2), ValueError, "strictly"),
                            ((1.0,), TypeError, r"exit_layers\[0\] must be an int"),
                            ((True,), TypeError, r"exit_layers\[0\]"), (2, TypeError, "exit_layers must be a sequence"),
                            ("12", TypeError, "exit_layers")]:
        with pytest.raises(err, match=match):
            EarlyExitLM(model, exit_layers=bad)
    assert EarlyExitLM(model, exit_layers=(2, LAYERS)).exit_layers == (2, LAYERS)
    assert EarlyExitLM(model).exit_layers == (LAYERS,)


def test_unsupported_models() -> None:
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(TypeError, match=r"GPT2LMHeadModel lacks: model.model .*model.model.layers"):
        EarlyExitLM(gpt2, exit_layers=(1,))
    gemma2 = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8))
    with pytest.raises(TypeError, match="final_logit_softcapping"):
        EarlyExitLM(gemma2, exit_layers=(1,))
    with pytest.raises(TypeError, match="Linear lacks"):
        EarlyExitLM(nn.Linear(3, 3))
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        EarlyExitLM("llama")  # type: ignore[arg-type]


def test_no_parameters_of_its_own_and_save_pretrained_round_trip(tmp_path: Any) -> None:
    model = tiny("qwen2")
    wrapper = EarlyExitLM(model, exit_layers=(2,))
    assert set(wrapper.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    ids, mask, labels = batch()
    before = wrapper(ids, mask, labels)
    model.save_pretrained(tmp_path)
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float64).eval()
    assert type(loaded) is type(model)
    after = EarlyExitLM(loaded, exit_layers=(2,))(ids, mask, labels)
    torch.testing.assert_close(after.loss, before.loss, rtol=0, atol=0)
    torch.testing.assert_close(after.exit_losses.kd, before.exit_losses.kd, rtol=0, atol=0)


def test_train_then_assistant_early_exit_generate_is_greedy() -> None:
    model = tiny("llama")
    wrapper = EarlyExitLM(model, exit_layers=(2,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids, mask, labels = batch()
    losses = []
    model.train()
    for _ in range(6):
        out = wrapper(ids, mask, labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    prompt = ids[:1, :5]
    kw = dict(do_sample=False, max_new_tokens=8, pad_token_id=0)
    greedy = model.generate(prompt, **kw)
    early = model.generate(prompt, assistant_early_exit=2, **kw)
    assert greedy.shape == (1, 13)
    assert torch.equal(early, greedy)
