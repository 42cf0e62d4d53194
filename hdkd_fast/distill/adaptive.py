r"""Adaptive path weighting: one learnable log-variance per distillation path, trained with the network.

Adaptive Distillation (Chennupati, Kamani, Cheng, Chen, BMVC 2021, "Adaptive Distillation: Aggregating
Knowledge from Multiple Paths for Efficient Distillation") weights the losses :math:`L_p` of several
distillation paths with the homoscedastic-uncertainty scheme of Kendall, Gal & Cipolla (CVPR 2018):

.. math:: L = L_{\mathrm{CE}} + \lambda \Big[ \sum_p e^{-\alpha_p} L_p + \sum_p \alpha_p \Big]

with one free :math:`\alpha_p` per path (:math:`\alpha = 0` at the start, i.e. weight 1) updated by the
**same optimizer** as the network. :math:`\partial L / \partial \alpha_p = \lambda (1 - e^{-\alpha_p} L_p)`,
so at a stationary point :math:`e^{-\alpha_p} = 1 / L_p`: a path whose loss stays large is down-weighted,
and the :math:`+\alpha_p` term keeps the weights from collapsing to 0. It is a single-level alternative to
the bilevel weights of :class:`hdkd_fast.HarmonizedWeights` (no validation split, no lookahead).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._pairs import PairSpec, pair_mask, selected_pairs
from .._validation import (
    Logits,
    accumulation_dtype,
    check_count,
    check_ignore_index,
    check_logits,
    check_nonnegative,
    check_temperature,
)
from ..backends import check_backend
from ..functional import dense_kd


class AdaptivePathWeighting(nn.Module):
    r"""Learnable uncertainty weights of P loss paths: ``forward(L) = λ (Σ_p exp(-α_p) L_p + Σ_p α_p)``.

    ``alpha`` is an ``nn.Parameter`` of P zeros: pass ``module.parameters()`` to the model's optimizer
    (it is trained jointly with the network). Gradients: :math:`\partial/\partial \alpha_p = \lambda
    (1 - e^{-\alpha_p} L_p)`, :math:`\partial/\partial L_p = \lambda e^{-\alpha_p}`. Any per-path losses
    can be weighted: KD pairs (see :class:`DenseKDUncertainty`), feature paths (e.g.
    ``AttentionDistillation(reduction="none")``), or both concatenated.

    Args:
        num_paths: P >= 1.
        lam: λ >= 0, the weight of the whole distillation part.
    """

    def __init__(self, num_paths: int, lam: float = 1.0) -> None:
        super().__init__()
        self.num_paths = check_count(num_paths, "num_paths")
        self.lam = check_nonnegative(lam, "lam")
        self.alpha = nn.Parameter(torch.zeros(self.num_paths))

    def path_weights(self) -> Tensor:
        r"""The current weights :math:`e^{-\alpha_p}` (``Tensor[P]``, detached; the loss multiplies them by λ)."""
        return torch.exp(-self.alpha.detach())

    def forward(self, path_losses: Tensor) -> Tensor:
        if not isinstance(path_losses, Tensor):
            raise TypeError(f"path_losses must be a Tensor[P]; got {type(path_losses).__name__}")
        if path_losses.shape != (self.num_paths,):
            raise ValueError(
                f"path_losses must have shape [P] = [{self.num_paths}]; got {list(path_losses.shape)}"
            )
        if not path_losses.dtype.is_floating_point:
            raise TypeError(f"path_losses must be a floating tensor; got dtype {path_losses.dtype}")
        if path_losses.device != self.alpha.device:
            raise ValueError(f"path_losses is on {path_losses.device} but alpha is on {self.alpha.device}")
        alpha = self.alpha
        return self.lam * ((torch.exp(-alpha) * path_losses).sum() + alpha.sum())

    def extra_repr(self) -> str:
        return f"num_paths={self.num_paths}, lam={self.lam}"


class DenseKDUncertainty(nn.Module):
    r"""Dense KD with one learnable uncertainty weight per selected pair (method ``dkd-uncertainty``).

    ``forward(logits, target=None)`` returns

    .. math:: L = \sum_k \mathrm{ce}[k] + \lambda \Big[ \sum_{(i,j)} e^{-\alpha_{ij}}\, \mathrm{kd}[i, j]
              + \sum_{(i,j)} \alpha_{ij} \Big]

    over the pairs selected by ``pairs`` (``kd`` as in :func:`hdkd_fast.dense_kd_losses`: :math:`T^2` ·
    batch-mean KL from the detached teacher exit j to exit i), i.e. :class:`AdaptivePathWeighting` over the
    KD pairs. It is computed by **one** fused :func:`hdkd_fast.dense_kd` call with the weight matrix
    :math:`\lambda e^{-\alpha}` (so the logits gradient comes with the forward) plus :math:`\lambda \sum \alpha`.

    The α of pair ``(i, j)`` is ``alpha[p]`` in the row-major order of the pair mask (``i`` ascending,
    then ``j``), the objective order of :mod:`hdkd_fast.bilevel`. They are ordinary parameters: build the
    optimizer over ``[*model.parameters(), *criterion.parameters()]``.

    Args:
        num_exits: K.
        temperature: T > 0.
        pairs: ``"dense"``, ``"last"``, ``"adjacent"`` or a strictly upper-triangular boolean K×K mask;
            it must select at least one pair.
        lam: λ >= 0.
        ignore_index: label value whose rows are left out of the CE terms.
        backend: backend of the fused op.
    """

    def __init__(
        self,
        num_exits: int,
        temperature: float = 4.0,
        pairs: PairSpec = "dense",
        lam: float = 1.0,
        *,
        ignore_index: int = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_exits = check_count(num_exits, "num_exits")
        self.temperature = check_temperature(temperature)
        self.pairs = pairs
        self.pair_list = selected_pairs(pair_mask(pairs, self.num_exits))
        if not self.pair_list:
            raise ValueError(f"pairs={pairs!r} selects no distillation pair for num_exits={self.num_exits}")
        self.ignore_index = check_ignore_index(ignore_index)
        self.backend = check_backend(backend)
        self.weighting = AdaptivePathWeighting(len(self.pair_list), lam)
        k = self.num_exits
        self._flat_pairs: Tensor
        self.register_buffer("_flat_pairs", torch.tensor([i * k + j for i, j in self.pair_list]), persistent=False)

    @property
    def alpha(self) -> nn.Parameter:
        """``Tensor[P]``: one α per selected pair, in row-major pair order."""
        return self.weighting.alpha

    @property
    def lam(self) -> float:
        return self.weighting.lam

    def _scatter(self, values: Tensor) -> Tensor:
        """``Tensor[K, K]`` with ``values[p]`` at pair p and 0 elsewhere (differentiable in ``values``)."""
        k = self.num_exits
        out = values.new_zeros(k * k).index_put((self._flat_pairs,), values)
        return out.view(k, k)

    def path_weights(self) -> Tensor:
        r"""The current :math:`e^{-\alpha_{ij}}` as a detached ``Tensor[K, K]`` (0 outside the pairs), for
        logging; the loss multiplies them by λ."""
        return self._scatter(self.weighting.path_weights())

    def forward(self, logits: Logits, target: Tensor | None = None) -> Tensor:
        info = check_logits(logits)
        if info.num_exits != self.num_exits:
            raise ValueError(f"logits hold {info.num_exits} exits but this criterion was built for "
                             f"num_exits={self.num_exits}")
        alpha = self.alpha
        if alpha.device != info.device:
            raise ValueError(f"logits are on {info.device} but alpha is on {alpha.device}; move the criterion "
                             "with .to(device)")
        kd_weight = self._scatter(self.lam * torch.exp(-alpha)).to(accumulation_dtype(info.dtype))
        loss = dense_kd(
            logits, target, ce_weight=1.0, kd_weight=kd_weight, temperature=self.temperature, pairs=self.pairs,
            ignore_index=self.ignore_index, backend=self.backend,
        )
        return loss + self.lam * alpha.sum()

    def extra_repr(self) -> str:
        pairs = self.pairs if isinstance(self.pairs, str) else "mask"
        return f"num_exits={self.num_exits}, temperature={self.temperature}, pairs={pairs!r}, lam={self.lam}"
