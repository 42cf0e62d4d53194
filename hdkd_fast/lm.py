"""Early-exit training of a Hugging Face causal LM with the fused dense-KD op (docs/lm.md).

:class:`EarlyExitLM` wraps a Llama, Qwen2, Mistral or Gemma-style ``*ForCausalLM`` (a decoder-layer list
``model.model.layers``, a final norm ``model.model.norm`` and an LM head ``model.lm_head``). Exit ``E``
reads the hidden state after the first ``E`` decoder layers, puts it through the model's own final norm and
LM head, exactly as ``model.generate(..., assistant_early_exit=E)`` drafts tokens (transformers'
``EarlyExitCandidateGenerator`` sets ``config.num_hidden_layers = E``, and the base model then runs
``layers[:E]``, its ``norm`` and the head). The wrapper adds no parameters: ``wrapper.model`` is the stock
model, saved and loaded by ``save_pretrained`` / ``from_pretrained`` unchanged.

``transformers`` is not imported here: any ``nn.Module`` with the three parts above works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor, nn

from ._pairs import PairSpec
from ._types import ExitFeatures, KDLosses
from ._validation import check_int
from .bilevel.shared_head import SharedHeadObjectives
from .fused_linear import FusedLinearDenseKD

SUPPORTED = "Llama, Qwen2, Mistral and Gemma-style *ForCausalLM models"


@dataclass
class EarlyExitLMOutput:
    """What :meth:`EarlyExitLM.forward` returns.

    ``loss``: :math:`\\sum_k \\alpha_k \\mathrm{ce}[k] + \\sum_{ij} \\gamma_{ij} \\mathrm{kd}[i, j]` (0-dim);
    ``exit_losses``: :class:`hdkd_fast.KDLosses` (``ce [K]``, ``kd [K, K]``), exits in ``exit_layers`` order;
    ``exit_layers``: the decoder-layer count of each exit (the last is the model's depth);
    ``num_tokens``: the token rows that entered the losses (non-padding positions with a next position).
    """

    loss: Tensor
    exit_losses: KDLosses
    exit_layers: tuple[int, ...]
    num_tokens: int

    def __getitem__(self, key: int | str) -> Any:
        """``out["loss"]`` / ``out[0]`` is ``out.loss``, as on a Hugging Face ``ModelOutput`` (what ``Trainer``
        reads); ``out[name]`` is the field ``name``, ``out[i]`` the ``i``-th field in the order above."""
        names = tuple(f.name for f in fields(self))
        if isinstance(key, str):
            if key not in names:
                raise KeyError(f"EarlyExitLMOutput has no field {key!r}; its fields: {', '.join(names)}")
            return getattr(self, key)
        if isinstance(key, int) and not isinstance(key, bool):
            return getattr(self, names[key])
        raise TypeError(f"EarlyExitLMOutput indices must be field names or ints; got {type(key).__name__}")


def _model_parts(model: object) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.Linear]:
    """``(base model, decoder layers, final norm, LM head)`` of a supported model; a ``TypeError`` naming
    what is missing otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"EarlyExitLM: model must be an nn.Module ({SUPPORTED}); got {type(model).__name__}")
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    norm = getattr(base, "norm", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        head = getattr(model, "lm_head", None)
    missing = [what for what, part, kind in (
        ("model.model (the base decoder)", base, nn.Module),
        ("model.model.layers (the decoder-layer list)", layers, nn.ModuleList),
        ("model.model.norm (the final norm)", norm, nn.Module),
        ("model.lm_head / get_output_embeddings() (an nn.Linear LM head)", head, nn.Linear),
    ) if not isinstance(part, kind)]
    if missing:
        raise TypeError(f"EarlyExitLM supports {SUPPORTED}; {type(model).__name__} lacks: " + ", ".join(missing))
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        raise TypeError(f"EarlyExitLM: {type(model).__name__} soft-caps its logits (config.final_logit_softcapping="
                        f"{softcap}), which the fused op (plain h W^T + b logits) does not model")
    assert isinstance(base, nn.Module) and isinstance(layers, nn.ModuleList)
    assert isinstance(norm, nn.Module) and isinstance(head, nn.Linear)
    return base, layers, norm, head


def next_token_targets(labels: Tensor) -> Tensor:
    """``labels [B, T]`` → ``Tensor[B (T - 1)]``: position ``t`` predicts ``labels[:, t + 1]`` (the rows of
    :meth:`EarlyExitLM.forward`'s ``return_features=True`` output, in order)."""
    return labels[:, 1:].reshape(-1)


def check_exit_layers(exit_layers: object, num_layers: int) -> tuple[int, ...]:
    """``exit_layers`` as a tuple of ints, strictly increasing, each in ``[1, num_layers)``, with
    ``num_layers`` (the final layer, always the last exit) appended."""
    if isinstance(exit_layers, (str, bytes)) or not isinstance(exit_layers, Sequence):
        raise TypeError(f"exit_layers must be a sequence of ints; got {type(exit_layers).__name__}")
    exits = [check_int(e, f"exit_layers[{i}]") for i, e in enumerate(exit_layers)]
    if exits and exits[-1] == num_layers:
        exits = exits[:-1]
    for i, e in enumerate(exits):
        if not 1 <= e < num_layers:
            raise ValueError(f"exit_layers[{i}] must be in [1, {num_layers}) (decoder layers before the exit; "
                             f"the final layer {num_layers} is always the last exit); got {e}")
        if i and e <= exits[i - 1]:
            raise ValueError(f"exit_layers must be strictly increasing; got {list(exit_layers)}")
    return (*exits, num_layers)


def _drop_tied_aliases(module: EarlyExitLM, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """State-dict post-hook: :meth:`EarlyExitLM.tied_aliases` leave ``state``."""
    for alias, name in module.tied_aliases().items():
        if prefix + name in state:
            state.pop(prefix + alias, None)


def _refill_tied_aliases(module: EarlyExitLM, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: each missing alias gets its first name's tensor."""
    for alias, name in module.tied_aliases().items():
        if prefix + alias not in state and prefix + name in state:
            state[prefix + alias] = state[prefix + name]


class EarlyExitLM(nn.Module):
    r"""A causal LM trained at several depths at once: every exit's next-token cross-entropy plus dense KD
    between the exits, through the fused op (:func:`hdkd_fast.fused_linear_dense_kd`: no ``[K, N, V]``
    logits are materialized).

    Args:
        model: a Hugging Face ``*ForCausalLM`` of the Llama, Qwen2, Mistral or Gemma family (``model.model.
            layers``, ``model.model.norm``, ``model.lm_head``); kept as ``self.model``, unchanged.
        exit_layers: decoder layers before each early exit, as ``generate(..., assistant_early_exit=E)``
            counts them (ints, strictly increasing, ``1 <= E < num_layers``); the final layer is appended
            when absent.
        temperature, pairs, detach_teacher: as in :func:`hdkd_fast.dense_kd_losses`.
        ce_weight: float or ``Tensor[K]``; kd_weight: float or ``Tensor[K, K]`` (1.0 each by default).
        ignore_index: the label to ignore (-100, as Hugging Face).
        chunk_size, backend: as in :func:`hdkd_fast.fused_linear_dense_kd`.
    """

    def __init__(self, model: nn.Module, exit_layers: Sequence[int] = (), *, temperature: float = 2.0,
                 pairs: PairSpec = "dense", ce_weight: float | Tensor = 1.0, kd_weight: float | Tensor = 1.0,
                 detach_teacher: bool = True, ignore_index: int = -100, chunk_size: int | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        _, layers, _, _ = _model_parts(model)
        self.model = model
        self.exit_layers = check_exit_layers(exit_layers, len(layers))
        self.criterion = FusedLinearDenseKD(len(self.exit_layers), temperature=temperature, ce_weight=ce_weight,
                                            kd_weight=kd_weight, pairs=pairs, detach_teacher=detach_teacher,
                                            ignore_index=ignore_index, chunk_size=chunk_size, backend=backend)
        if hasattr(self, "register_state_dict_post_hook"):
            self.register_state_dict_post_hook(_drop_tied_aliases)
            self.register_load_state_dict_pre_hook(_refill_tied_aliases)
        else:  # torch < 2.5: the same hooks under their private names
            self._register_state_dict_hook(_drop_tied_aliases)
            self._register_load_state_dict_pre_hook(_refill_tied_aliases, with_module=True)

    accepts_loss_kwargs = False
    """Read by ``transformers.Trainer``: the loss is already a per-batch mean (every exit's cross-entropy over
    its labelled tokens, the KD over the rows), so ``Trainer`` passes no ``num_items_in_batch`` and divides by
    the gradient-accumulation steps itself."""

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    def _model_method(self, name: str) -> Any:
        method = getattr(self.model, name, None)
        if not callable(method):
            raise AttributeError(f"EarlyExitLM.{name}: the wrapped {type(self.model).__name__} has no {name}()")
        return method

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> Any:
        """``self.model.gradient_checkpointing_enable(...)`` (what ``Trainer(gradient_checkpointing=True)`` calls
        before transformers 5): each decoder layer recomputes its activations in backward; the exits'
        ``hidden_states`` are still collected."""
        return self._model_method("gradient_checkpointing_enable")(*args, **kwargs)

    def gradient_checkpointing_disable(self) -> Any:
        """``self.model.gradient_checkpointing_disable()``."""
        return self._model_method("gradient_checkpointing_disable")()

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> Any:
        """``self.model.activation_checkpointing_enable(...)`` (transformers >= 5's name, which ``Trainer(
        activation_checkpointing=True)`` calls)."""
        return self._model_method("activation_checkpointing_enable")(*args, **kwargs)

    def activation_checkpointing_disable(self) -> Any:
        """``self.model.activation_checkpointing_disable()``."""
        return self._model_method("activation_checkpointing_disable")()

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether ``self.model`` checkpoints its layers."""
        name = "is_activation_checkpointing" if hasattr(self.model, "is_activation_checkpointing") \
            else "is_gradient_checkpointing"  # transformers < 5
        return bool(getattr(self.model, name, False))

    def tied_aliases(self) -> dict[str, str]:
        """``{alias: name}`` for every tensor registered under several names (an LM head tied to the input
        embedding: ``{"model.lm_head.weight": "model.model.embed_tokens.weight"}``), ``name`` the first.
        ``state_dict()`` leaves the aliases out and ``load_state_dict`` refills them from ``name``: safetensors,
        in which ``Trainer`` checkpoints a module that is not a ``PreTrainedModel``, refuses two names of one
        tensor."""
        first: dict[int, str] = {}
        aliases = {}
        for name, t in [*self.named_parameters(remove_duplicate=False), *self.named_buffers(remove_duplicate=False)]:
            if id(t) in first:
                aliases[name] = first[id(t)]
            else:
                first[id(t)] = name
        return aliases

    def exit_hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[Tensor]:
        """Each exit's final-normed hidden states ``[B, T, H]`` (the LM head's input), from one decoder run."""
        return self._hidden_and_head(input_ids, attention_mask)[0]

    def _hidden_and_head(self, input_ids: Tensor, attention_mask: Tensor | None) -> tuple[list[Tensor], nn.Linear]:
        base, _, norm, head = _model_parts(self.model)
        out = base(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                   use_cache=False, return_dict=True)
        hidden_states: Any = out.hidden_states
        # hidden_states[E] is the output of the first E layers; the last one (= last_hidden_state) is
        # already normed by the base model, the early ones are not.
        return [norm(hidden_states[e]) for e in self.exit_layers[:-1]] + [out.last_hidden_state], head

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, *, return_features: bool = False) -> EarlyExitLMOutput | ExitFeatures:
        """Losses of ``input_ids [B, T]``. ``labels [B, T]`` default to ``input_ids``; position ``t`` predicts
        ``labels[:, t + 1]`` (shifted as Hugging Face's causal-LM loss), ``ignore_index`` labels leave the
        cross-entropy only. Positions where ``attention_mask == 0`` leave everything: a padding position
        is no row of the losses, and a padding label is ignored.

        ``return_features=True`` returns :class:`hdkd_fast.ExitFeatures` instead (what :class:`hdkd_fast.HDKD`
        trains through, :meth:`hdkd_objectives`): every exit's normed hidden states at positions
        ``0..T-2`` as ``[B (T - 1), H]`` rows (labels: :func:`next_token_targets`) and the head; ``labels`` are
        not read, and padding positions stay in (give their labels ``ignore_index``)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T]; got shape {tuple(input_ids.shape)}")
        if labels is None:
            labels = input_ids
        if not return_features:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}; "
                                 f"got {tuple(labels.shape)}")
            if attention_mask is not None and attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}; "
                                 f"got {tuple(attention_mask.shape)}")
        hidden, head = self._hidden_and_head(input_ids, attention_mask)
        exits = [h[:, :-1].reshape(-1, h.shape[-1]) for h in hidden]  # position t predicts labels[:, t + 1]
        if return_features:
            return ExitFeatures(exits, head.weight, head.bias)
        target = next_token_targets(labels)
        if attention_mask is not None:
            target = target.masked_fill(next_token_targets(attention_mask) == 0, self.criterion.ignore_index)
            rows = attention_mask[:, :-1].reshape(-1) != 0
            exits = [h[rows] for h in exits]
            target = target[rows]
        loss, losses = self.criterion.loss_and_losses(exits, head.weight, target, head.bias)
        return EarlyExitLMOutput(loss, losses, self.exit_layers, int(target.shape[0]))

    def hdkd_objectives(self) -> SharedHeadObjectives:
        """The objectives :class:`hdkd_fast.HDKD` learns the weights of: this wrapper's criterion (its
        temperature, pairs, ...; not its ``ce_weight``/``kd_weight``, which the learned weights replace) on
        ``forward(input_ids, return_features=True)``, with ``HDKD.step(input_ids, labels, ...)``'s labels
        shifted by :func:`next_token_targets`."""
        return SharedHeadObjectives(self.criterion, next_token_targets, {"return_features": True})

    def extra_repr(self) -> str:
        return f"exit_layers={self.exit_layers}"
