"""What a training pass of a layer leaves behind for Opacus's samplers, and how the layer
tells that Opacus will ask for it."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class _Sequence:
    """One layer-direction's backward pass, kept for its per-sample gradients."""

    names: tuple[str, str, str, str]  # weight_ih, weight_hh, bias_ih, bias_hh
    inputs: torch.Tensor  # [T, B, I]
    h_prev: torch.Tensor  # [T, B, H] the state each step started from
    d_gi: torch.Tensor  # [T, B, G] gradient of the input pre-activations
    d_gh: torch.Tensor  # [T, B, G] ... of the recurrent ones (the same tensor but in the GRU)
    _bias: tuple[torch.Tensor, torch.Tensor] | None = None

    def bias_samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample gradients [B, G] of the input and recurrent biases, summed once."""
        if self._bias is None:
            d_bi = self.d_gi.sum(0)
            self._bias = (d_bi, d_bi if self.d_gh is self.d_gi else self.d_gh.sum(0))
        return self._bias


@dataclass
class _Pass:
    """What one training forward pass of a layer leaves for Opacus's grad sampler."""

    layer: nn.Module
    sequences: list[_Sequence] = field(default_factory=list)
    output_norm: torch.Tensor | None = None  # of the gradient reaching the layer's output


def _opacus_will_sample(record: _Pass | None) -> bool:
    """Opacus's forward hook stores the layer's inputs in ``layer.activations`` and its
    backward hook, which runs after this layer's backward pass, takes them back out; so
    during the backward pass a non-empty list means per-sample gradients will be asked for
    (hooks disabled or no Opacus: no list)."""
    return record is not None and bool(getattr(record.layer, "activations", None))


def _require_samplers(layer: nn.Module) -> None:
    """Opacus will ask for per-sample gradients of ``layer``; without this package's samplers
    in its registry it falls back to functorch, which cannot run these layers and fails
    with an error that does not say why."""
    grad_sample = sys.modules.get("opacus.grad_sample.grad_sample_module")
    if grad_sample is None or type(layer) not in grad_sample.GradSampleModule.GRAD_SAMPLERS:
        raise RuntimeError(f"{type(layer).__name__} is not registered with Opacus: call "
                           "fedrnn.shared.nn.register_with_opacus() where training imports "
                           "Opacus, before its first backward pass")
