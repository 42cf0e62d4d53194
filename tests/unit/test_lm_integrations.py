"""hdkd_fast.lm.EarlyExitLM with what a Hugging Face training run brings along (docs/lm.md, "What composes"):
transformers.Trainer (its loss, checkpoints of a tied-embedding model, save_pretrained afterwards), bf16 and fp16
autocast against a float64 reference, gradient checkpointing and torch.compile against eager. DDP:
tests/integration/test_lm_distributed.py."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from hdkd_fast.lm import EarlyExitLM, EarlyExitLMOutput
from tests.support.hf import require_transformers

transformers = require_transformers()

V, LAYERS, T = 97, 3, 10


def tiny(*, tie: bool = False, seed: int = 0, dtype: torch.dtype = torch.float64) -> Any:
    """A 3-layer Llama (hidden 32); the norms perturbed from 1 so that a missing or doubled norm shows."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0, eos_token_id=None, bos_token_id=None,
        tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.to(dtype)


def batch(seed: int = 1, rows: int = 2) -> dict[str, Tensor]:
    """``rows`` sequences of T tokens; row 1 left-padded, row 0 with two ignored labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (rows, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 4:6] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(loss: Tensor, model: Any) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    got = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, got, strict=True))


def test_output_indexes_like_a_model_output() -> None:
    wrapper = EarlyExitLM(tiny(), exit_layers=(1,))
    out = wrapper(**batch())
    assert isinstance(out, EarlyExitLMOutput)
    assert out["loss"] is out.loss and out[0] is out.loss  # what Trainer.compute_loss reads
    assert out["exit_losses"] is out.exit_losses and out[1] is out.exit_losses
    assert out[-1] == out["num_tokens"] == out.num_tokens == 2 * (T - 1) - 3
    assert out[2] == out.exit_layers == (1, LAYERS)
    with pytest.raises(KeyError, match="no field 'logits'; its fields: loss, exit_losses"):
        out["logits"]
    with pytest.raises(IndexError):
        out[4]
    with pytest.raises(TypeError, match="field names or ints; got bool"):
        out[True]  # type: ignore[index]


def test_tied_embedding_state_dict_round_trip() -> None:
    """A tied LM head is one tensor under two names: the wrapper's state_dict keeps the first (safetensors refuses
    both), load_state_dict refills the second and keeps the tie."""
    untied = EarlyExitLM(tiny(), exit_layers=(1,))
    assert untied.tied_aliases() == {}
    assert set(untied.state_dict()) == {f"model.{k}" for k in untied.model.state_dict()}
    wrapper = EarlyExitLM(tiny(tie=True), exit_layers=(1,))
    assert wrapper.model.lm_head.weight is wrapper.model.model.embed_tokens.weight
    assert wrapper.tied_aliases() == {"model.lm_head.weight": "model.model.embed_tokens.weight"}
    state = wrapper.state_dict()
    assert set(state) == {f"model.{k}" for k in wrapper.model.state_dict()} - {"model.lm_head.weight"}
    other = EarlyExitLM(tiny(tie=True, seed=5), exit_layers=(1,))
    assert not torch.equal(other.model.lm_head.weight, wrapper.model.lm_head.weight)
    other.load_state_dict(state)  # strict: the alias is refilled
    assert other.model.lm_head.weight is other.model.model.embed_tokens.weight
    torch.testing.assert_close(other(**batch()).loss, wrapper(**batch()).loss, rtol=0, atol=0)
    nested = torch.nn.ModuleDict({"lm": other})  # the hooks work under any prefix
    assert "lm.model.lm_head.weight" not in nested.state_dict()
    nested.load_state_dict(nested.state_dict())


def test_trainer_trains_checkpoints_and_the_model_reloads(tmp_path: Path) -> None:
    """Trainer(model=EarlyExitLM(...)): its loss is the wrapper's, it trains, asks the wrapper for checkpointing,
    saves (tied-embedding) checkpoints that the wrapper loads and Trainer resumes from, and the trained model
    round-trips save_pretrained."""
    pytest.importorskip("accelerate")
    model = tiny(tie=True, dtype=torch.float32)
    wrapper = EarlyExitLM(model, exit_layers=(1,))
    data = batch()
    # two examples, batch size 2: every step sees the same batch, so step 1's loss is the untrained wrapper's
    dataset = [{k: v[i] for k, v in data.items()} for i in range(2)]
    with torch.no_grad():
        before = wrapper(**data).loss.item()
    initial = {k: v.clone() for k, v in wrapper.state_dict().items()}
    checkpointing = ("activation_checkpointing" if hasattr(transformers.TrainingArguments, "activation_checkpointing")
                     else "gradient_checkpointing")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        learning_rate=1e-2, logging_steps=1, save_strategy="steps", save_steps=2, **{checkpointing: True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = transformers.Trainer(model=wrapper, args=args, train_dataset=dataset)
        assert trainer.model_accepts_loss_kwargs is False
        trainer.train()
        resumed = EarlyExitLM(tiny(tie=True, seed=4, dtype=torch.float32), exit_layers=(1,))
        transformers.Trainer(model=resumed, args=args, train_dataset=dataset).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert wrapper.is_activation_checkpointing
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3
    assert losses[0] == pytest.approx(before, rel=1e-5)
    assert losses[2] < losses[0]
    trained = wrapper.state_dict()
    assert all(not torch.equal(trained[k], initial[k]) for k in trained if "rotary" not in k), "a parameter stayed"

    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "checkpoint-3" / "model.safetensors"))
    assert set(saved) == set(trained)
    fresh = EarlyExitLM(tiny(tie=True, seed=3, dtype=torch.float32), exit_layers=(1,))
    fresh.load_state_dict(saved)
    with torch.no_grad():
        after = wrapper(**data).loss
        torch.testing.assert_close(fresh(**data).loss, after, rtol=0, atol=0)
    for name, p in resumed.named_parameters():  # checkpoint-2 + step 3 = the 3 steps
        torch.testing.assert_close(p, trained[name], rtol=0, atol=0, msg=name)

    wrapper.model.save_pretrained(tmp_path / "model")  # the recipe in docs/lm.md
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "model")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(EarlyExitLM(loaded, exit_layers=(1,))(**data).loss, after, rtol=0, atol=0)


@pytest.mark.parametrize(("dtype", "tol", "grad_tol"), [(torch.bfloat16, 5e-4, 3e-2), (torch.float16, 1e-4, 5e-3)])
def test_autocast_close_to_float64(dtype: torch.dtype, tol: float, grad_tol: float) -> None:
    """Under CPU autocast the decoder's matmuls run in ``dtype``; the fused op's logits and losses stay fp32. The
    tolerances are about 6 times the errors seen (bf16: 8e-5 on the losses, 0.85 % on the worst gradient)."""
    model = tiny(dtype=torch.float32)
    ref_model = tiny(dtype=torch.float64)
    data = batch()
    ref = EarlyExitLM(ref_model, exit_layers=(1, 2))(**data)
    ref_grads = grads(ref.loss, ref_model)
    wrapper = EarlyExitLM(model, exit_layers=(1, 2))
    with torch.autocast("cpu", dtype=dtype):
        out = wrapper(**data)
        hidden = wrapper.exit_hidden_states(data["input_ids"], data["attention_mask"])
    assert out.loss.dtype == out.exit_losses.kd.dtype == torch.float32
    assert out.exit_losses.ce is not None and ref.exit_losses.ce is not None
    for got, want in [(out.loss, ref.loss), (out.exit_losses.ce, ref.exit_losses.ce),
                      (out.exit_losses.kd, ref.exit_losses.kd)]:
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    fp32 = wrapper(**data)
    torch.testing.assert_close(fp32.loss.double(), ref.loss, rtol=1e-5, atol=1e-5)
    assert (out.loss - fp32.loss).abs() > 1e-7, "autocast changed nothing: was it on?"
    assert hidden[0].dtype in (dtype, torch.float32)
    g = grads(out.loss, model)
    for name, want in ref_grads.items():
        assert g[name].dtype == torch.float32 and torch.isfinite(g[name]).all(), name
        err = (g[name].double() - want).norm() / want.norm()
        assert err < grad_tol, (name, float(err))


@pytest.mark.parametrize("method", ["gradient_checkpointing", "activation_checkpointing"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(method: str) -> None:
    model = tiny().train()
    if not hasattr(model, f"{method}_enable"):
        pytest.skip(f"this transformers has no {method}_enable")
    wrapper = EarlyExitLM(model, exit_layers=(1, 2))
    data = batch()
    calls = []
    model.model.layers[1].mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # recomputed in backward
    plain = wrapper(**data)
    plain_grads = grads(plain.loss, model)
    assert len(calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5: gradient_* is deprecated
        getattr(wrapper, f"{method}_enable")()
        assert wrapper.is_activation_checkpointing
        out = wrapper(**data)
        got = grads(out.loss, model)
        assert len(calls) == 3, "the layer was not recomputed in backward: no checkpointing"
        torch.testing.assert_close(out.loss, plain.loss, rtol=1e-13, atol=0)
        torch.testing.assert_close(out.exit_losses.kd, plain.exit_losses.kd, rtol=1e-13, atol=0)
        for name, want in plain_grads.items():
            torch.testing.assert_close(got[name], want, rtol=1e-10, atol=1e-13, msg=name)
        getattr(wrapper, f"{method}_disable")()
    assert not wrapper.is_activation_checkpointing


def test_checkpointing_of_a_model_without_it_names_the_method() -> None:
    wrapper = EarlyExitLM(tiny(), exit_layers=(1,))
    wrapper.model = torch.nn.Module()  # type: ignore[assignment]
    with pytest.raises(AttributeError, match=r"EarlyExitLM.gradient_checkpointing_enable: the wrapped Module has no"):
        wrapper.gradient_checkpointing_enable()
    assert not wrapper.is_activation_checkpointing


@pytest.mark.slow
def test_torch_compile_gives_the_eager_loss_and_gradients() -> None:
    model = tiny().train()
    wrapper = EarlyExitLM(model, exit_layers=(1, 2))
    data = batch()
    eager = wrapper(**data)
    eager_grads = grads(eager.loss, model)
    torch._dynamo.reset()
    compiled = torch.compile(wrapper, backend="aot_eager")
    for _ in range(2):  # the second call runs the cached graphs
        out = compiled(**data)
        assert isinstance(out, EarlyExitLMOutput)
        torch.testing.assert_close(out.loss, eager.loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.exit_losses.kd, eager.exit_losses.kd, rtol=1e-12, atol=1e-15)
        got = grads(out.loss, model)
        for name, want in eager_grads.items():
            torch.testing.assert_close(got[name], want, rtol=1e-10, atol=1e-13, msg=name)
