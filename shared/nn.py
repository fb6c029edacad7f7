"""DP-ready recurrent layers: drop-in ``LSTM``, ``GRU``, ``RNN`` with cheap, exact per-sample
gradients under Opacus.

Same constructor, parameter names (``weight_ih_l0``, ``bias_hh_l1_reverse`` ...), outputs
and initial states as torch's layers, so state dicts load both ways. ``forward`` also
takes ``lengths`` [B]: steps past a sequence's length leave the state unchanged and
output zeros, and the reverse direction starts at each sequence's own end.

Why they are fast. For a recurrent weight, the per-sample gradient is a sum over time of
outer products: ``dW_hh[b] = sum_t dA_t[b] (x) h_{t-1}[b]``, where ``dA_t`` is the gradient
of the gate pre-activations. The input projection is computed for all steps at once
(``gi``), the recurrent one step by step (``gh_t``); the forward pass keeps ``gi`` and
every ``h_{t-1}``, the ordinary backward pass fills ``gi``'s gradient, and the gradient
of ``gh_t`` follows from it (see ``_Capture``). The grad sampler registered with Opacus
then needs two batched contractions per layer and direction, where Opacus's ``DPLSTM``
hooks a module at every time step.
Measured with ``fedrnn bench dp-step`` (README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@dataclass
class _Capture:
    """What one layer-direction of a forward pass keeps for per-sample gradients.

    Only the input projection's gradient is recorded. The recurrent projection's follows
    from it: gates see ``gi_t + gh_t``, so their gradients are equal, except in the GRU's
    candidate gate, ``tanh(gi_n + r_t * gh_n)``, where ``d gh_n = d gi_n * r_t``.
    """

    inputs: torch.Tensor  # [B, T, I] the layer's input
    gi: torch.Tensor  # [B, T, G*H] input projection, its .grad filled by backward
    h_prev: list[torch.Tensor]  # T x [B, H] state each step started from, in time order
    reset: list[torch.Tensor] | None  # GRU: T x [B, H] reset gates r_t, in time order
    names: tuple[str, str, str, str]  # weight_ih, weight_hh, bias_ih, bias_hh


class _Recurrent(nn.Module):
    mode = ""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, nonlinearity: str = "tanh") -> None:
        super().__init__()
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.nonlinearity = bidirectional, nonlinearity
        gates = _GATES[self.mode] * hidden_size
        directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * directions
            for suffix in ("", "_reverse")[:directions]:
                self.register_parameter(f"weight_ih_l{layer}{suffix}",
                                        nn.Parameter(torch.empty(gates, layer_input)))
                self.register_parameter(f"weight_hh_l{layer}{suffix}",
                                        nn.Parameter(torch.empty(gates, hidden_size)))
                if bias:
                    self.register_parameter(f"bias_ih_l{layer}{suffix}",
                                            nn.Parameter(torch.empty(gates)))
                    self.register_parameter(f"bias_hh_l{layer}{suffix}",
                                            nn.Parameter(torch.empty(gates)))
        self._captures: list[_Capture] = []
        self._output: torch.Tensor | None = None
        self.register_forward_pre_hook(_input_in_autograd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # torch's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"batch_first={self.batch_first}, bidirectional={self.bidirectional}")

    # --- the cells (torch's equations) ---------------------------------------------------------
    def _cell(self, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One step: (new h, new c or None, GRU reset gate or None)."""
        if self.mode == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c, None
        if self.mode == "GRU":
            ir, iz, in_ = gi.chunk(3, dim=-1)
            hr, hz, hn = gh.chunk(3, dim=-1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(in_ + r * hn)
            return n + z * (h - n), None, r
        pre = gi + gh
        return (torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)), None, None

    def forward(self, input: torch.Tensor, hx=None, lengths: torch.Tensor | None = None):
        x = input if self.batch_first else input.transpose(0, 1)  # [B, T, I]
        batch, steps = x.shape[0], x.shape[1]
        capture = self.training and torch.is_grad_enabled()
        directions = 2 if self.bidirectional else 1
        h0, c0 = self._initial_state(hx, batch, directions, x)
        mask = None
        if lengths is not None:
            mask = (torch.arange(steps, device=x.device)[None, :]
                    < lengths.to(x.device)[:, None]).to(x.dtype).unsqueeze(-1)  # [B, T, 1]
        self._captures = []
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                suffix = "_reverse" if direction else ""
                names = (f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}",
                         f"bias_ih_l{layer}{suffix}", f"bias_hh_l{layer}{suffix}")
                w_ih, w_hh = getattr(self, names[0]), getattr(self, names[1])
                b_ih = getattr(self, names[2]) if self.bias else None
                b_hh = getattr(self, names[3]) if self.bias else None
                gi = F.linear(layer_input, w_ih, b_ih)  # [B, T, G*H], all steps at once
                # One unbind, not a slice per step: each slice's backward would write a
                # zero tensor the size of the whole sequence (measured: half the step).
                gi_steps = gi.unbind(1)
                h = h0[index]
                c = c0[index] if c0 is not None else None
                out: list[torch.Tensor | None] = [None] * steps
                h_prev: list[torch.Tensor | None] = [None] * steps
                reset: list[torch.Tensor | None] = [None] * steps
                for t in (reversed(range(steps)) if direction else range(steps)):
                    gh = F.linear(h, w_hh, b_hh)  # [B, G*H]
                    h_new, c_new, r = self._cell(gi_steps[t], gh, h, c)
                    if mask is not None:
                        m = mask[:, t]
                        h_new = h + m * (h_new - h)
                        if c is not None:
                            c_new = c + m * (c_new - c)
                    if capture:
                        h_prev[t] = h.detach()
                        reset[t] = r.detach() if r is not None else None
                    h, c = h_new, c_new
                    out[t] = h if mask is None else h * mask[:, t]
                if capture:
                    gi.retain_grad()
                    self._captures.append(_Capture(
                        layer_input.detach(), gi, h_prev,
                        reset if self.mode == "GRU" else None, names))
                outputs.append(torch.stack(out, dim=1))
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            layer_input = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        output = layer_input
        if capture:
            output.retain_grad()
            self._output = output
        if not self.batch_first:
            output = output.transpose(0, 1)
        h_n = torch.stack(h_n)
        if self.mode == "LSTM":
            return output, (h_n, torch.stack(c_n))
        return output, h_n

    def _initial_state(self, hx, batch: int, directions: int, x: torch.Tensor):
        shape = (self.num_layers * directions, batch, self.hidden_size)
        if self.mode == "LSTM":
            if hx is None:
                zeros = x.new_zeros(shape)
                return zeros, zeros
            return hx
        return (x.new_zeros(shape) if hx is None else hx), None


def _input_in_autograd(module: _Recurrent, args: tuple) -> tuple | None:
    """Opacus computes per-sample gradients in the module's full backward hook. If the input
    needs no gradient, torch fires that hook as soon as the *output's* gradient is known,
    before the recurrence has been backpropagated and the captures filled. Making the
    input part of autograd (it runs before torch wraps the inputs) moves the hook to the
    end of the layer's backward pass; the extra gradient costs one small matmul."""
    if not (module.training and torch.is_grad_enabled()) or not args:
        return None
    x = args[0]
    if isinstance(x, torch.Tensor) and not x.requires_grad and x.is_floating_point():
        return (x.detach().requires_grad_(), *args[1:])
    return None


class LSTM(_Recurrent):
    """Drop-in ``torch.nn.LSTM`` (no ``proj_size``) with fast per-sample gradients."""

    mode = "LSTM"

    def __init__(self, *args, **kwargs) -> None:
        kwargs.pop("nonlinearity", None)
        super().__init__(*args, **kwargs)


class GRU(_Recurrent):
    """Drop-in ``torch.nn.GRU`` with fast per-sample gradients."""

    mode = "GRU"

    def __init__(self, *args, **kwargs) -> None:
        kwargs.pop("nonlinearity", None)
        super().__init__(*args, **kwargs)


class RNN(_Recurrent):
    """Drop-in ``torch.nn.RNN`` (``nonlinearity`` tanh or relu) with fast per-sample gradients."""

    mode = "RNN"


@register_grad_sampler([LSTM, GRU, RNN])
def _recurrent_grad_sample(layer: _Recurrent, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of every weight of ``layer`` from its captured forward pass.

    ``backprops`` is the gradient of the layer's output as Opacus scaled it (times the
    batch size for a mean loss); the captured gradients are unscaled, so they are rescaled
    by the ratio of the two norms. This assumes the loss reaches the layer through its
    output sequence, as in every fedrnn model.
    """
    raw = layer._output.grad if layer._output is not None else None
    scale = 1.0
    if raw is not None:
        raw_norm = raw.pow(2).sum().sqrt()
        if raw_norm > 0:
            scale = (backprops.pow(2).sum().sqrt() / raw_norm).item()
    samples: dict[nn.Parameter, torch.Tensor] = {}
    for cap in layer._captures:
        d_gi = cap.gi.grad if cap.gi.grad is not None else torch.zeros_like(cap.gi)
        d_gh = d_gi  # [B, T, G*H]
        if cap.reset is not None:  # GRU: the candidate gate sees r_t * gh_n
            hidden = layer.hidden_size
            d_gh = torch.cat([d_gi[..., : 2 * hidden],
                              d_gi[..., 2 * hidden:] * torch.stack(cap.reset, dim=1)], dim=-1)
        h_prev = torch.stack(cap.h_prev, dim=1)  # [B, T, H]
        w_ih, w_hh = getattr(layer, cap.names[0]), getattr(layer, cap.names[1])
        samples[w_ih] = torch.einsum("btg,bti->bgi", d_gi, cap.inputs) * scale
        samples[w_hh] = torch.einsum("btg,bth->bgh", d_gh, h_prev) * scale
        if layer.bias:
            samples[getattr(layer, cap.names[2])] = d_gi.sum(dim=1) * scale
            samples[getattr(layer, cap.names[3])] = d_gh.sum(dim=1) * scale
    layer._captures, layer._output = [], None
    return samples
