r"""EKD: the full network teaches every sub-network, on class posteriors and on spatial attention.

Embedded Knowledge Distillation (Lyu, Xu, Cheng et al., 2021, "Embedded Knowledge Distillation in
Depth-level Dynamic Neural Network", arXiv:2103.00793; v3 lists Zhao, Lyu, Zhang, Xu, Cheng) trains the
exits of one network jointly with

- temperature KL from the final exit (the full network) to every earlier exit (a sub-network):
  ``pairs="last"`` of :class:`hdkd_fast.DenseKD`;
- self-attention distillation between features of the **same resolution at different depths**: the
  spatial attention map of a shallow feature is pulled toward the (detached) map of the deepest
  feature of that resolution.

The attention map and its distance follow attention transfer (Zagoruyko & Komodakis, ICLR 2017,
"Paying More Attention to Attention"): :math:`a(F) = \mathrm{vec}(\mathrm{mean}_c F_c^2) /
\|\mathrm{vec}(\mathrm{mean}_c F_c^2)\|_2`, compared with a squared L2 distance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._validation import (
    Logits,
    accumulation_dtype,
    check_ignore_index,
    check_logits,
    check_nonnegative,
    check_temperature,
)
from ..backends import check_backend
from ..modules import DenseKD

ATTENTION_REDUCTIONS = ("mean", "sum", "none")
_NORM_EPS = 1e-12  # F.normalize's floor on the norm: an all-zero map stays zero instead of becoming NaN


def attention_map(feature: Tensor) -> Tensor:
    r"""Spatial attention map of a feature ``[B, C, *spatial]``: ``Tensor[B, prod(spatial)]``.

    :math:`a_b = q_b / \max(\|q_b\|_2, \epsilon)` with :math:`q_b = \mathrm{vec}\big(\tfrac{1}{C}
    \sum_c F_{b,c}^2\big)` and :math:`\epsilon = 10^{-12}` (an all-zero feature gives a zero map, not
    NaN). This is the ``at(x)`` of attention transfer (Zagoruyko & Komodakis 2017): each row has unit L2
    norm, so only where the feature is active matters, not its scale or channel count. float16/bfloat16
    features are computed in float32 (squares overflow float16 early); float32/float64 stay as they are.
    """
    if not isinstance(feature, Tensor):
        raise TypeError(f"feature must be a Tensor[B, C, *spatial]; got {type(feature).__name__}")
    if feature.dim() < 3:
        raise ValueError(
            f"feature must be a Tensor[B, C, *spatial] with at least one spatial dimension; got shape "
            f"{list(feature.shape)}"
        )
    if not feature.dtype.is_floating_point:
        raise TypeError(f"feature must be a floating tensor; got dtype {feature.dtype}")
    f = feature.to(accumulation_dtype(feature.dtype))  # no copy for float32/float64
    return F.normalize(f.square().mean(dim=1).flatten(1), p=2.0, dim=1, eps=_NORM_EPS)


def attention_pairs(features: Sequence[Tensor]) -> list[tuple[int, int]]:
    """The ``(student s, teacher t)`` index pairs that :class:`AttentionDistillation` uses, by ascending ``s``.

    Features with at least one spatial dimension are grouped by their spatial size; in every group the
    deepest (last) feature teaches each of the others. 2-D features ``[B, C]`` take no part.
    """
    feats = _check_features(features)
    deepest: dict[tuple[int, ...], int] = {}
    for k, f in enumerate(feats):
        if f.dim() >= 3:
            deepest[tuple(f.shape[2:])] = k
    return [
        (k, deepest[tuple(f.shape[2:])])
        for k, f in enumerate(feats)
        if f.dim() >= 3 and deepest[tuple(f.shape[2:])] != k
    ]


class AttentionDistillation(nn.Module):
    r"""Self-attention distillation between same-resolution features at different depths (EKD).

    ``forward(features)`` takes the K features of a multi-exit model (``model(x, return_features=True)``,
    shallowest first). For every pair ``(s, t)`` of :func:`attention_pairs` (``t`` the deepest feature
    with the spatial size of ``s``):

    .. math:: \ell_{s} = \frac{1}{B} \sum_b \big\| a(F_s)_b - \mathrm{sg}[a(F_t)]_b \big\|_2^2
              = \frac{1}{B} \sum_b \big(2 - 2\,\langle a(F_s)_b, a(F_t)_b \rangle\big)

    with :func:`attention_map` ``a`` and ``sg`` the stop-gradient: the teacher map is detached, so only
    the shallow feature is pulled (:math:`\partial \ell_s / \partial a(F_s)_b = 2 (a_s - a_t)_b / B`).
    Each term lies in [0, 4] whatever the resolution. Attention transfer's code averages the squared
    difference over the map's N = prod(spatial) entries as well (``(at(x) - at(y)).pow(2).mean()``, weight
    β/2 = 500): that is :math:`\ell_s / N`, so AT's weighting corresponds to a weight of 500/N here.

    Args:
        reduction: ``"mean"`` (default: the average of :math:`\ell_s` over the pairs), ``"sum"`` (their
            sum) or ``"none"`` (``Tensor[P]``, one per pair in the order of :func:`attention_pairs`, e.g.
            for :class:`~hdkd_fast.distill.AdaptivePathWeighting`).

    Returns 0 (connected to the graph, so ``backward`` works) when no two features share a spatial size,
    or an empty ``Tensor[0]`` with ``reduction="none"``. float16/bfloat16 features give float32 losses.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ATTENTION_REDUCTIONS:
            raise ValueError(f"reduction must be one of {ATTENTION_REDUCTIONS}; got {reduction!r}")
        self.reduction = reduction

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        pairs = attention_pairs(features)
        feats = list(features)
        acc = accumulation_dtype(feats[0].dtype)
        if not pairs:
            if self.reduction == "none":
                return torch.zeros(0, dtype=acc, device=feats[0].device)
            return feats[0][:0].sum().to(acc)  # exactly 0, and part of the graph
        maps = {k: attention_map(feats[k]) for k in sorted({k for pair in pairs for k in pair})}
        losses = torch.stack([(maps[s] - maps[t].detach()).square().sum(dim=1).mean() for s, t in pairs])
        if self.reduction == "none":
            return losses
        return losses.mean() if self.reduction == "mean" else losses.sum()

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


def _check_features(features: Sequence[Tensor]) -> list[Tensor]:
    if isinstance(features, (Tensor, str, bytes)) or not isinstance(features, Sequence):
        raise TypeError(f"features must be a sequence of Tensor[B, C, *spatial]; got {type(features).__name__}")
    feats = list(features)
    if not feats:
        raise ValueError("features must hold at least one tensor; got an empty sequence")
    for k, f in enumerate(feats):
        if not isinstance(f, Tensor):
            raise TypeError(f"features[{k}] must be a Tensor; got {type(f).__name__}")
        if f.dim() < 2:
            raise ValueError(f"features[{k}] must be a Tensor[B, C, *spatial] or [B, C]; got shape {list(f.shape)}")
        if not f.dtype.is_floating_point:
            raise TypeError(f"features[{k}] must be a floating tensor; got dtype {f.dtype}")
        if f.shape[0] != feats[0].shape[0]:
            raise ValueError(
                f"features[{k}] has batch size {f.shape[0]} but features[0] has {feats[0].shape[0]}: "
                "every feature must hold the same samples"
            )
        if f.device != feats[0].device:
            raise ValueError(f"features[{k}] is on {f.device} but features[0] is on {feats[0].device}")
    if feats[0].shape[0] < 1:
        raise ValueError("features must hold at least one sample (B >= 1); got B = 0")
    return feats


class EKDLoss(nn.Module):
    r"""Embedded Knowledge Distillation (Lyu et al. 2021): last-exit KD plus same-resolution attention distillation.

    ``forward(logits, features, target=None)`` with the K logits and K features of
    ``model(x, return_features=True)`` returns

    .. math:: L = \sum_{k} \mathrm{CE}(z_k, y)
              + \gamma \sum_{k < K-1} T^2\, \mathrm{KL}\big(p_{K-1} \,\|\, p_k\big)
              + \beta\, \mathcal{A}(F_0, \dots, F_{K-1})

    where the first two terms are **one** :class:`hdkd_fast.DenseKD` call with ``pairs="last"`` (the
    final exit detached as the teacher, batch-mean KL, :math:`p_k = \mathrm{softmax}(z_k / T)`) and
    :math:`\mathcal{A}` is :class:`AttentionDistillation` (its ``reduction`` averages or sums over the
    same-resolution pairs). With ``target=None`` the CE terms are left out.

    Args:
        temperature: T > 0 of the KL terms.
        feature_weight: β >= 0, the weight of the attention term (0 skips it). The EKD paper does not
            state a value that carries over to this normalization; see :class:`AttentionDistillation`
            for the conversion from attention transfer's β = 1000.
        kd_weight: γ >= 0, the weight of every KL term.
        reduction: ``"mean"`` or ``"sum"`` over the attention pairs.
        ignore_index: label value whose rows are left out of the CE terms.
        backend: backend of the fused KD op (see :func:`hdkd_fast.available_backends`).
    """

    def __init__(
        self,
        temperature: float = 4.0,
        feature_weight: float = 1.0,
        kd_weight: float = 1.0,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
        self.feature_weight = check_nonnegative(feature_weight, "feature_weight")
        self.kd = DenseKD(
            temperature=check_temperature(temperature), kd_weight=check_nonnegative(kd_weight, "kd_weight"),
            pairs="last", ignore_index=check_ignore_index(ignore_index), backend=check_backend(backend),
        )
        self.attention = AttentionDistillation(reduction)

    def forward(self, logits: Logits, features: Sequence[Tensor], target: Tensor | None = None) -> Tensor:
        info = check_logits(logits)
        feats = _check_features(features)
        if len(feats) != info.num_exits:
            raise ValueError(f"features must hold one feature per exit (K = {info.num_exits}); got {len(feats)}")
        if feats[0].shape[0] != info.batch:
            raise ValueError(f"features hold {feats[0].shape[0]} samples but logits hold B = {info.batch}")
        loss = self.kd(logits, target)
        if self.feature_weight == 0:
            return loss
        return loss + self.feature_weight * self.attention(feats)

    def extra_repr(self) -> str:
        return f"temperature={self.kd.temperature}, feature_weight={self.feature_weight}"

