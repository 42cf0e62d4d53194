"""The Hugging Face early-exit example (examples/early_exit_hf.py): its tiny run end to end (every JSON field,
the report), its evaluation against a float64 reference (Hugging Face's own loss and truncated models), the
LayerSkip scale and curriculum by hand, the draft counter's invariants, its errors."""

from __future__ import annotations

import importlib.util
import json
import math
import runpy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from hdkd_fast.lm import EarlyExitLM

transformers: Any = pytest.importorskip("transformers", exc_type=ModuleNotFoundError)  # a broken import fails

ROOT = Path(__file__).resolve().parents[2]
FORTUNES = Path("/usr/share/games/fortunes")
needs_tokenizers = pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None,
                                      reason="needs tokenizers (hdkd_fast[lm])")
needs_fortunes = pytest.mark.skipif(not FORTUNES.is_dir(),
                                    reason="needs the fortunes data: apt-get install -y fortunes")


ee = SimpleNamespace(**runpy.run_path(str(ROOT / "examples" / "early_exit_hf.py"), run_name="early_exit_hf"))


def tiny_llama(seed: int = 0, layers: int = 3, vocab: int = 41) -> Any:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=2, bos_token_id=None,
                                      eos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # random init leaves the norms at 1: perturb them so that a missing norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.double().eval()


def test_evaluate_matches_float64_reference() -> None:
    model = tiny_llama()
    wrapper = EarlyExitLM(model, exit_layers=(1, 2))
    stream = torch.randint(0, 41, (70,), generator=torch.Generator().manual_seed(3))
    context, tokens = 8, 64  # 8 windows, in chunks of 3 (a partial last chunk)
    got = ee.evaluate(wrapper, stream, context, tokens, rows=3)
    x = stream[:tokens].view(-1, context)
    logits = []
    for e in (1, 2, 3):  # exit E = the model truncated to its first E layers (transformers' assistant_early_exit)
        model.config.num_hidden_layers = e
        try:
            logits.append(model(input_ids=x).logits[:, :-1])
        finally:
            model.config.num_hidden_layers = 3
    assert got["tokens"] == 8 * 7
    hf_loss = model(input_ids=x, labels=x).loss  # HF's own mean CE of the last layer (it computes it in fp32)
    assert math.isclose(got["ppl"][2], math.exp(hf_loss.item()), rel_tol=1e-6)
    for k in range(3):
        ce = torch.nn.functional.cross_entropy(logits[k].reshape(-1, 41), x[:, 1:].reshape(-1))
        assert math.isclose(got["ppl"][k], math.exp(ce.item()), rel_tol=1e-10)
    for k in range(2):
        agree = (logits[k].argmax(-1) == logits[2].argmax(-1)).double().mean().item()
        assert got["agreement"][k] == pytest.approx(agree, abs=1e-12)
    assert 0 < got["agreement"][0] < 1  # the check above is not trivially 0 or 1
    assert len({round(p, 6) for p in got["ppl"]}) == 3
    with pytest.raises(ValueError, match="need a stream"):
        ee.evaluate(wrapper, stream, context, 128)


def test_layerskip_scale_by_hand() -> None:
    # L = 8, exits after 2, 4, 6, 8 layers: l = 1, 3, 5 -> e_scale * (1, 6, 15); last: 7 + e_scale * 21
    torch.testing.assert_close(ee.layerskip_scale((2, 4, 6, 8), 8), torch.tensor([1.0, 6.0, 15.0, 28.0]) / 50)
    torch.testing.assert_close(ee.layerskip_scale((2, 4, 6, 8), 8, e_scale=0.5),
                               torch.tensor([0.5, 3.0, 7.5, 17.5]) / 28.5)
    torch.testing.assert_close(ee.layerskip_scale((2, 4, 6, 8), 8, enabled=(False, True, False, True)),
                               torch.tensor([0.0, 6.0, 0.0, 28.0]) / 34)
    torch.testing.assert_close(ee.layerskip_scale((1, 3), 3), torch.tensor([0.0, 1.0]))  # e(0) = 0
    with pytest.raises(ValueError, match="scale 0"):
        ee.layerskip_scale((1, 3), 3, enabled=(True, False))
    # gradual curriculum: exit after layer E on once 2 t / T >= (L - E + 1) / L; the last layer always
    assert ee.gradual_curriculum((2, 4, 6, 8), 8, 0, 100) == [False, False, False, True]
    assert ee.gradual_curriculum((2, 4, 6, 8), 8, 19, 100) == [False, False, True, True]  # 0.38 >= 3/8
    assert ee.gradual_curriculum((2, 4, 6, 8), 8, 18, 100) == [False, False, False, True]  # 0.36 < 3/8
    assert ee.gradual_curriculum((2, 4, 6, 8), 8, 44, 100) == [True, True, True, True]  # 0.88 >= 7/8
    assert ee.gradual_curriculum((2, 4, 6, 8), 8, 43, 100) == [False, True, True, True]


def test_lr_schedule() -> None:
    f = ee.lr_schedule(100, 10)
    assert [f(0), f(9)] == [0.1, 1.0]
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)


def test_generation_benchmark_counts_drafts() -> None:
    model = tiny_llama(seed=1, layers=4)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 41, (1, 6), generator=g) for _ in range(3)]
    out = ee.generation_benchmark(model, prompts, (1, 2, 3), new_tokens=9, draft_tokens=3, pad_token_id=0)
    assert out["tokens_generated"] == 27 and out["draft_tokens"] == 3
    assert "_get_candidate_generator" not in vars(model)  # the counter unhooked itself
    accepted_some = False
    for x in out["exits"]:
        # every round appends its accepted draft tokens + 1 token of the full model
        assert x["accepted"] + x["rounds"] == 27, x
        assert 0 <= x["accepted"] <= x["drafted"] <= 3 * x["rounds"]
        assert x["acceptance"] == x["accepted"] / x["drafted"]
        assert x["mismatched_prompts"] == 0 and x["mismatched_tokens"] == 0  # float64: greedy is greedy
        accepted_some |= 0 < x["accepted"] < x["drafted"]
    assert accepted_some  # the counts are not all-or-nothing on this model



def test_draft_length_is_fixed() -> None:
    """With the constant schedule and confidence threshold 0 set by generation_benchmark, every round drafts
    min(draft_tokens, max_length - length - 1) tokens (transformers' _calculate_new_tokens); transformers'
    default threshold 0.4 would cut drafts short on this untrained model."""
    model = tiny_llama(seed=2, layers=4)
    prompt = torch.randint(0, 41, (1, 5), generator=torch.Generator().manual_seed(7))
    ee.generation_benchmark(model, [prompt], (2,), new_tokens=4, draft_tokens=3, pad_token_id=0)  # sets the config
    max_length = 5 + 20
    with ee.count_drafts(model) as counts:
        out = model.generate(prompt, assistant_early_exit=2, do_sample=False, max_new_tokens=20, pad_token_id=0,
                             eos_token_id=None)
    assert out.shape == (1, max_length)
    assert counts["rounds"] == len(counts["log"]) > 3
    assert sum(d for _, d, _ in counts["log"]) == counts["drafted"]
    for after, drafted, accepted in counts["log"]:
        before = after - accepted - 1
        assert drafted == min(3, max_length - before - 1), counts["log"]
    model.generation_config.assistant_confidence_threshold = 0.4
    with ee.count_drafts(model) as default:
        model.generate(prompt, assistant_early_exit=2, do_sample=False, max_new_tokens=20, pad_token_id=0,
                       eos_token_id=None)
    assert default["drafted"] < counts["drafted"]  # the threshold this harness switches off does bind here


@pytest.mark.parametrize("argv, match", [(["--methods", "ce_last,nope"], "unknown"),
                                         (["--exits", "0,2"], "--exits"), (["--exits", "8"], "--exits"),
                                         (["--seeds", "a"], "integers")])
def test_bad_arguments(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ee.parse_args(argv)
    assert match in capsys.readouterr().err


def test_report_without_results(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ee.report(tmp_path)


def test_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ee.main(["--tiny", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "apt-get install -y fortunes" in capsys.readouterr().err


@needs_tokenizers
@needs_fortunes
def test_tiny_run_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    methods = ("ce_last", "ce_all", "layerskip", "dense_kd", "kd_last")
    out = tmp_path / "runs"
    # two "processes" writing into one --out, as the real measurement runs
    assert ee.main(["--tiny", "--out", str(out), "--methods", "ce_last,layerskip", "--seeds", "0"]) == 0
    assert ee.main(["--tiny", "--out", str(out), "--methods", "dense_kd,kd_last,ce_all", "--seeds", "0"]) == 0
    printed = capsys.readouterr().out
    assert "step     4/4" in printed
    for method in methods:
        r = json.loads((out / f"{method}_seed0.json").read_text())
        assert r["method"] == method and r["seed"] == 0 and r["exit_layers"] == [1, 2, 3]
        assert r["train"]["steps"] == 4 and r["train"]["tokens_per_s"] > 0 and math.isfinite(r["train"]["final_loss"])
        assert len(r["eval"]["ppl"]) == 3 and all(1 < p < 10 * r["data"]["vocab"] for p in r["eval"]["ppl"])
        assert len(r["eval"]["agreement"]) == 2 and all(0 <= a <= 1 for a in r["eval"]["agreement"])
        g = r["generation"]
        assert g["prompts"] == 2 and g["tokens_generated"] == 2 * 8 and g["plain_tokens_per_s"] > 0
        assert [x["exit"] for x in g["exits"]] == [1, 2]
        for x in g["exits"]:
            assert x["accepted"] + x["rounds"] == g["tokens_generated"]
            assert x["tokens_per_s"] > 0 and x["speedup"] > 0
            assert isinstance(x["mismatched_prompts"], int) and isinstance(x["mismatched_tokens"], int)
        assert r["environment"]["transformers"] == transformers.__version__
        assert r["config"]["tiny"] is True
    layerskip = json.loads((out / "layerskip_seed0.json").read_text())
    assert layerskip["weights"]["values"] == pytest.approx([0.0, 0.25, 0.75])  # all exits on by the end
    png = tmp_path / "runs.png"
    assert ee.main(["--report", "--out", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| |"))
    assert [m for m in methods if m in header] == list(methods)
    for row in ("eval perplexity, exit 3 (last)", "top-1 agreement with last, exit 1", "drafts accepted, exit 2",
                "speed-up, exit 1", "layer-count speed-up, exit 2 (model)", "tokens/s, plain greedy", "train tokens/s",
                "outputs differing from plain greedy, exit 2"):
        assert f"| {row}" in table


@needs_tokenizers
@needs_fortunes
def test_tiny_run_hdkd(tmp_path: Path) -> None:
    assert ee.main(["--tiny", "--out", str(tmp_path), "--methods", "hdkd", "--seeds", "0"]) == 0
    r = json.loads((tmp_path / "hdkd_seed0.json").read_text())
    assert len(r["weights"]["names"]) == len(r["weights"]["values"]) > 0
    assert all(math.isfinite(p) for p in r["eval"]["ppl"])


def test_layer_speedup_counts_layers() -> None:
    """10 tokens from 4 rounds that drafted 8 tokens with 2 of 8 layers: 8 · 2/8 + 4 = 6 full-step costs."""
    result = {"exit_layers": [2, 8], "generation": {"tokens_generated": 10, "exits": [
        {"exit": 2, "drafted": 8, "rounds": 4}]}}
    assert ee.layer_speedup(result, 0) == pytest.approx(10 / 6)
