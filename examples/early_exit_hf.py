"""A Hugging Face Llama trained as an early-exit LM four ways, then measured for self-speculative decoding.

The model is a small ``LlamaForCausalLM`` built from a config (default: 8 decoder layers, hidden 256, 4 heads,
intermediate 688) with exits after layers 2, 4 and 6 (and 8, the model's own output). Every exit reads the
hidden state after its first E layers through the model's final norm and LM head (:class:`hdkd_fast.lm.
EarlyExitLM`), exactly what ``model.generate(..., assistant_early_exit=E)`` drafts with. The text is Debian's
``fortunes`` collection (``/usr/share/games/fortunes``: ``apt-get install -y fortunes``), split by fortune
(a fixed split, the same for every seed) into train / HDKD-validation / evaluation parts, with a byte-level
BPE tokenizer trained on the train part by Hugging Face ``tokenizers``; ``pip install 'hdkd_fast[lm]'``.

Methods, from the same initialization and the same batches for a given seed, AdamW with linear warmup and
cosine decay (to 10 % of ``--lr``):

- ``ce_last``: the stock Hugging Face loss, last-layer cross-entropy only (``model(ids, labels=ids).loss``);
- ``ce_all``: cross-entropy at every exit, each of weight 1, no KD (``EarlyExitLM(..., kd_weight=0.0)``);
- ``layerskip``: LayerSkip's early-exit loss (arXiv 2404.16710, section 4.2): cross-entropy at every exit,
  no KD, weighted by the normalized per-exit scale :math:`\\tilde e(t, l)` (:func:`layerskip_scale`; deeper
  exits weigh more), with its gradual curriculum (:func:`gradual_curriculum`); no layer dropout;
- ``dense_kd``: :class:`hdkd_fast.lm.EarlyExitLM` with its defaults: :math:`\\sum_k \\mathrm{CE}_k +
  \\sum_{i<j} T^2 \\mathrm{KL}(p_j \\| p_i)` at T = 2 over every exit pair, through the fused op;
- ``kd_last``: the same with the last layer the only teacher (``pairs="last"``);
- ``hdkd``: ``dense_kd``'s objectives with weights learned by :class:`hdkd_fast.HDKD` (finite-difference
  hypergradient on batches of the HDKD-validation part, fetched only on the steps that update the weights).

Per (method, seed) the run writes ``<out>/<method>_seed<seed>.json`` with, on the evaluation part:
perplexity at every exit and each early exit's teacher-forced top-1 agreement with the last layer, over a
fixed number of tokens; and, on held-out prompts (greedy, batch 1), for each early exit E the share of drafted
tokens the full model accepted, tokens/s of ``generate(assistant_early_exit=E)`` and of plain ``generate``
(timed prompt by prompt in the same run, in rotating order), the speed-up, and how many outputs differ from
plain greedy (counted, never hidden: batched verification may round differently from one-token steps and
flip a near-tie argmax). The draft length is fixed: ``num_assistant_tokens = --draft-tokens`` with the
``"constant"`` schedule and ``assistant_confidence_threshold = 0`` (transformers' default would stop a draft
at the first token of confidence < 0.4), set on ``model.generation_config``, which is where transformers'
``EarlyExitCandidateGenerator`` reads them; a fixed length keeps the acceptance rate comparable between
methods, where the ``"heuristic"`` schedule would make each method's draft length depend on its own history.
``--methods`` / ``--seeds`` split the runs between processes writing into one ``--out``; ``--report`` reads
the JSON files there and prints a Markdown table, mean ± std over seeds. ``--tiny`` is the smoke-test size.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import hdkd_fast as hk
from hdkd_fast.lm import EarlyExitLM

FORTUNES = Path("/usr/share/games/fortunes")
EOT = "<|endoftext|>"
METHODS = ("ce_last", "ce_all", "layerskip", "dense_kd", "kd_last", "hdkd")
DATA_SEED = 0  # the train / HDKD-validation / evaluation split, the same for every run seed


# ---------------------------------------------------------------------------------------------- data


def load_fortunes(root: Path) -> list[str]:
    """Every fortune of the collection (files split on ``%`` lines; the ``.dat`` indexes and the ``.u8``
    links skipped), in a fixed order."""
    texts: list[str] = []
    for path in sorted(p for p in root.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8")):
        body = path.read_text(encoding="utf-8", errors="replace")
        texts.extend(t.strip() for t in body.split("\n%\n") if t.strip())
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:  # -> tokenizers.Tokenizer
    """A byte-level BPE tokenizer trained on ``texts``, with ``EOT`` as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def encode(tokenizer: Any, texts: list[str]) -> Tensor:
    """The texts as one token stream, ``EOT`` after each."""
    eot = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: Tensor, batch: int, context: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless batches ``[batch, context]`` of random windows of ``stream``, in the generator's order."""
    while True:
        starts = torch.randint(0, len(stream) - context, (batch,), generator=generator)
        yield torch.stack([stream[s : s + context] for s in starts.tolist()])


def prompts_from(stream: Tensor, eot: int, count: int, length: int) -> list[Tensor]:
    """``count`` prompts ``[1, length]``: the first ``length`` tokens of the first fortunes of ``stream``
    that are at least that long (a fortune starts after an ``EOT``)."""
    starts = [0] + [i + 1 for i in (stream == eot).nonzero().flatten().tolist()]
    out = []
    for a, b in itertools.pairwise(starts):
        if b - 1 - a >= length:
            out.append(stream[a : a + length].unsqueeze(0))
            if len(out) == count:
                return out
    raise ValueError(f"the evaluation part has fewer than {count} fortunes of >= {length} tokens")


# ------------------------------------------------------------------------------------- the losses


def layerskip_scale(exit_layers: Sequence[int], num_layers: int, e_scale: float = 1.0,
                    enabled: Sequence[bool] | None = None) -> Tensor:
    r"""LayerSkip's per-exit loss scale (Elhoushi et al., arXiv 2404.16710, section 4.2, our reading), as
    EarlyExitLM's ``ce_weight``: with :math:`l` the 0-based index of the last layer before the exit
    (:math:`l = E - 1` for ``exit_layers`` entry :math:`E`) and :math:`L` = ``num_layers``,

    .. math::
        e(l) = e_{scale} \sum_{i=0}^{l} i \ (l < L - 1), \qquad
        e(L - 1) = L - 1 + e_{scale} \sum_{i=0}^{L-2} i, \qquad
        \tilde e(t, l) = \frac{C(t, l)\, e(l)}{\sum_i C(t, i)\, e(i)},

    the sum over the exits present; :math:`C(t, l) \in \{0, 1\}` is the curriculum (``enabled``; all on
    when ``None``). Deeper exits weigh more; an exit after layer 1 (:math:`l = 0`) gets 0."""
    if enabled is None:
        enabled = [True] * len(exit_layers)
    scale = []
    for e, on in zip(exit_layers, enabled, strict=True):
        l = e - 1  # noqa: E741 - the paper's symbol
        value = e_scale * l * (l + 1) / 2 if l < num_layers - 1 else (num_layers - 1) + e_scale * l * (l - 1) / 2
        scale.append(value if on else 0.0)
    total = sum(scale)
    if total <= 0:
        raise ValueError(f"layerskip_scale: every enabled exit of {list(exit_layers)} has scale 0")
    return torch.tensor([s / total for s in scale])


def gradual_curriculum(exit_layers: Sequence[int], num_layers: int, step: int, steps: int) -> list[bool]:
    """LayerSkip's gradual early-exit curriculum :math:`C_{grad}` as torchtune's ``GradualEarlyExitCurriculum``
    writes it: the exit after layer index :math:`l = E - 1` is on once :math:`2 t / T \\ge (L - l) / L`
    (exits switch on from the deepest down, all on by half of training); the last layer is always on."""
    return [e == num_layers or 2 * step / steps >= (num_layers - (e - 1)) / num_layers for e in exit_layers]


def lr_schedule(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0.1 of the peak at ``steps``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# ----------------------------------------------------------------------------------- measurement


@torch.no_grad()
def evaluate(wrapper: EarlyExitLM, stream: Tensor, context: int, tokens: int, rows: int = 16
             ) -> dict[str, Any]:
    """Per-exit perplexity :math:`\\exp(\\frac1N \\sum_t -\\log p_k(x_{t+1} | x_{\\le t}))` and each early
    exit's teacher-forced top-1 agreement with the last exit, :math:`\\frac1N \\sum_t [\\arg\\max z_k =
    \\arg\\max z_K]`, over the first ``tokens`` tokens of ``stream`` cut into windows of ``context`` (each
    window predicts its ``context - 1`` next tokens; N counts them)."""
    model: Any = wrapper.model
    head: Any = model.get_output_embeddings()
    was_training = model.training
    model.eval()
    n = tokens // context
    if n < 1 or n * context > len(stream):
        raise ValueError(f"evaluate: {tokens} tokens in windows of {context} need a stream of at least that "
                         f"many tokens; got {len(stream)}")
    x = stream[: n * context].view(n, context)
    k = wrapper.num_exits
    nll = torch.zeros(k, dtype=torch.float64)
    agree = torch.zeros(k - 1, dtype=torch.float64)
    for a in range(0, n, rows):
        ids = x[a : a + rows]
        target = ids[:, 1:].reshape(-1)
        hidden = wrapper.exit_hidden_states(ids)
        logits = [head(h[:, :-1]).reshape(target.shape[0], -1) for h in hidden]
        logits = [z.to(torch.promote_types(z.dtype, torch.float32)) for z in logits]  # bf16/fp16 -> fp32
        last = logits[-1].argmax(-1)
        for i, z in enumerate(logits):
            nll[i] += F.cross_entropy(z, target, reduction="sum").double()
            if i < k - 1:
                agree[i] += (z.argmax(-1) == last).double().sum()
    count = n * (context - 1)
    model.train(was_training)
    return {"tokens": count, "ppl": torch.exp(nll / count).tolist(), "agreement": (agree / count).tolist()}


@contextmanager
def count_drafts(model: Any) -> Iterator[dict[str, Any]]:
    """Counts, over the ``generate`` calls inside the block, the draft rounds, the tokens drafted and the
    drafted tokens accepted. transformers' ``_assisted_decoding`` calls ``candidate_generator.
    update_candidate_strategy(input_ids, scores, num_matches)`` once per round with ``scores`` holding the
    ``candidate_length + 1`` verified positions and ``num_matches`` the accepted draft tokens; the
    generator comes from ``model._get_candidate_generator``, wrapped here on the instance. ``counts["log"]``
    lists ``(sequence length after the round, drafted, accepted)`` per round."""
    counts: dict[str, Any] = {"rounds": 0, "drafted": 0, "accepted": 0, "log": []}
    original = model._get_candidate_generator

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        generator = original(*args, **kwargs)
        update = generator.update_candidate_strategy

        def counting(input_ids: Tensor, scores: Tensor, num_matches: Any) -> Any:
            counts["rounds"] += 1
            counts["drafted"] += scores.shape[1] - 1
            counts["accepted"] += int(num_matches)
            counts["log"].append((input_ids.shape[1], scores.shape[1] - 1, int(num_matches)))
            return update(input_ids, scores, num_matches)

        generator.update_candidate_strategy = counting
        return generator

    model._get_candidate_generator = wrapped
    try:
        yield counts
    finally:
        del model._get_candidate_generator


@torch.no_grad()
def generation_benchmark(model: Any, prompts: list[Tensor], early_exits: Sequence[int], new_tokens: int,
                         draft_tokens: int, pad_token_id: int) -> dict[str, Any]:
    """Greedy decoding of ``new_tokens`` tokens per prompt (batch 1), plain and with ``assistant_early_exit=E``
    for each early exit, timed prompt by prompt with the variants in rotating order (one untimed warm-up
    call each first); draft length fixed at ``draft_tokens`` (module docstring)."""
    was_training = model.training
    model.eval()
    gen_config = model.generation_config
    gen_config.num_assistant_tokens = draft_tokens
    gen_config.num_assistant_tokens_schedule = "constant"
    gen_config.assistant_confidence_threshold = 0.0
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id,
              eos_token_id=None)
    variants: list[int | None] = [None, *early_exits]
    for e in variants:  # warm-up
        model.generate(prompts[0], assistant_early_exit=e, **kw)
    seconds = {e: 0.0 for e in variants}
    outputs: dict[int | None, list[Tensor]] = {e: [] for e in variants}
    counts: dict[int, dict[str, int]] = {}
    for p, prompt in enumerate(prompts):
        for e in variants[p % len(variants):] + variants[: p % len(variants)]:
            with count_drafts(model) as c:
                start = time.perf_counter()
                out = model.generate(prompt, assistant_early_exit=e, **kw)
                seconds[e] += time.perf_counter() - start
            if e is not None:
                total = counts.setdefault(e, {"rounds": 0, "drafted": 0, "accepted": 0})
                for key in total:
                    total[key] += c[key]
            outputs[e].append(out[0, prompt.shape[1]:])
    model.train(was_training)
    produced = sum(o.numel() for o in outputs[None])
    plain = produced / seconds[None]
    exits = []
    for e in early_exits:
        mismatched = [int((a != b).sum()) if a.shape == b.shape else max(a.numel(), b.numel())
                      for a, b in zip(outputs[e], outputs[None], strict=True)]
        rate = produced / seconds[e]
        c = counts[e]
        exits.append({"exit": e, **c, "acceptance": c["accepted"] / max(1, c["drafted"]),
                      "tokens_per_s": rate, "speedup": rate / plain,
                      "mismatched_prompts": sum(m > 0 for m in mismatched), "mismatched_tokens": sum(mismatched)})
    return {"prompts": len(prompts), "prompt_tokens": prompts[0].shape[1], "new_tokens": new_tokens,
            "tokens_generated": produced, "draft_tokens": draft_tokens, "schedule": "constant",
            "confidence_threshold": 0.0, "plain_tokens_per_s": plain, "plain_seconds": seconds[None],
            "exits": exits}


# -------------------------------------------------------------------------------------- training


def build_model(transformers: Any, args: argparse.Namespace, vocab: int, seed: int) -> Any:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.context, args.prompt_tokens + args.new_tokens),
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def train_one(method: str, seed: int, args: argparse.Namespace, transformers: Any, data: dict[str, Any]
              ) -> dict[str, Any]:
    """Train ``method`` from the seed's initialization on the seed's batches, then measure it."""
    model = build_model(transformers, args, data["vocab"], seed)
    model.train()
    exits = tuple(args.exits)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(args.steps, args.warmup))
    train_batches = windows(data["train"], args.batch, args.context, torch.Generator().manual_seed(seed))
    val_batches = windows(data["hdkd_val"], args.batch, args.context, torch.Generator().manual_seed(10_000 + seed))
    # the evaluation wrapper (any method): exit E = lm_head(norm(hidden_states[E]))
    wrapper = EarlyExitLM(model, exit_layers=exits)
    bilevel = None
    if method == "layerskip":
        all_exits = (*exits, args.layers)
        on = None if args.curriculum == "none" else gradual_curriculum(all_exits, args.layers, 0, args.steps)
        wrapper = EarlyExitLM(model, exit_layers=exits, kd_weight=0.0,
                              ce_weight=layerskip_scale(all_exits, args.layers, args.e_scale, on))
    elif method == "ce_all":
        wrapper = EarlyExitLM(model, exit_layers=exits, kd_weight=0.0)
    elif method == "dense_kd":
        wrapper = EarlyExitLM(model, exit_layers=exits, temperature=args.temperature)
    elif method == "kd_last":
        wrapper = EarlyExitLM(model, exit_layers=exits, temperature=args.temperature, pairs="last")
    elif method == "hdkd":
        wrapper = EarlyExitLM(model, exit_layers=exits, temperature=args.temperature)
        bilevel = hk.HDKD(wrapper, optimizer, hypergrad="fd", update_every=args.update_every)
    elif method != "ce_last":
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    tokens_per_step = args.batch * args.context
    losses: list[float] = []
    print(f"[{method} seed {seed}] {args.steps} steps of {args.batch} x {args.context} tokens", flush=True)
    start = time.perf_counter()
    for step in range(args.steps):
        x = next(train_batches)
        if method == "ce_last":
            loss = model(input_ids=x, labels=x).loss
        elif bilevel is not None:
            if bilevel.will_update():
                xv = next(val_batches)
                stats = bilevel.step(x, x, xv, xv)
            else:
                stats = bilevel.step(x, x)
            loss = torch.tensor(stats.get("loss", float("nan")))
        else:
            if method == "layerskip" and args.curriculum == "gradual":  # C(t, l) changes with the step
                on = gradual_curriculum(wrapper.exit_layers, args.layers, step, args.steps)
                ce_weight = wrapper.criterion.ce_weight
                assert isinstance(ce_weight, Tensor)  # a buffer: updated in place
                ce_weight.copy_(layerskip_scale(wrapper.exit_layers, args.layers, args.e_scale, on))
            loss = wrapper(x, labels=x).loss
        if bilevel is None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            recent = losses[-args.log_every:]
            print(f"[{method} seed {seed}] step {step + 1:5d}/{args.steps}  loss {sum(recent) / len(recent):7.4f}  "
                  f"lr {scheduler.get_last_lr()[0]:.2e}  {(step + 1) * tokens_per_step / elapsed:7.0f} tok/s  "
                  f"{elapsed:6.0f} s, ~{elapsed / (step + 1) * (args.steps - step - 1):5.0f} s left", flush=True)
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "method": method, "seed": seed, "exit_layers": list(wrapper.exit_layers),
        "train": {"steps": args.steps, "tokens": args.steps * tokens_per_step, "seconds": seconds,
                  "tokens_per_s": args.steps * tokens_per_step / seconds,
                  "final_loss": sum(losses[-args.log_every:]) / len(losses[-args.log_every:])},
    }
    if bilevel is not None:
        result["weights"] = {"names": bilevel.weights.objective_names(), "values": bilevel.weights.vector().tolist()}
    elif method == "layerskip":
        result["weights"] = {"names": [f"ce[{e}]" for e in wrapper.exit_layers],
                             "values": torch.as_tensor(wrapper.criterion.ce_weight).tolist()}
    start = time.perf_counter()
    result["eval"] = evaluate(wrapper, data["eval"], args.context, args.eval_tokens)
    result["eval"]["seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    result["generation"] = generation_benchmark(model, data["prompts"], exits, args.new_tokens, args.draft_tokens,
                                                pad_token_id=data["eot"])
    result["generation"]["seconds"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------- report


def _mean_std(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def load_runs(out: Path) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    """Every ``<method>_seed<seed>.json`` in ``out``, by method; the methods in :data:`METHODS` order."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(out.glob("*_seed*.json")):
        r = json.loads(path.read_text())
        runs.setdefault(r["method"], []).append(r)
    if not runs:
        raise FileNotFoundError(f"no <method>_seed<seed>.json result files in {out}")
    return [m for m in METHODS if m in runs] + sorted(set(runs) - set(METHODS)), runs


def layer_speedup(result: dict[str, Any], i: int) -> float:
    r"""The speed-up of early exit ``i``'s drafts if a decoding step cost its number of layers and verifying a
    draft cost one full step (batch-1 decoding on a GPU, memory-bound, comes close; this CPU does not):
    tokens generated over :math:`\text{drafted} \cdot E / L + \text{rounds}`, from the run's own counts."""
    g = result["generation"]
    x = g["exits"][i]
    layers = result["exit_layers"][-1]
    return g["tokens_generated"] / (x["drafted"] * x["exit"] / layers + x["rounds"])


def report(out: Path) -> str:
    """The Markdown table of every ``<method>_seed<seed>.json`` in ``out``: mean ± std (sample) over seeds;
    mismatch counts summed over seeds."""
    methods, runs = load_runs(out)
    first = runs[methods[0]][0]
    exit_layers = first["exit_layers"]
    g = first["generation"]
    # (row name, the value of one run's result, format)
    rows: list[tuple[str, Callable[[dict[str, Any]], float], str]] = []

    def at(*keys: Any, scale: float = 1.0) -> Callable[[dict[str, Any]], float]:
        def value(r: Any) -> float:
            for key in keys:
                r = r[key]
            return scale * float(r)
        return value

    for i, e in enumerate(exit_layers):
        last = " (last)" if i == len(exit_layers) - 1 else ""
        rows.append((f"eval perplexity, exit {e}{last}", at("eval", "ppl", i), ".2f"))
    for i, e in enumerate(exit_layers[:-1]):
        rows.append((f"top-1 agreement with last, exit {e} (%)", at("eval", "agreement", i, scale=100.0), ".1f"))
    for i, e in enumerate(exit_layers[:-1]):
        rows += [(f"drafts accepted, exit {e} (%)", at("generation", "exits", i, "acceptance", scale=100.0), ".1f"),
                 (f"tokens/s, assistant_early_exit={e}", at("generation", "exits", i, "tokens_per_s"), ".1f"),
                 (f"speed-up, exit {e}", at("generation", "exits", i, "speedup"), ".3f"),
                 (f"layer-count speed-up, exit {e} (model)", functools.partial(layer_speedup, i=i), ".3f")]
    rows += [("tokens/s, plain greedy", at("generation", "plain_tokens_per_s"), ".1f"),
             ("train time (s)", at("train", "seconds"), ".0f"),
             ("train tokens/s", at("train", "tokens_per_s"), ".0f"),
             ("final train loss (own objective)", at("train", "final_loss"), ".3f")]

    lines = [f"{first['train']['steps']} steps of {first['train']['tokens'] // first['train']['steps']} tokens; "
             f"eval: {first['eval']['tokens']} tokens; generation: {g['prompts']} prompts of {g['prompt_tokens']} "
             f"tokens, {g['new_tokens']} new tokens, greedy, batch 1, draft length {g['draft_tokens']} "
             f"(schedule {g['schedule']}, confidence threshold {g['confidence_threshold']})", ""]
    seeds = {m: ", ".join(str(r["seed"]) for r in runs[m]) for m in methods}
    lines.append("| | " + " | ".join(f"{m} (seeds {seeds[m]})" for m in methods) + " |")
    lines.append("|---|" + "---|" * len(methods))
    for name, value, fmt in rows:
        cells = [_mean_std([value(r) for r in runs[m]], fmt) for m in methods]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for i, e in enumerate(exit_layers[:-1]):
        cells = []
        for m in methods:
            ex = [r["generation"]["exits"][i] for r in runs[m]]
            total = sum(r["generation"]["prompts"] for r in runs[m])
            cells.append(f"{sum(x['mismatched_prompts'] for x in ex)}/{total} prompts, "
                         f"{sum(x['mismatched_tokens'] for x in ex)} tokens")
        lines.append(f"| outputs differing from plain greedy, exit {e} | " + " | ".join(cells) + " |")
    for m in methods:
        if "weights" in runs[m][0]:
            names = runs[m][0]["weights"]["names"]
            values = [[r["weights"]["values"][j] for r in runs[m]] for j in range(len(names))]
            lines.append("")
            lines.append(f"{m} final weights (mean over seeds): "
                         + ", ".join(f"{n} {statistics.mean(v):.3f}" for n, v in zip(names, values, strict=True)))
    return "\n".join(lines)


def plot(out: Path, path: Path) -> None:
    """A PNG of the runs in ``out`` against the exit's depth, one line per method (mean, bars: ± std over seeds):
    evaluation perplexity at every exit, the share of drafted tokens accepted and the decoding speed-up of
    ``assistant_early_exit=E`` at every early exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, runs = load_runs(out)
    exits = runs[methods[0]][0]["exit_layers"]
    panels = [("eval perplexity (log scale)", lambda r: r["eval"]["ppl"], exits),
              ("drafted tokens accepted (%)", lambda r: [100 * x["acceptance"] for x in r["generation"]["exits"]],
               exits[:-1]),
              ("speed-up over plain greedy (x)", lambda r: [x["speedup"] for x in r["generation"]["exits"]],
               exits[:-1])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (title, values, xs) in zip(axes, panels, strict=True):
        for i, m in enumerate(methods):
            per_seed = [values(r) for r in runs[m]]
            mean = [statistics.mean(v) for v in zip(*per_seed, strict=True)]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*per_seed, strict=True)]
            shift = (i - (len(methods) - 1) / 2) * 0.08  # keep the error bars apart
            ax.errorbar([x + shift for x in xs], mean, yerr=std, marker="o", capsize=3,
                        label=f"{m} ({len(per_seed)} seeds)")
        ax.set_title(title)
        ax.set_xlabel("exit: decoder layers before it")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].axhline(1.0, color="gray", lw=0.8)
    axes[0].legend(fontsize=8)
    steps = runs[methods[0]][0]["train"]["steps"]
    fig.suptitle(f"HF Llama, {len(exits)} exits, {steps} steps on fortunes: early_exit_hf.py", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/early_exit_hf"), help="folder of the per-run JSON files")
    p.add_argument("--report", action="store_true", help="print the Markdown table of the runs in --out; train nothing")
    p.add_argument("--plot", type=Path, default=None, help="with --report: also write this PNG of the runs")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2])
    p.add_argument("--data", type=Path, default=FORTUNES, help="folder of fortune files")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--exits", type=_int_list, default=[2, 4, 6], help="early exits (decoder layers before each)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=400,
                   help="default: about 50 min for 4 methods x 3 seeds in two one-thread processes (docs/lm.md)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5 %% of --steps)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--e-scale", type=float, default=1.0, help="LayerSkip's e_scale")
    p.add_argument("--curriculum", choices=("gradual", "none"), default="gradual", help="LayerSkip's curriculum")
    p.add_argument("--update-every", type=int, default=16, help="HDKD: steps between weight updates")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--draft-tokens", type=int, default=4, help="fixed draft length (num_assistant_tokens)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--tiny", action="store_true", help="smoke-test size: a few steps of a tiny model")
    args = p.parse_args(argv)
    if args.tiny:
        args.vocab, args.layers, args.hidden, args.heads, args.intermediate, args.exits = 300, 3, 32, 2, 64, [1, 2]
        args.context, args.batch, args.steps, args.eval_tokens = 16, 4, 4, 512
        args.prompts, args.prompt_tokens, args.new_tokens, args.draft_tokens = 2, 8, 8, 2
        args.update_every, args.log_every = 2, 2
    if args.warmup is None:
        args.warmup = max(1, args.steps // 20)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    args.methods = methods
    if not args.exits or any(not 1 <= e < args.layers for e in args.exits):
        p.error(f"--exits must be early exits in [1, {args.layers}) (the last layer is always one); got {args.exits}")
    return args


def environment() -> dict[str, Any]:
    import tokenizers
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "hdkd_fast": hk.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        print(report(args.out))
        if args.plot is not None:
            plot(args.out, args.plot)
            print(f"plot: {args.plot}")
        return 0
    try:
        import tokenizers  # noqa: F401
        import transformers
    except ImportError as err:
        print(f"early_exit_hf: {err}; this example needs tokenizers and transformers: pip install 'hdkd_fast[lm]'",
              file=sys.stderr)
        return 2
    if not args.data.is_dir() or not any(args.data.iterdir()):
        print(f"early_exit_hf: no fortune files in {args.data}: apt-get install -y fortunes", file=sys.stderr)
        return 2
    start = time.perf_counter()
    texts = load_fortunes(args.data)
    random.Random(DATA_SEED).shuffle(texts)
    if args.tiny:
        texts = texts[:400]
    n = len(texts)
    parts = {"train": texts[: n * 8 // 10], "hdkd_val": texts[n * 8 // 10 : n * 9 // 10], "eval": texts[n * 9 // 10 :]}
    tokenizer = train_tokenizer(parts["train"], args.vocab)
    data: dict[str, Any] = {name: encode(tokenizer, part) for name, part in parts.items()}
    data["vocab"] = tokenizer.get_vocab_size()
    data["eot"] = tokenizer.token_to_id(EOT)
    data["prompts"] = prompts_from(data["eval"], data["eot"], args.prompts, args.prompt_tokens)
    print(f"fortunes: {n} texts, {sum(len(t) for t in texts) / 1e6:.2f} M characters; BPE vocabulary "
          f"{data['vocab']}; tokens train {len(data['train'])}, hdkd-val {len(data['hdkd_val'])}, eval "
          f"{len(data['eval'])} ({time.perf_counter() - start:.1f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    for seed in args.seeds:
        for method in args.methods:
            result = train_one(method, seed, args, transformers, data)
            result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
            result["data"] = {"texts": n, "vocab": data["vocab"],
                              **{f"tokens_{k}": len(data[k]) for k in ("train", "hdkd_val", "eval")}}
            result["environment"] = env
            path = args.out / f"{method}_seed{seed}.json"
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(path)
            ppl = "  ".join(f"L{e}: {p:.2f}" for e, p in zip(result["exit_layers"], result["eval"]["ppl"], strict=True))
            gen = "  ".join(f"E{x['exit']}: {100 * x['acceptance']:.0f}% acc, x{x['speedup']:.2f}, "
                            f"{x['mismatched_prompts']} differ" for x in result["generation"]["exits"])
            print(f"[{method} seed {seed}] eval perplexity {ppl}\n[{method} seed {seed}] generation: {gen}; plain "
                  f"{result['generation']['plain_tokens_per_s']:.1f} tok/s -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
