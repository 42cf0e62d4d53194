r"""``HarmonizedWeights``: one learnable weight per objective (K CE terms and the selected KD pairs).

Objective order (used by every vector in :mod:`hdkd_fast.bilevel`): the K cross-entropy terms
``ce[0], …, ce[K-1]`` first, then the selected distillation pairs ``kd[i, j]`` in row-major order of
the K×K pair mask (``i`` ascending, then ``j`` ascending). ``n_objectives = K + #pairs``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._pairs import PairMask, PairSpec, pair_mask, selected_pairs
from .._types import KDLosses, LossWeights
from .._validation import check_choice, check_positive_int

PARAMETERIZATIONS = ("per_exit", "softmax", "softplus", "gated", "bounded", "fixed")
BOUNDED_SCALE = 0.3
"""``"bounded"``'s β: every weight stays within (1 − 2β, 1 + 2β) of its start (L2W-DEN's 0.3)."""


class HarmonizedWeights(nn.Module):
    r"""Learnable weights of every objective, returned as :class:`hdkd_fast.LossWeights`.

    With ``n = K + #pairs`` objectives and one free parameter :math:`\varphi_o` per objective:

    - ``"per_exit"`` (default): one mixture per student exit i over its own objectives :math:`G_i` =
      {CE of exit i} ∪ {KD pairs (i, j)}: :math:`w_{G_i} = \mathrm{softmax}(\varphi_{G_i})`, so every exit's weights sum
      to 1 — the weight of its cross-entropy in plain training. The look-ahead can neither inflate the
      weights (a larger total is a larger step, which a one-step look-ahead always likes) nor move weight
      from one exit to another (starving it); it only decides, exit by exit, how much of that exit's
      loss is its labels and how much each later exit's distillation. The search space holds plain
      per-exit CE (every KD share at 0) exactly. Default start: half of each exit's unit on its CE, the
      other half split evenly over its teachers (an exit without teachers: CE 1).
    - ``"softmax"``: :math:`w = n \cdot \mathrm{softmax}(\varphi)`, so :math:`\sum_o w_o = n`
      and :math:`w = 1` at :math:`\varphi = 0`. The fixed total keeps a one-step lookahead from
      simply inflating every weight; the weights only trade off against each other.
    - ``"softplus"``: :math:`w = \log(1 + e^{\varphi})`, positive and unnormalized
      (:math:`\varphi_0 = \log(e - 1)` gives :math:`w = 1`).
    - ``"gated"``: the K CE weights stay at their initial values (a buffer) and each KD pair gets a gate,
      :math:`w_p = 2\,w^0_p\,\sigma(\varphi_p)` with :math:`\varphi_p = 0` at the start (so
      :math:`w_p = w^0_p`, and :math:`w_p \in (0, 2 w^0_p)`). The bilevel step then only decides how much
      each teacher → student pair should distil; no exit's cross-entropy can be starved, and the search
      space holds both plain per-exit CE (every gate shut) and uniform dense KD (every gate at its start).
    - ``"bounded"``: the weights of ``"per_exit"``'s start :math:`w^0`, each scaled within
      :math:`(1 - 2\beta, 1 + 2\beta)` (:data:`BOUNDED_SCALE` β = 0.3, after L2W-DEN, Han et al. 2022):
      :math:`w_o = w^0_o\,(1 + \beta\,(t_o - \bar t_{G_i}))` with :math:`t = \tanh\varphi` and
      :math:`\bar t_{G_i} = \sum_{o \in G_i} w^0_o t_o / \sum_{o \in G_i} w^0_o`, so every exit's total
      stays at its start (1) and no term can be switched off (or on beyond 1.6× its start): the look-ahead
      only leans each exit's mixture, around uniform dense KD.
    - ``"fixed"``: constant weights (a buffer, no parameters): the fixed-weight baseline.

    Args:
        num_exits: K.
        pairs: the criterion's pair selection (``"dense"``, ``"last"``, ``"adjacent"`` or a boolean
            ``Tensor[K, K]`` mask); only these pairs get a weight.
        parameterization: ``"per_exit"``, ``"softmax"``, ``"softplus"``, ``"gated"``, ``"bounded"`` or
            ``"fixed"``.
        init: initial weights (positive, finite; entries of ``kd`` outside the pairs are ignored);
            uniform 1 when ``None`` (``"per_exit"`` and ``"bounded"``: the start above). With ``"softmax"``
            they are rescaled to sum to ``n``, with ``"per_exit"`` and ``"bounded"`` each exit's to sum to 1.

    ``forward()`` returns ``LossWeights(ce: Tensor[K], kd: Tensor[K, K])`` (``kd`` is 0 outside the
    pairs); :meth:`vector` the same weights as one ``Tensor[n]`` in objective order.
    """

    def __init__(
        self,
        num_exits: int,
        pairs: PairSpec = "dense",
        *,
        parameterization: str = "per_exit",
        init: LossWeights | None = None,
    ) -> None:
        super().__init__()
        num_exits = check_positive_int(num_exits, "num_exits")
        check_choice(parameterization, "parameterization", PARAMETERIZATIONS)
        # The direction of a mask is the criterion's concern (detach_teacher); here only the set matters.
        self.mask: PairMask = pair_mask(pairs, num_exits, detach_teacher=False)
        self.pairs = selected_pairs(self.mask)
        self.num_exits = num_exits
        self.num_objectives = num_exits + len(self.pairs)
        self.parameterization = parameterization
        self.pair_rows: Tensor
        self.pair_cols: Tensor
        self.fixed: Tensor
        self.gate_scale: Tensor
        rows = torch.tensor([i for i, _ in self.pairs], dtype=torch.long)
        cols = torch.tensor([j for _, j in self.pairs], dtype=torch.long)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)
        self.student: Tensor
        self.register_buffer("student", torch.cat((torch.arange(num_exits), rows)), persistent=False)
        """The student exit of every objective, in objective order (its ``"per_exit"`` group)."""
        w0 = self._initial_vector(init)
        if parameterization in ("softmax", "per_exit"):
            self.phi = nn.Parameter(w0.log())
        elif parameterization == "softplus":
            self.phi = nn.Parameter(w0 + torch.log(-torch.expm1(-w0)))  # softplus⁻¹(w)
        elif parameterization == "bounded":
            self.register_buffer("fixed", w0)
            self.phi = nn.Parameter(torch.zeros(self.num_objectives))
        elif parameterization == "gated":
            self.register_buffer("fixed", w0[:num_exits].clone())
            self.register_buffer("gate_scale", 2 * w0[num_exits:])
            self.phi = nn.Parameter(torch.zeros(len(self.pairs)))
        else:
            self.register_buffer("fixed", w0)

    def _initial_vector(self, init: LossWeights | None) -> Tensor:
        n, k = self.num_objectives, self.num_exits
        if init is None:
            w0 = torch.ones(n)
            if self.parameterization in ("per_exit", "bounded"):  # CE 1/2, teachers 1/2 between them (exit K: CE 1)
                teachers = torch.bincount(self.student, minlength=k).to(w0) - 1
                w0[:k] = torch.where(teachers > 0, 0.5, 1.0)
                w0[k:] = 0.5 / teachers[self.student[k:]]
            return w0
        if not isinstance(init, LossWeights):
            raise TypeError(f"init must be a LossWeights(ce, kd) or None; got {type(init).__name__}")
        for name, t, shape in (("init.ce", init.ce, (k,)), ("init.kd", init.kd, (k, k))):
            if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating Tensor{list(shape)}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)} for num_exits={k}; got {list(t.shape)}")
        w0 = self.flatten(KDLosses(init.ce.detach().cpu(), init.kd.detach().cpu())).to(torch.get_default_dtype())
        if not bool(torch.isfinite(w0).all()) or bool((w0 <= 0).any()):
            raise ValueError("init weights must be finite and > 0 on every objective")
        if self.parameterization == "softmax":
            w0 = w0 * (n / w0.sum())
        if self.parameterization in ("per_exit", "bounded"):
            w0 = w0 / w0.new_zeros(k).index_add(0, self.student, w0)[self.student]
        return w0

    def flatten(self, values: KDLosses | LossWeights) -> Tensor:
        """``(ce[K], kd[K, K])`` → ``Tensor[n]`` in objective order (the selected ``kd`` entries)."""
        ce, kd = values
        if ce is None:
            raise ValueError("values.ce is None: the objective vector needs the K cross-entropy terms")
        rows = self.pair_rows.to(kd.device)
        cols = self.pair_cols.to(kd.device)
        return torch.cat((ce, kd[rows, cols]))

    def unflatten(self, vector: Tensor) -> LossWeights:
        """``Tensor[n]`` in objective order → ``LossWeights(ce[K], kd[K, K])`` (``kd`` 0 outside the pairs)."""
        k = self.num_exits
        kd = vector.new_zeros(k, k).index_put((self.pair_rows, self.pair_cols), vector[k:])
        return LossWeights(vector[:k], kd)

    def vector(self) -> Tensor:
        """The weights ``Tensor[n]`` in objective order."""
        if self.parameterization == "softmax":
            return self.num_objectives * torch.softmax(self.phi, dim=0)
        if self.parameterization == "per_exit":  # softmax within each group, all groups at once
            k, phi, student = self.num_exits, self.phi, self.student
            shift = phi.detach().new_full((k,), -torch.inf).scatter_reduce(0, student, phi.detach(), "amax")
            e = (phi - shift[student]).exp()
            return e / e.new_zeros(k).index_add(0, student, e)[student]
        if self.parameterization == "softplus":
            return F.softplus(self.phi)
        if self.parameterization == "gated":
            return torch.cat((self.fixed, self.gate_scale * torch.sigmoid(self.phi)))
        if self.parameterization == "bounded":  # w0 (1 + β (t − t̄ of the exit)), t̄ weighted by w0
            w0, t, k, student = self.fixed, torch.tanh(self.phi), self.num_exits, self.student
            mean = t.new_zeros(k).index_add(0, student, w0 * t) / w0.new_zeros(k).index_add(0, student, w0)
            return w0 * (1 + BOUNDED_SCALE * (t - mean[student]))
        return self.fixed

    def forward(self) -> LossWeights:
        return self.unflatten(self.vector())

    def objective_names(self) -> list[str]:
        """``"ce/k"`` then ``"kd/i-j"`` labels, in objective order."""
        return [f"ce/{k}" for k in range(self.num_exits)] + [f"kd/{i}-{j}" for i, j in self.pairs]

    def extra_repr(self) -> str:
        return (f"num_exits={self.num_exits}, num_objectives={self.num_objectives}, "
                f"parameterization={self.parameterization!r}")

