"""An early-exit language model trained three ways: per-exit CE, dense KD with fixed weights, learned weights.

A small decoder-only transformer (pre-norm, causal) has an exit after every ``--exit-every`` layers; each
exit applies its own final LayerNorm and then the one LM head all exits share (LayerSkip / EE-LLM style).
The text is Debian's ``fortunes`` collection (``/usr/share/games/fortunes``, English quotations and jokes:
``apt-get install -y fortunes``), split by fortune into train / HDKD-validation / evaluation parts, with
a byte-level BPE tokenizer trained on the train part by Hugging Face ``tokenizers``
(``pip install 'hdkd_fast[lm]'``).

Methods (same model initialization, data order and steps):

- ``ce``: :math:`\\sum_k \\mathrm{CE}_k` (``FusedLinearDenseKD`` with ``kd_weight=0``);
- ``dense_kd``: :math:`\\sum_k \\mathrm{CE}_k + \\gamma \\sum_{i<j} T^2 \\mathrm{KL}(p_j \\| p_i)`, fixed weights,
  through :class:`hdkd_fast.FusedLinearDenseKD` (the K×N×V logits are never materialized);
- ``hdkd``: the same objectives with weights learned by :class:`hdkd_fast.HDKD` (bilevel, its default
  hypergradient on a held-out split). HDKD substitutes the model's parameters with ``functional_call`` and
  hands the model's *logits* to its ``DenseKD`` criterion, so this run unembeds every exit (materialized
  logits, fine at this vocabulary size); the fused op takes hidden states and the head instead and does
  not plug into HDKD's criterion slot.

Prints per-exit perplexity on the evaluation part and training tokens/s per method, and writes a plot
(``--out``, PNG). ``--tiny`` is the smoke-test size (seconds).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import hdkd_fast as hk

FORTUNES = Path("/usr/share/games/fortunes")
EOT = "<|endoftext|>"


def load_fortunes(root: Path) -> list[str]:
    """Every fortune of the collection (files split on ``%`` lines; the ``.dat`` indexes and the ``.u8``
    links skipped), in a fixed order."""
    texts: list[str] = []
    for path in sorted(p for p in root.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8")):
        body = path.read_text(encoding="utf-8", errors="replace")
        texts.extend(t.strip() for t in body.split("\n%\n") if t.strip())
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):  # -> tokenizers.Tokenizer
    """A byte-level BPE tokenizer trained on ``texts``, with ``EOT`` as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def encode(tokenizer, texts: list[str]) -> Tensor:
    """The texts as one token stream, ``EOT`` after each."""
    eot = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


class Block(nn.Module):
    """A pre-norm causal transformer layer. Attention is written out (``softmax(QKᵀ/√d + mask) V``): PyTorch's
    fused CPU attention has no forward-mode derivative, which HDKD's ``"jvp"`` hypergradient (the one
    ``"auto"`` takes under bf16 autocast) needs."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        b, s, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + mask, dim=-1)
        h = h + self.proj((attn @ v).transpose(1, 2).reshape(b, s, d))
        return h + self.mlp(self.norm2(h))


class EarlyExitLM(nn.Module):
    """Token + position embeddings, ``layers`` causal pre-norm transformer layers, an exit (LayerNorm)
    after every ``exit_every`` layers, one shared LM head. ``hidden(x)`` returns the exits' normed hidden
    states ``[K, B·S, D]``; ``forward(x)`` their logits ``[K, B·S, V]`` (for HDKD)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, exit_every: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.exit_after = [i for i in range(layers) if (i + 1) % exit_every == 0 or i == layers - 1]
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in self.exit_after)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.num_exits = len(self.exit_after)
        mask = torch.triu(torch.full((context, context), -math.inf), diagonal=1)
        self.register_buffer("causal", mask, persistent=False)

    def hidden(self, x: Tensor) -> Tensor:
        s = x.shape[1]
        h = self.embed(x) + self.pos[:s]
        exits = []
        for i, block in enumerate(self.blocks):
            h = block(h, self.causal[:s, :s])
            if i in self.exit_after:
                exits.append(self.norms[len(exits)](h).flatten(0, 1))
        return torch.stack(exits)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.hidden(x))


def batches(stream: Tensor, batch: int, context: int, steps: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """``steps`` random windows ``(x [B, S], y [B·S])`` of the stream, the same for every method."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - context - 1, (steps, batch), generator=g)
    out = []
    for row in starts:
        windows = torch.stack([stream[s : s + context + 1] for s in row.tolist()])
        out.append((windows[:, :-1], windows[:, 1:].flatten()))
    return out


@torch.no_grad()
def perplexities(model: EarlyExitLM, stream: Tensor, context: int) -> list[float]:
    """Per-exit perplexity ``exp(mean CE)`` over consecutive windows of ``stream``."""
    model.eval()
    usable = (len(stream) - 1) // context * context
    x = stream[:usable].view(-1, context)
    y = stream[1 : usable + 1]
    ce = torch.zeros(model.num_exits, dtype=torch.float64)
    for rows in range(0, len(x), 64):
        hidden = model.hidden(x[rows : rows + 64])
        n = hidden.shape[1]
        out = hk.fused_linear_dense_kd(hidden, model.head.weight, y[rows * context : rows * context + n])
        assert out.ce is not None
        ce += out.ce.double() * n
    model.train()
    return [math.exp(v) for v in (ce / usable).tolist()]


def train(method: str, args: argparse.Namespace, vocab: int, data: dict[str, Tensor]) -> dict[str, object]:
    torch.manual_seed(args.seed)
    model = EarlyExitLM(vocab, args.dim, args.layers, args.heads, args.exit_every, args.context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    k = model.num_exits
    train_batches = batches(data["train"], args.batch, args.context, args.steps, args.seed)
    val_batches = batches(data["hdkd_val"], args.batch, args.context, args.steps, args.seed + 1)
    bilevel = None
    if method == "hdkd":
        criterion = hk.DenseKD(k, temperature=args.temperature)
        weights = hk.HarmonizedWeights(k, init=hk.LossWeights(torch.ones(k), torch.full((k, k), args.kd_weight)))
        bilevel = hk.HDKD(model, optimizer, criterion=criterion, weights=weights,
                          weight_optimizer=torch.optim.Adam(weights.parameters(), lr=args.weight_lr),
                          update_every=args.update_every)
    else:
        fused = hk.FusedLinearDenseKD(k, temperature=args.temperature,
                                      kd_weight=0.0 if method == "ce" else args.kd_weight)
    start = time.perf_counter()
    for (x, y), (xv, yv) in zip(train_batches, val_batches, strict=True):
        if bilevel is not None:
            bilevel.step(x, y, xv, yv)
        else:
            optimizer.zero_grad(set_to_none=True)
            fused(model.hidden(x), model.head.weight, y).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    result: dict[str, object] = {
        "method": method, "ppl": perplexities(model, data["eval"], args.context),
        "tokens_per_s": args.steps * args.batch * args.context / seconds, "seconds": seconds,
        "exit_layers": [i + 1 for i in model.exit_after],
    }
    if bilevel is not None:
        result["weights"] = bilevel.weights.vector().tolist()
    return result


def plot(results: list[dict[str, object]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(r["exit_layers"], r["ppl"], marker="o",  # type: ignore[arg-type]
                label=f"{r['method']} ({r['tokens_per_s']:.0f} tok/s)")
    ax.set_xticks(results[0]["exit_layers"])  # type: ignore[arg-type]
    ax.set_xlabel("exit after layer")
    ax.set_ylabel("evaluation perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=FORTUNES, help="folder of fortune files")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--exit-every", type=int, default=2)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--weight-lr", type=float, default=0.05)
    p.add_argument("--update-every", type=int, default=4)
    p.add_argument("--methods", default="ce,dense_kd,hdkd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("early_exit_lm.png"))
    p.add_argument("--tiny", action="store_true", help="smoke-test size: a few steps of a tiny model")
    args = p.parse_args(argv)
    if args.tiny:
        args.vocab, args.dim, args.layers, args.heads, args.context, args.batch, args.steps = 300, 16, 2, 2, 16, 4, 4
        args.exit_every, args.update_every = 1, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        print("early_exit_lm: the `tokenizers` library is missing: pip install 'hdkd_fast[lm]'", file=sys.stderr)
        return 2
    if not args.data.is_dir() or not any(args.data.iterdir()):
        print(f"early_exit_lm: no fortune files in {args.data}: apt-get install -y fortunes", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    texts = load_fortunes(args.data)
    random.Random(args.seed).shuffle(texts)
    if args.tiny:
        texts = texts[:400]
    n = len(texts)
    parts = {"train": texts[: n * 8 // 10], "hdkd_val": texts[n * 8 // 10 : n * 9 // 10], "eval": texts[n * 9 // 10 :]}
    tokenizer = train_tokenizer(parts["train"], args.vocab)
    data = {name: encode(tokenizer, part) for name, part in parts.items()}
    vocab = tokenizer.get_vocab_size()
    print(f"fortunes: {n} texts, {sum(len(t) for t in texts) / 1e6:.2f} M characters; BPE vocabulary {vocab}; "
          f"tokens train {len(data['train'])}, hdkd-val {len(data['hdkd_val'])}, eval {len(data['eval'])}")
    results = []
    for method in args.methods.split(","):
        r = train(method, args, vocab, data)
        results.append(r)
        ppl = "  ".join(f"L{layer}: {p:7.1f}" for layer, p in zip(r["exit_layers"], r["ppl"], strict=True))  # type: ignore[call-overload]
        print(f"{method:>9}  eval perplexity per exit  {ppl}   {r['tokens_per_s']:7.0f} train tokens/s "
              f"({r['seconds']:.1f} s)")
        if "weights" in r:
            print(f"{'':>9}  learned weights (ce per exit, then kd pairs): "
                  + ", ".join(f"{w:.2f}" for w in r["weights"]))  # type: ignore[attr-defined]
    title = (f"fortunes, {args.layers} layers × d={args.dim}, V={vocab}, {args.steps} steps of "
             f"{args.batch}×{args.context} tokens")
    plot(results, args.out, title)
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
