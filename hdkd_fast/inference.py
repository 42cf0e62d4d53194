"""Early-exit inference that really stops: a sample leaves at its first confident exit and is not computed further.

Confidence criteria (``p = softmax(z)`` of an exit's logits ``z``):

- ``"maxprob"``: exit k accepts a sample when ``max_c p_c ≥ τ_k``;
- ``"entropy"``: exit k accepts a sample when ``H(p) = −Σ_c p_c log p_c ≤ τ_k``.

:func:`confidence` maps both to a score that is larger for more confident samples (``max_c p_c``,
resp. ``−H(p)``), so that in either case exit k accepts when ``score ≥ signed_threshold(τ_k)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, TypeVar, cast

import torch
from torch import Tensor, nn

from ._validation import is_real
from .models.base import MultiExitModule, eval_mode

Criterion = Literal["maxprob", "entropy"]
_T = TypeVar("_T", float, Tensor)
CRITERIA: tuple[str, ...] = ("maxprob", "entropy")


def check_criterion(criterion: object) -> Criterion:
    """``criterion`` must be ``"maxprob"`` or ``"entropy"``."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}; got {criterion!r}")
    return cast(Criterion, criterion)


def confidence(logits: Tensor, criterion: Criterion = "maxprob") -> Tensor:
    """Confidence score ``[...]`` of logits ``[..., C]``: ``max_c p_c`` (maxprob) or ``−H(p)`` (entropy).

    Computed in at least float32; larger means more confident.
    """
    check_criterion(criterion)
    log_p = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
    if criterion == "maxprob":
        return log_p.max(dim=-1).values.exp()
    return -torch.special.entr(log_p.exp()).sum(dim=-1)  # −H(p); entr(0) = 0


def signed_threshold(threshold: _T, criterion: Criterion) -> _T:
    """A threshold in the criterion's own units, as a bound on :func:`confidence` (negated for entropy)."""
    return threshold if criterion == "maxprob" else -threshold


class EarlyExitResult(NamedTuple):
    """Per-sample outcome of :class:`EarlyExit`, in input order."""

    predictions: Tensor  # [N] int64: argmax of the logits at the exit taken
    exits: Tensor  # [N] int64: index of the exit taken, 0 … K−1
    logits: Tensor  # [N, C]: the logits at the exit taken


class EarlyExit(nn.Module):
    """Batched early-exit inference for a :class:`hdkd_fast.models.MultiExitModule`.

    ``EarlyExit(model, thresholds)(x)`` runs the exits of ``x`` in order, in eval mode and without
    gradients. After exit k every sample still running whose confidence passes ``thresholds[k]`` (see
    the module docstring) is answered by exit k and removed from the batch: the later blocks only
    compute the samples left. Every sample that reaches the last exit is answered there, whatever
    ``thresholds[K−1]`` says (it is accepted so that fitted thresholds, e.g.
    :attr:`hdkd_fast.evaluation.BudgetCurve.thresholds`, can be passed as they are).

    The answer is that of computing every exit and taking, for each sample, the first exit whose
    confidence passes its threshold (exactly, as long as the model's kernels give a sample the same
    result whatever the batch it is in; float64 tests check this).

    Args:
        model: an ``MSDNet``, a ``MultiExitResNet`` or a model built by ``attach_exits``.
        thresholds: K numbers ``τ_k`` (a sequence or a 1-D tensor).
        criterion: ``"maxprob"`` (exit when ``max p ≥ τ``) or ``"entropy"`` (exit when ``H(p) ≤ τ``).
    """

    def __init__(
        self, model: MultiExitModule, thresholds: Sequence[float] | Tensor, criterion: Criterion = "maxprob"
    ) -> None:
        super().__init__()
        if not isinstance(model, MultiExitModule):
            raise TypeError(
                "model must be a multi-exit model of hdkd_fast.models (MSDNet, MultiExitResNet or attach_exits(...)); "
                f"got {type(model).__name__}"
            )
        self.criterion = check_criterion(criterion)
        self.model = model
        self.thresholds: tuple[float, ...] = _check_thresholds(thresholds, model.num_exits)

    def forward(self, x: Tensor) -> EarlyExitResult:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor; got {type(x).__name__}")
        if x.dim() < 1 or x.shape[0] < 1:
            raise ValueError(f"x must be a batch with at least one sample; got shape {list(x.shape)}")
        n, last = int(x.shape[0]), self.model.num_exits - 1
        running = torch.arange(n, device=x.device)  # input positions of the rows still in the batch
        predictions = torch.empty(n, dtype=torch.long, device=x.device)
        exits = torch.empty_like(predictions)
        chosen: Tensor | None = None  # [N, C]: the logits of the exit taken
        bounds = [signed_threshold(t, self.criterion) for t in self.thresholds]

        def on_exit(k: int, logits: Tensor, feature: Tensor) -> Tensor:
            nonlocal running, chosen
            if logits.dim() != 2 or logits.shape[0] != running.numel():
                raise RuntimeError(
                    f"exit {k} returned logits of shape {list(logits.shape)} for {running.numel()} running samples"
                )
            if k == last:
                done = torch.ones(running.numel(), dtype=torch.bool, device=x.device)
            else:
                done = confidence(logits, self.criterion) >= bounds[k]
            rows = running[done]
            predictions[rows] = logits[done].argmax(dim=1)
            exits[rows] = k
            if chosen is None:
                chosen = logits.new_empty(n, logits.shape[1])
            chosen[rows] = logits[done]
            running = running[~done]
            return ~done

        with eval_mode(self.model), torch.no_grad():
            self.model.forward_exits(x, on_exit)
        if chosen is None:
            raise RuntimeError(f"{type(self.model).__name__}.forward_exits computed no exit")
        return EarlyExitResult(predictions, exits, chosen)


def _check_thresholds(thresholds: Sequence[float] | Tensor, num_exits: int) -> tuple[float, ...]:
    if isinstance(thresholds, Tensor):
        if thresholds.dim() != 1 or not thresholds.dtype.is_floating_point:
            raise ValueError(
                "thresholds must be a 1-D floating tensor; "
                f"got shape {list(thresholds.shape)}, dtype {thresholds.dtype}"
            )
        values = thresholds.detach().to("cpu", torch.float64)
    elif isinstance(thresholds, Sequence) and not isinstance(thresholds, (str, bytes)):
        for k, t in enumerate(thresholds):
            if not is_real(t):
                raise TypeError(f"thresholds[{k}] must be a real number; got {type(t).__name__}")
        values = torch.tensor([float(t) for t in thresholds], dtype=torch.float64)
    else:
        raise TypeError(f"thresholds must be a sequence of K numbers or a 1-D tensor; got {type(thresholds).__name__}")
    if values.numel() != num_exits:
        raise ValueError(f"thresholds must hold one value per exit (K = {num_exits}); got {values.numel()}")
    result = tuple(values.tolist())
    if any(math.isnan(t) for t in result):
        raise ValueError(f"thresholds must not be NaN; got {list(result)}")
    return result
