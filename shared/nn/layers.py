"""The module API: ``LSTM``, ``GRU``, ``RNN`` (drop-in for torch's) and ``Embedding``."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fedrnn.shared.nn.autograd import _Sweep
from fedrnn.shared.nn.records import _opacus_will_sample, _Pass

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


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
        self._pass: _Pass | None = None
        self.register_forward_pre_hook(_input_in_autograd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # torch's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"batch_first={self.batch_first}, bidirectional={self.bidirectional}")

    def forward(self, input: torch.Tensor, hx=None, lengths: torch.Tensor | None = None):
        x = input.transpose(0, 1) if self.batch_first else input  # time-major [T, B, I]
        steps, batch = x.shape[0], x.shape[1]
        directions = 2 if self.bidirectional else 1
        h0, c0 = self._initial_state(hx, batch, directions, x)
        mask = None
        if lengths is not None:
            mask = (torch.arange(steps, device=x.device)[:, None]
                    < lengths.to(x.device)[None, :]).to(x.dtype).unsqueeze(-1)  # [T, B, 1]
        recording = self.training and torch.is_grad_enabled()
        record = _Pass(self) if recording else None
        self._pass = record
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                suffix = "_reverse" if direction else ""
                names = (f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}",
                         f"bias_ih_l{layer}{suffix}", f"bias_hh_l{layer}{suffix}")
                weights = [getattr(self, n) if self.bias or i < 2 else None
                           for i, n in enumerate(names)]
                result = _Sweep.apply(layer_input, h0[index],
                                      c0[index] if c0 is not None else None, *weights,
                                      self.mode, self.nonlinearity, bool(direction), mask,
                                      record, names, torch.is_grad_enabled())
                outputs.append(result[0])
                h_n.append(result[1])
                if self.mode == "LSTM":
                    c_n.append(result[2])
            layer_input = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        output = layer_input
        if record is not None and output.requires_grad:
            # A hook, not ``retain_grad``: the record must not hold the output, whose graph
            # holds the record (a cycle through autograd's C++ nodes is never collected).
            output.register_hook(partial(_keep_norm, record))
        if self.batch_first:
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


def _keep_norm(record: _Pass, grad: torch.Tensor | None) -> None:
    if grad is not None and _opacus_will_sample(record):  # the grad/norm sampler's scale
        record.output_norm = torch.linalg.vector_norm(grad)


def _input_in_autograd(module: _Recurrent, args: tuple) -> tuple | None:
    """Opacus computes per-sample gradients in the module's full backward hook. If the input
    needs no gradient, torch fires that hook as soon as the *output's* gradient is known,
    before the recurrence has been backpropagated. Making the input part of autograd (this
    runs before torch wraps the inputs) moves the hook to the end of the layer's backward
    pass; the extra input gradient costs one small matmul."""
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


class Embedding(nn.Embedding):
    """``torch.nn.Embedding``, except under Opacus's ghost clipping: its per-sample gradient
    norms come from its per-sample gradients (vocabulary x dimension per record) instead
    of Opacus's embedding norm sampler, whose de-duplication of token ids (``unique_dim``,
    ``select``, ``equal``) costs more than that for fedrnn's vocabularies."""
