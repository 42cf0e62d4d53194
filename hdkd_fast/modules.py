"""``DenseKD``: the loss as an ``nn.Module`` holding its configuration (``DenseKDConfig``, shared with
``FusedLinearDenseKD``)."""

from __future__ import annotations

from torch import Tensor, nn

from ._pairs import PairSpec, pair_mask
from ._types import LossWeights
from ._validation import Logits, check_ignore_index, check_positive_int, check_temperature
from .backends import check_backend
from .functional import dense_kd


class DenseKDConfig(nn.Module):
    """The configuration the dense-KD loss modules share (:class:`DenseKD`, which takes logits, and
    :class:`hdkd_fast.FusedLinearDenseKD`, which takes hidden states and a head): checked once here.

    Tensor weights are registered as buffers (or stay parameters if they are ``nn.Parameter``) so
    they follow ``.to(device)`` and the ``state_dict``. ``num_exits``, when given, is checked
    against every call's K.
    """

    def __init__(
        self,
        num_exits: int | None = None,
        temperature: float = 4.0,
        ce_weight: float | Tensor = 1.0,
        kd_weight: float | Tensor = 1.0,
        pairs: PairSpec = "dense",
        detach_teacher: bool = True,
        ignore_index: int = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if num_exits is not None:
            num_exits = check_positive_int(num_exits, "num_exits", "a positive int or None")
        check_backend(backend)
        self.num_exits = num_exits
        self.temperature = check_temperature(temperature)
        self.detach_teacher = bool(detach_teacher)
        self.ignore_index = check_ignore_index(ignore_index)
        self.backend = backend
        if num_exits is not None:
            pair_mask(pairs, num_exits, detach_teacher=self.detach_teacher)  # fail at construction
        self.pairs = pairs
        self.ce_weight: float | Tensor
        self.kd_weight: float | Tensor
        for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                self.register_buffer(name, value)
            else:
                setattr(self, name, value)

    def extra_repr(self) -> str:
        pairs = self.pairs if isinstance(self.pairs, str) else "mask"
        return (f"num_exits={self.num_exits}, temperature={self.temperature}, pairs={pairs!r}, "
                f"detach_teacher={self.detach_teacher}, backend={self.backend!r}")


class DenseKD(DenseKDConfig):
    r"""Dense knowledge distillation over the exits of a multi-exit network.

    ``forward(logits, target=None, weights=None)`` returns the scalar
    :math:`\sum_k \alpha_k \mathrm{ce}[k] + \sum_{ij} \gamma_{ij} \mathrm{kd}[i, j]` of
    :func:`hdkd_fast.dense_kd`, where α, γ are ``ce_weight``/``kd_weight`` or, when given, the
    per-call ``weights`` (e.g. from :class:`hdkd_fast.HarmonizedWeights`). Constructor arguments: see
    :class:`DenseKDConfig`; :class:`hdkd_fast.reference.DenseKD` has the same signature.
    """

    def forward(self, logits: Logits, target: Tensor | None = None, weights: LossWeights | None = None) -> Tensor:
        if self.num_exits is not None:
            k = logits.shape[0] if isinstance(logits, Tensor) else len(logits)
            if k != self.num_exits:
                raise ValueError(f"logits hold {k} exits but this DenseKD was built for num_exits={self.num_exits}")
        ce_weight, kd_weight = (self.ce_weight, self.kd_weight) if weights is None else (weights.ce, weights.kd)
        return dense_kd(
            logits, target, ce_weight=ce_weight, kd_weight=kd_weight, temperature=self.temperature,
            pairs=self.pairs, detach_teacher=self.detach_teacher, ignore_index=self.ignore_index,
            backend=self.backend,
        )
