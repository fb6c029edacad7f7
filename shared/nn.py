"""DP-ready recurrent layers: drop-in ``LSTM``, ``GRU``, ``RNN`` with cheap, exact per-sample
gradients under Opacus.

Same constructor, parameter names (``weight_ih_l0``, ``bias_hh_l1_reverse`` ...), outputs
and initial states as torch's layers, so state dicts load both ways. ``forward`` also
takes ``lengths`` [B]: steps past a sequence's length leave the state unchanged and
output zeros, and the reverse direction starts at each sequence's own end.

Why they are fast. Each layer-direction is one autograd node (``_Sweep``) whose forward
and backward are written out by hand, so the time loop holds only the sequential work:
per step one matmul with the recurrent weight and a handful of element-wise kernels on
preallocated buffers (autograd through torch's cell equations runs about 25 small ops per
step, plus a graph node for each). Everything that does not depend on the previous step
is done for all steps at once: the input projection, the gate derivatives, the input
gradient, and the weight gradients.

Per-sample work. The gradient of a weight is a sum over time of outer products,
``dW_hh[b] = sum_t dG_t[b] (x) h_{t-1}[b]`` with ``dG_t`` the gradient of the gate
pre-activations. When Opacus has hooked the layer, the backward pass leaves the weight
gradients to it and keeps (``dG``, input, previous state) per layer-direction:

- hooks mode: the registered grad sampler turns them into per-sample gradients, one
  batched matmul per weight, and sets the ordinary gradient from the same tensors;
- ghost mode: the registered norm sampler gives each sample's gradient norm from per-step
  Gram matrices, and Opacus's second backward pass (each sample's gradient rescaled by its
  clipping factor) is replayed without the time loop (``_replay``).

Without Opacus, the backward pass computes the ordinary gradients, one matmul per weight.

Measured with ``fedrnn bench dp-step`` (README).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import math
import sys
import weakref
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


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


class _Sweep(torch.autograd.Function):
    """One layer in one direction over the whole sequence, time-major, as one autograd node.

    Inputs: x [T, B, I], h0/c0 [B, H], torch's four weights, the cell, the direction, an
    optional mask [T, B, 1] of valid steps, the layer's ``_Pass`` (or None), its parameter
    names, and whether grad mode was on (a backward pass may follow).
    Outputs: the output sequence [T, B, H], h_n, and c_n for the LSTM.
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, mode, nonlinearity, reverse, mask,
                record, names, differentiable):
        steps, batch = x.shape[0], x.shape[1]
        hidden = w_hh.shape[1]
        given = x
        x = x.contiguous()
        # states[k]: the state before the k-th step in time order (forward) or after it
        # (reverse); both directions read h_{t-1} from ``states[prev]`` and write ``[next]``.
        states = _scratch(x, steps + 1, batch, hidden)
        first = steps if reverse else 0
        states[first] = h0
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        saved = None
        if mode == "LSTM" and not reverse and mask is None:
            saved = _lstm_forward_onednn(x, states, c0, w_ih, w_hh, b_ih, b_hh,
                                         train=differentiable and any(ctx.needs_input_grad[:7]))
        if saved is None:
            bias = _input_bias(mode, b_ih, b_hh, hidden)
            flat = x.reshape(steps * batch, x.shape[2])
            gi = _scratch(x, steps * batch, w_ih.shape[0])
            if bias is not None:
                torch.addmm(bias, flat, w_ih.t(), out=gi)
            else:
                torch.mm(flat, w_ih.t(), out=gi)
            gi = gi.view(steps, batch, w_ih.shape[0])
            saved = _FORWARD[mode](gi, states, first, c0, w_hh, b_hh, order, reverse, mask,
                                   nonlinearity)
        last = 0 if reverse else steps
        out = _after(states, reverse)
        if mask is not None:
            out = out * mask
        ctx.mode, ctx.nonlinearity, ctx.reverse, ctx.mask = mode, nonlinearity, reverse, mask
        ctx.record, ctx.names, ctx.order, ctx.saved = record, names, order, saved
        # ``x`` detached: the record keeps it, and a layer's input carries the graph below
        # it, whose nodes keep the record (a cycle through C++ nodes is never collected).
        # The input itself is saved the checked way: modifying it in place before the
        # backward pass is an error, as with torch's layers.
        ctx.x, ctx.states, ctx.has_c = x.detach(), states, c0 is not None
        ctx.save_for_backward(given, w_ih, w_hh, b_ih, b_hh)
        if mode == "LSTM":
            return out, states[last], saved["cells"][last]
        return out, states[last]

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn=None):
        _given, w_ih, w_hh, b_ih, b_hh = ctx.saved_tensors
        x, states, mask, reverse = ctx.x, ctx.states, ctx.mask, ctx.reverse
        h_prev = _before(states, reverse)  # [T, B, H], h_{t-1} per step
        if mask is not None:
            d_out = d_out * mask
        first = getattr(ctx, "first", None)
        if first is not None and not _opacus_will_sample(ctx.record):
            ratio = _per_sample_ratio(first, d_out, d_hn, d_cn)
            if ratio is not None:
                return _replay(ctx, first, ratio, x, h_prev, b_ih is not None)
        d_gi, d_gh, d_h0, d_c0 = _BACKWARD[ctx.mode](
            ctx.saved, states, d_out, d_hn, d_cn, w_hh, ctx.order, reverse, mask,
            ctx.nonlinearity)
        sequence = None
        if _opacus_will_sample(ctx.record):  # per-sample work is the grad/norm sampler's
            sequence = _Sequence(ctx.names, x, h_prev, d_gi, d_gh)
            ctx.record.sequences.append(sequence)
            grads = [None] * 4
        else:
            grads = _weight_grads(ctx, d_gi, d_gh, x, h_prev, b_ih is not None)
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = _input_grad(d_gi, w_ih, x)
        # Kept for a second backward pass through the same graph (Opacus's ghost clipping
        # reruns backward with every sample's gradient rescaled): see ``_replay``.
        ctx.first = _Backward(d_out, d_hn, d_cn, d_gi, d_gh, d_x, d_h0, d_c0, sequence)
        return (d_x, d_h0 if ctx.needs_input_grad[1] else None,
                d_c0 if ctx.has_c and ctx.needs_input_grad[2] else None, *grads,
                None, None, None, None, None, None, None)


@dataclass
class _Backward:
    """One backward pass of a ``_Sweep``: the gradients it received and those it made."""

    d_out: torch.Tensor  # [T, B, H]
    d_hn: torch.Tensor  # [B, H]
    d_cn: torch.Tensor | None
    d_gi: torch.Tensor  # [T, B, G]
    d_gh: torch.Tensor
    d_x: torch.Tensor | None  # [T, B, I]
    d_h0: torch.Tensor  # [B, H]
    d_c0: torch.Tensor | None
    sequence: _Sequence | None  # what the pass recorded for Opacus, if it did


def _per_sample_ratio(first: _Backward, d_out: torch.Tensor, d_hn: torch.Tensor,
                      d_cn: torch.Tensor | None) -> torch.Tensor | None:
    """``r`` [B] such that this backward pass's incoming gradients are ``r_b`` times the
    first pass's for every sample ``b`` (to float rounding), or None."""
    if (d_cn is None) != (first.d_cn is None):
        return None
    pairs = [(d_out, first.d_out, (0, 2)), (d_hn, first.d_hn, (1,))]
    if d_cn is not None:
        pairs.append((d_cn, first.d_cn, (1,)))
    dot = sum(_dots(new, old, dims) for new, old, dims in pairs)
    norm2 = sum(_squared_norms(old) for _new, old, _dims in pairs)
    ratio = torch.where(norm2 > 0, dot / norm2.clamp(min=torch.finfo(norm2.dtype).tiny), 0)
    residual = 0.0
    for new, old, _dims in pairs:
        scale = ratio.view(1, -1, 1) if old.dim() == 3 else ratio[:, None]
        gap = torch.addcmul(new, old, scale, value=-1, out=_scratch(new, *new.shape))
        residual += torch.linalg.vector_norm(gap) ** 2
    # ||new||^2 is the rescaled part's (dot r) plus the residual's, orthogonal to it: no
    # extra pass. Float32 rounding of a rescaled gradient is about 1e-7 of it; anything
    # else fails, NaN and overflow included.
    total = (dot * ratio).sum() + residual
    if not residual <= (1e-5 ** 2) * total:
        return None
    return ratio


def _rescaled(a: torch.Tensor, per_step: torch.Tensor) -> torch.Tensor:
    return torch.mul(a, per_step, out=_scratch(a, *a.shape))


def _dots(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Per-sample dot products [B] in one pass (no product tensor)."""
    if len(dims) == 2:  # [T, B, H]
        return torch.linalg.vecdot(a, b, dim=-1).sum(0)
    return torch.linalg.vecdot(a, b, dim=-1)


def _squared_norms(a: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norms [B] of [T, B, H] or [B, H] (a norm kernel: no product
    tensor, half the memory traffic of ``_dots(a, a)``)."""
    norms = torch.linalg.vector_norm(a, dim=-1).square_()
    return norms.sum(0) if a.dim() == 3 else norms


def _replay(ctx, first: _Backward, ratio: torch.Tensor, x, h_prev, has_bias: bool):
    """The backward pass is linear in its incoming gradients, and the recurrence never mixes
    samples: rescaling sample ``b``'s incoming gradient by ``r_b`` rescales its gate
    gradients, input gradient and initial-state gradients by ``r_b``. So a second pass of
    rescaled gradients needs no time loop: the weight gradients are one matmul each with
    the rescaling folded into the smaller operand."""
    wanted = ctx.needs_input_grad
    per_step = ratio.view(1, -1, 1)
    per_row = ratio[:, None]
    grads = [None] * 4
    if wanted[3]:
        grads[0] = _outer_sum(first.d_gi, _rescaled(x, per_step))
    if wanted[4]:
        grads[1] = _outer_sum(first.d_gh, _rescaled(h_prev, per_step))
    if has_bias and (wanted[5] or wanted[6]):
        sequence = first.sequence or _Sequence(ctx.names, x, h_prev, first.d_gi, first.d_gh)
        d_bi, d_bh = sequence.bias_samples()
        grads[2] = ratio @ d_bi if wanted[5] else None
        grads[3] = ratio @ d_bh if wanted[6] else None
    d_x = _rescaled(first.d_x, per_step) if wanted[0] and first.d_x is not None else None
    d_h0 = first.d_h0 * per_row if wanted[1] else None
    d_c0 = first.d_c0 * per_row if ctx.has_c and wanted[2] else None
    return (d_x, d_h0, d_c0, *grads, None, None, None, None, None, None, None)


def _input_bias(mode: str, b_ih, b_hh, hidden: int):
    """The bias added with the input projection. The GRU's recurrent bias stays with its
    recurrent projection: the candidate sees ``r * (W_hn h + b_hn)``."""
    if b_ih is None or mode == "GRU":
        return b_ih
    return b_ih + b_hh


def _opacus_will_sample(record: _Pass | None) -> bool:
    """Opacus's forward hook stores the layer's inputs in ``layer.activations`` and its
    backward hook, which runs after this layer's backward pass, takes them back out; so
    during the backward pass a non-empty list means per-sample gradients will be asked for
    (hooks disabled or no Opacus: no list)."""
    return record is not None and bool(getattr(record.layer, "activations", None))


def _weight_grads(ctx, d_gi, d_gh, x, h_prev, has_bias: bool) -> list[torch.Tensor | None]:
    """Gradients of w_ih, w_hh, b_ih, b_hh: one matmul or sum each."""
    wanted = ctx.needs_input_grad[3:7]
    flat_gi = d_gi.reshape(-1, d_gi.shape[2])
    flat_gh = d_gh.reshape(-1, d_gh.shape[2])
    return [_outer_sum(d_gi, x) if wanted[0] else None,
            _outer_sum(d_gh, h_prev) if wanted[1] else None,
            flat_gi.sum(0) if has_bias and wanted[2] else None,
            flat_gh.sum(0) if has_bias and wanted[3] else None]


def _input_grad(d_g: torch.Tensor, w_ih: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``d_g @ w_ih`` [T, B, I]; a narrow one the transposed way, as in ``_outer_sum``
    (5.3 -> 4.1 ms for I = 8, G = 1024, 5,120 rows)."""
    flat = d_g.reshape(-1, d_g.shape[2])
    if x.shape[2] < _NARROW:
        return torch.mm(w_ih.t(), flat.t()).t().view_as(x)
    return torch.mm(flat, w_ih, out=_scratch(x, flat.shape[0], x.shape[2])).view_as(x)


def _outer_sum(d_g: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
    """``sum_{t,b} d_g[t, b] (x) operand[t, b]``, a weight's gradient [G, I]. For a narrow
    operand (the first layer's embeddings) MKL is several times faster at the transposed
    product [I, G] than at [G, I] (2.2 -> 0.9 ms for I = 8, G = 1024, 5,120 rows)."""
    gates, width = d_g.shape[-1], operand.shape[-1]
    flat_g, flat_a = d_g.reshape(-1, gates), operand.reshape(-1, width)
    if width < _NARROW:
        return torch.mm(flat_a.t(), flat_g).t().contiguous()
    return torch.mm(flat_g.t(), flat_a)


# --- the cells: torch's equations, forward and backward over all steps -----------------------
# Each forward writes the states, keeps what its backward needs, and returns it as a dict.
# Each backward returns (d_gi, d_gh, d_h0, d_c0): the gradients of the input and recurrent
# pre-activations [T, B, G] (the same tensor except in the GRU) and of the initial state.
# Gate derivatives that do not depend on the incoming gradient are computed for all steps
# at once, so each backward step is a few multiplies and one matmul.

_NUMPY_TYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _scratch(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """An uninitialised CPU work buffer of ``like``'s dtype, from numpy's allocator.

    torch asks glibc for 64-byte-aligned blocks; for blocks of these sizes (megabytes to
    tens of megabytes, every step) glibc grows the heap instead of reusing the block freed
    a step earlier, so every step's buffers are fresh pages the kernel must fault in and
    zero: about 25,000 page faults per DP step of the LEAF LSTM (``getrusage``). numpy's
    16-byte-aligned blocks are reused. Buffers only ever used inside this module."""
    np_type = _NUMPY_TYPES.get(like.dtype)
    if np_type is None or like.device.type != "cpu":
        return like.new_empty(shape)
    return torch.from_numpy(np.empty(shape, dtype=np_type))


def _steps(order, reverse: bool):
    for t in order:
        yield t, (t + 1 if reverse else t), (t if reverse else t + 1)


def _before(buffer: torch.Tensor, reverse: bool) -> torch.Tensor:
    """[T, ...] view of a [T + 1, ...] state buffer: the state each time step started from.
    The forward direction fills the buffer from index 0, the reverse one from index T."""
    return buffer[1:] if reverse else buffer[:-1]


def _after(buffer: torch.Tensor, reverse: bool) -> torch.Tensor:
    """[T, ...] view of a [T + 1, ...] state buffer: the state after each time step."""
    return buffer[:-1] if reverse else buffer[1:]


def _backward_steps(order, reverse: bool, d_out: torch.Tensor, dh: torch.Tensor):
    """The steps in backward order, each with the output gradient of the step after it in
    that order (None at the end). ``dh`` is given the first step's output gradient here;
    each later one enters through ``_through``, in the same kernel as the recurrent matmul."""
    times = [t for t, _prev, _nxt in _steps(order, reverse)][::-1]
    if times:
        dh.add_(d_out[times[0]])
    for n, t in enumerate(times):
        yield t, (d_out[times[n + 1]] if n + 1 < len(times) else None)


# Steps per span of gate derivatives made just ahead of the backward loop: a span's
# [n, B, 4H] block (256 KB a step at the default sizes) must still be in the core's
# cache when the loop reaches it.
_CHUNK = 8

# Operands narrower than this are multiplied the transposed way (``_outer_sum``).
_NARROW = 64


def _chunks(steps: int, reverse: bool) -> dict[int, slice]:
    """The time step at which the backward loop (latest first for the forward direction)
    enters each span of ``_CHUNK`` steps, and the span."""
    spans = {}
    for lo in range(0, steps, _CHUNK):
        hi = min(lo + _CHUNK, steps)
        spans[lo if reverse else hi - 1] = slice(lo, hi)
    return spans


def _through(d_g: torch.Tensor, w_hh: torch.Tensor, following: torch.Tensor | None
             ) -> torch.Tensor:
    """The gradient reaching the previous state through the recurrent weight, plus that
    step's own output gradient."""
    if following is None:
        return torch.mm(d_g, w_hh)
    return torch.addmm(following, d_g, w_hh)


def _mask_state(states: torch.Tensor, prev: int, nxt: int, m: torch.Tensor) -> None:
    """A padded step keeps the previous state (m is 0 or 1)."""
    states[nxt].sub_(states[prev]).mul_(m).add_(states[prev])


def _lstm_forward(gi, states, first, c0, w_hh, b_hh, order, reverse, mask, nonlinearity):
    steps, batch, gates = gi.shape
    hidden = gates // 4
    cells = _scratch(gi, steps + 1, batch, hidden)
    cells[first] = c0
    tanh_c = _scratch(gi, steps, batch, hidden)
    w_t = w_hh.t()
    # Every per-step view made once (unbind), not in the loop: each view is a dispatch.
    gates_4 = gi.view(steps, batch, 4, hidden)
    gate_rows, if_rows = gi.unbind(0), gates_4[:, :, :2].unbind(0)
    i_rows, f_rows, g_rows, o_rows = (gates_4[:, :, k].unbind(0) for k in range(4))
    h_rows, c_rows, tc_rows = states.unbind(0), cells.unbind(0), tanh_c.unbind(0)
    for t, prev, nxt in _steps(order, reverse):
        gate_rows[t].addmm_(h_rows[prev], w_t)  # activations overwrite it in place
        if_rows[t].sigmoid_()
        g_rows[t].tanh_()
        o_rows[t].sigmoid_()
        c = torch.mul(f_rows[t], c_rows[prev], out=c_rows[nxt])
        c.addcmul_(i_rows[t], g_rows[t])
        torch.tanh(c, out=tc_rows[t])
        torch.mul(o_rows[t], tc_rows[t], out=h_rows[nxt])
        if mask is not None:
            _mask_state(states, prev, nxt, mask[t])
            _mask_state(cells, prev, nxt, mask[t])
    return {"acts": gi, "cells": cells, "tanh_c": tanh_c}


# oneDNN's LSTM primitive, as torch's own nn.LSTM runs it on the CPU (``mkldnn_rnn_layer``).
# Its workspace starts with every step's activated gates, one row of ``_onednn_ld(4H)``
# floats per (step, sample); hidden sizes whose layout does not check out are not asked again.
_ONEDNN_REFUSED: set[int] = set()
_ONEDNN_LSTM = 2  # ideep::rnn_kind::LSTM


def _onednn_ld(width: int) -> int:
    """oneDNN's padded row length for ``width`` floats: 64-byte multiples, never a multiple
    of 1 KB (its guard against 4K aliasing)."""
    ld = -(-width // 16) * 16
    return ld + 16 if ld % 256 == 0 else ld


def _lstm_forward_onednn(x, states, c0, w_ih, w_hh, b_ih, b_hh, *, train: bool
                         ) -> dict | None:
    """The forward direction of an unmasked LSTM layer by oneDNN's fused primitive, and
    (``train``) from its workspace what ``_lstm_backward`` needs. None if oneDNN is
    unavailable or its workspace is not laid out as expected (checked on every training
    call, from the last step's cell and output)."""
    steps, batch = x.shape[0], x.shape[1]
    hidden = w_hh.shape[1]
    gates = 4 * hidden
    if (x.dtype != torch.float32 or x.device.type != "cpu" or hidden in _ONEDNN_REFUSED
            or not torch.backends.mkldnn.is_available() or not torch._C._get_mkldnn_enabled()
            or steps == 0 or batch == 0):
        return None
    if b_ih is None:
        b_ih = b_hh = w_hh.new_zeros(gates)
    weights = [w.detach().contiguous() for w in (w_ih, w_hh, b_ih, b_hh)]
    with torch.enable_grad():  # the op leaves its workspace out in no-grad mode
        y, _h_n, c_n, workspace = torch.ops.aten.mkldnn_rnn_layer(
            x.detach(), *weights, states[0][None], c0[None].detach().contiguous(), False, [],
            _ONEDNN_LSTM, hidden, 1, True, False, False, train)
    states[1:] = y
    if not train:  # no backward pass: only the last cell state is read
        return {"cells": c_n.expand(steps + 1, batch, hidden)}
    ld = _onednn_ld(gates)
    floats = workspace.view(torch.float32) if workspace.numel() % 4 == 0 else None
    if floats is None or floats.numel() < steps * batch * ld:
        _ONEDNN_REFUSED.add(hidden)
        return None
    acts = floats[: steps * batch * ld].view(steps, batch, ld)[..., :gates]
    # The cell states, which the workspace keeps only in an undocumented place:
    # c_t = f_t c_{t-1} + i_t g_t, a few elementwise kernels per step.
    cells = _scratch(x, steps + 1, batch, hidden)
    cells[0] = c0
    i, f, g, o = acts.view(steps, batch, 4, hidden).unbind(2)
    torch.mul(i, g, out=cells[1:])
    c_rows, f_rows = cells.unbind(0), f.unbind(0)
    for t in range(steps):
        c_rows[t + 1].addcmul_(f_rows[t], c_rows[t])
    tanh_c = _tanh(cells[1:], out=_scratch(x, steps, batch, hidden))
    # The layout check: the last step's cell and output as oneDNN made them.
    if not (torch.allclose(cells[steps], c_n[0], rtol=1e-4, atol=1e-5, equal_nan=True)
            and torch.allclose(o[-1] * tanh_c[-1], y[-1], rtol=1e-4, atol=1e-5, equal_nan=True)):
        _ONEDNN_REFUSED.add(hidden)
        return None
    return {"acts": acts, "cells": cells, "tanh_c": tanh_c}


def _tanh(a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``tanh(a)`` as ``2 sigmoid(2a) - 1``: torch's CPU tanh is 3.6x slower than its
    sigmoid (2.7 against 0.74 ms for the LEAF LSTM's 1.3M cell states, 2 threads); the
    result differs from tanh by float32 rounding (about 1e-7), as oneDNN's own does."""
    torch.mul(a, 2, out=out).sigmoid_()
    return out.mul_(2).sub_(1)


def _lstm_backward(saved, states, d_out, d_hn, d_cn, w_hh, order, reverse, mask, _nl):
    acts, cells, tanh_c = saved["acts"], saved["cells"], saved["tanh_c"]
    steps, batch, gates = acts.shape
    hidden = gates // 4
    c_prev = _before(cells, reverse)
    # The gate derivatives k (d(pre-activation) = k * d(c) for i, f, g and k * d(h) for o)
    # are written into d_g a few steps ahead of the loop, which then scales them in place:
    # made for all steps at once, these [T, B, 4H] arrays leave the cache between the
    # passes that make them and the step that reads them, and the backward pass was bound
    # by memory traffic (``_CHUNK``).
    d_g = _scratch(acts, steps, batch, gates)
    o_dtanh = _scratch(tanh_c, *tanh_c.shape)
    d_gv = d_g.view(steps, batch, 4, hidden)
    d_ifg, d_o, d_rows = d_gv[:, :, :3].unbind(0), d_gv[:, :, 3].unbind(0), d_g.unbind(0)
    f_rows, od_rows = acts.view(steps, batch, 4, hidden)[:, :, 1].unbind(0), o_dtanh.unbind(0)
    if mask is not None:
        keep = 1 - mask
    dc = d_cn.clone() if d_cn is not None else torch.zeros_like(d_hn)
    dh = d_hn.clone()
    chunks = _chunks(steps, reverse)
    for t, following in _backward_steps(order, reverse, d_out, dh):
        span = chunks.get(t)
        if span is not None:
            _lstm_gate_derivatives(acts[span], c_prev[span], tanh_c[span],
                                   None if mask is None else mask[span], d_g[span],
                                   o_dtanh[span])
        if mask is None:
            dc_t = dc.addcmul_(dh, od_rows[t])
        else:
            dc_t = torch.addcmul(dc * mask[t], dh, od_rows[t])
        d_ifg[t].mul_(dc_t.unsqueeze(1))
        d_o[t].mul_(dh)
        dc_next = dc_t * f_rows[t]
        through = _through(d_rows[t], w_hh, following)
        if mask is not None:
            dc_next.addcmul_(dc, keep[t])
            through.addcmul_(dh, keep[t])
        dh, dc = through, dc_next
    return d_g, d_g, dh, dc


def _lstm_gate_derivatives(acts, c_prev, tanh_c, mask, k, o_dtanh) -> None:
    """For a span of steps: k [n, B, 4H] and o * tanh'(c) [n, B, H] (d(c) += d(h) times it)."""
    steps, batch, gates = acts.shape
    hidden = gates // 4
    i, _f, g, o = acts.view(steps, batch, 4, hidden).unbind(2)
    torch.addcmul(acts, acts, acts, value=-1, out=k)  # a(1 - a)
    k = k.view(steps, batch, 4, hidden)
    k[:, :, 2].add_(1).sub_(g)  # the cell gate is a tanh: 1 - g^2 = g(1 - g) + 1 - g
    k[:, :, 0].mul_(g)
    k[:, :, 1].mul_(c_prev)
    k[:, :, 2].mul_(i)
    k[:, :, 3].mul_(tanh_c)
    torch.mul(tanh_c, tanh_c, out=o_dtanh)
    torch.addcmul(o, o, o_dtanh, value=-1, out=o_dtanh)
    if mask is not None:
        k[:, :, 3].mul_(mask)
        o_dtanh.mul_(mask)


def _gru_forward(gi, states, first, c0, w_hh, b_hh, order, reverse, mask, nonlinearity):
    steps, batch, gates = gi.shape
    hidden = gates // 3
    gh = _scratch(gi, steps, batch, gates)  # recurrent pre-activations (W_hh h + b_hh)
    rz = _scratch(gi, steps, batch, 2 * hidden)
    cand = _scratch(gi, steps, batch, hidden)
    w_t = w_hh.t()
    # The candidate's tanh as 2 sigmoid(2x) - 1 (``_tanh``), the 2x folded into its inputs.
    gi[..., 2 * hidden:].mul_(2)
    minus_one = gi.new_full((), -1.0)
    # Every per-step view made once (unbind), not in the loop: each view is a dispatch.
    gi_rz, gi_n = gi[..., : 2 * hidden].unbind(0), gi[..., 2 * hidden:].unbind(0)
    gh_rows = gh.unbind(0)
    gh_rz, gh_n = gh[..., : 2 * hidden].unbind(0), gh[..., 2 * hidden:].unbind(0)
    rz_rows, r_rows, z_rows = rz.unbind(0), rz[..., :hidden].unbind(0), rz[..., hidden:].unbind(0)
    cand_rows, h_rows = cand.unbind(0), states.unbind(0)
    for t, prev, nxt in _steps(order, reverse):
        h = h_rows[prev]
        if b_hh is not None:
            torch.addmm(b_hh, h, w_t, out=gh_rows[t])
        else:
            torch.mm(h, w_t, out=gh_rows[t])
        torch.add(gi_rz[t], gh_rz[t], out=rz_rows[t]).sigmoid_()
        n = torch.addcmul(gi_n[t], r_rows[t], gh_n[t], value=2, out=cand_rows[t]).sigmoid_()
        torch.add(minus_one, n, alpha=2, out=n)
        torch.lerp(n, h, z_rows[t], out=h_rows[nxt])  # n + z * (h - n)
        if mask is not None:
            _mask_state(states, prev, nxt, mask[t])
    return {"gh": gh, "rz": rz, "cand": cand}


def _gru_backward(saved, states, d_out, d_hn, _dc, w_hh, order, reverse, mask, _nl):
    gh, rz, n = saved["gh"], saved["rz"], saved["cand"]
    steps, batch, gates = gh.shape
    hidden = gates // 3
    h_prev = _before(states, reverse)
    # As in the LSTM: the gate derivatives are written into d_gi and d_gh a few steps ahead
    # of the loop, which scales them in place while they are still in cache (made for all
    # steps at once, the loop's products took 170 us a step instead of a few).
    d_gi = _scratch(gh, steps, batch, gates)
    d_gh = _scratch(gh, steps, batch, gates)
    d_giv, d_ghv = d_gi.view(steps, batch, 3, hidden), d_gh.view(steps, batch, 3, hidden)
    gi_rows, gh_rows = d_giv.unbind(0), d_ghv.unbind(0)
    z = rz[..., hidden:]
    carry = z if mask is None else z * mask + (1 - mask)  # d(h_{t-1}) += d(h_t) * carry
    carry_rows = carry.unbind(0)
    chunks = _chunks(steps, reverse)
    dh = d_hn.clone()
    for t, following in _backward_steps(order, reverse, d_out, dh):
        span = chunks.get(t)
        if span is not None:
            _gru_gate_derivatives(gh[span], rz[span], n[span], h_prev[span],
                                  None if mask is None else mask[span], d_giv[span],
                                  d_ghv[span])
        du = dh.unsqueeze(1)
        gi_rows[t].mul_(du)
        gh_rows[t].mul_(du)
        carried = (dh * carry_rows[t] if following is None
                   else torch.addcmul(following, dh, carry_rows[t]))
        dh = torch.addmm(carried, d_gh[t], w_hh)
    return d_gi, d_gh, dh, None


def _gru_gate_derivatives(gh, rz, n, h_prev, mask, k_gi, k_gh) -> None:
    """For a span of steps: the derivatives [s, B, 3, H] of the input and recurrent
    pre-activations (r, z, n) per unit of d(h)."""
    hidden = n.shape[-1]
    r, z = rz[..., :hidden], rz[..., hidden:]
    d_npre = torch.mul(n, n, out=k_gi[:, :, 2]).neg_().add_(1)  # 1 - n^2
    d_npre.addcmul_(d_npre, z, value=-1)  # * (1 - z)
    torch.mul(d_npre, gh[..., 2 * hidden:], out=k_gi[:, :, 0]).mul_(r)
    k_gi[:, :, 0].addcmul_(k_gi[:, :, 0], r, value=-1)  # * r (1 - r)
    torch.sub(h_prev, n, out=k_gi[:, :, 1]).mul_(z)
    k_gi[:, :, 1].addcmul_(k_gi[:, :, 1], z, value=-1)  # * z (1 - z)
    if mask is not None:
        k_gi.mul_(mask.unsqueeze(2))
    k_gh[:, :, :2].copy_(k_gi[:, :, :2])
    torch.mul(k_gi[:, :, 2], r, out=k_gh[:, :, 2])  # the candidate sees r * (W_hn h + b_hn)


def _rnn_forward(gi, states, first, c0, w_hh, b_hh, order, reverse, mask, nonlinearity):
    w_t = w_hh.t()
    for t, prev, nxt in _steps(order, reverse):
        pre = gi[t].addmm_(states[prev], w_t)
        if nonlinearity == "tanh":
            torch.tanh(pre, out=states[nxt])
        else:
            torch.clamp(pre, min=0, out=states[nxt])  # relu has no out=
        if mask is not None:
            _mask_state(states, prev, nxt, mask[t])
    return {}


def _rnn_backward(saved, states, d_out, d_hn, _dc, w_hh, order, reverse, mask, nonlinearity):
    h = _after(states, reverse)  # each step's output state
    k = 1 - h * h if nonlinearity == "tanh" else (h > 0).to(h.dtype)
    if mask is not None:
        k = k * mask
        keep = 1 - mask
    d_g = _scratch(h, *h.shape)
    dh = d_hn.clone()
    for t, following in _backward_steps(order, reverse, d_out, dh):
        torch.mul(dh, k[t], out=d_g[t])
        through = _through(d_g[t], w_hh, following)
        dh = through if mask is None else through.addcmul_(dh, keep[t])
    return d_g, d_g, dh, None


_FORWARD = {"LSTM": _lstm_forward, "GRU": _gru_forward, "RNN": _rnn_forward}
_BACKWARD = {"LSTM": _lstm_backward, "GRU": _gru_backward, "RNN": _rnn_backward}


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
    norms come from its per-sample gradients (vocabulary x dimension per record: 2.5 KB
    for the 80 x 8 character model, 512 KB for the 4,096 x 32 hashed-word default)
    instead of Opacus's embedding norm sampler, whose de-duplication of token ids took
    about 23 ms of a 220 ms DP-SGD step of the LEAF model (``torch.profiler``:
    ``unique_dim``, ``select``, ``equal``)."""


def _recurrent_grad_sample(layer: _Recurrent, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of every weight of ``layer`` from its last backward pass.

    Opacus's scale (``_take_pass``) is folded into the input/state operand of each
    contraction. The ordinary gradient, which the backward pass left out, is set here
    from the same contractions, so ``p.grad`` holds what autograd would have. Frozen
    weights get neither.
    """
    record, scale = _take_pass(layer, backprops)
    samples: dict[nn.Parameter, torch.Tensor] = {}
    for seq in record.sequences:
        for name, d_g, operand in ((seq.names[0], seq.d_gi, seq.inputs),
                                   (seq.names[1], seq.d_gh, seq.h_prev)):
            weight = getattr(layer, name)
            if not weight.requires_grad:
                continue
            # Opacus copies what a grad sampler returns into the parameter's grad_sample
            # (create_or_accumulate_grad_sample), so the output buffer can serve every step:
            # a fresh 67 MB tensor per weight and step costs its page faults each time.
            out = _buffer(layer, name, (operand.shape[1], *weight.shape), operand)
            scaled = operand if scale == 1.0 else operand * scale
            samples[weight] = torch.bmm(d_g.permute(1, 2, 0), scaled.transpose(0, 1), out=out)
            _accumulate_grad(weight, samples[weight].sum(0), 1.0 / scale)
        if layer.bias:
            for name, per_sample in zip(seq.names[2:], seq.bias_samples(), strict=True):
                bias = getattr(layer, name)
                if bias.requires_grad:
                    _accumulate_grad(bias, per_sample.sum(0), 1.0)
                    samples[bias] = per_sample * scale
    return samples


def _recurrent_norm_sample(layer: _Recurrent, activations: list[torch.Tensor],
                           backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of every weight of ``layer``, for Opacus's ghost clipping
    (``grad_sample_mode="ghost"``): no per-sample gradient is kept, and the clipped sum
    comes from Opacus's second backward pass (see ``_replay``)."""
    record, scale = _take_pass(layer, backprops)
    norms: dict[nn.Parameter, torch.Tensor] = {}
    for seq in record.sequences:
        grams: dict[int, torch.Tensor] = {}  # the LSTM's and RNN's two weights share d_g
        # The recurrent weight first: its Gram of d_g, once made, serves a narrow input too.
        norms[getattr(layer, seq.names[1])] = _sample_norms(layer, seq.names[1], seq.d_gh,
                                                            seq.h_prev, grams) * scale
        norms[getattr(layer, seq.names[0])] = _sample_norms(layer, seq.names[0], seq.d_gi,
                                                            seq.inputs, grams) * scale
        if layer.bias:
            for name, d_g, i in ((seq.names[2], seq.d_gi, 0), (seq.names[3], seq.d_gh, 1)):
                if id(d_g) in grams:  # ||sum_t d_g_t||^2 is the sum of d_g's Gram matrix
                    norm = grams[id(d_g)].sum((1, 2)).clamp(min=0).sqrt()
                else:
                    norm = seq.bias_samples()[i].norm(dim=1)
                norms[getattr(layer, name)] = norm * scale
    return norms


def _sample_norms(layer: _Recurrent, name: str, d_g: torch.Tensor, operand: torch.Tensor,
                  grams: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """``||sum_t d_g[t, b] (x) operand[t, b]||`` for every sample ``b``, the cheaper way.

    Through the per-step Gram matrices, ``sum_{t,s} (d_g_t . d_g_s)(a_t . a_s)``, costs
    ``T^2 (G + I)`` per sample (``T^2 I`` once the Gram of ``d_g`` is in ``grams``) and no
    [G, I] tensor; the per-sample gradient itself costs ``T G I`` (fewer for small inputs,
    such as the first layer's embeddings, unless that Gram is at hand)."""
    steps, batch, gates = d_g.shape
    width = operand.shape[2]
    known = grams is not None and id(d_g) in grams  # then the Gram of d_g costs nothing
    if steps * ((0 if known else gates) + width) < gates * width:
        cache = {} if grams is None else grams
        if id(d_g) not in cache:
            cache[id(d_g)] = torch.bmm(d_g.transpose(0, 1), d_g.permute(1, 2, 0))  # [B, T, T]
        products = torch.bmm(operand.transpose(0, 1), operand.permute(1, 2, 0))
        return products.mul_(cache[id(d_g)]).sum((1, 2)).clamp(min=0).sqrt()
    out = _buffer(layer, name, (batch, width, gates), operand)  # transposed: see _outer_sum
    torch.bmm(operand.permute(1, 2, 0), d_g.transpose(0, 1), out=out)
    return out.flatten(1).norm(dim=1)


def _take_pass(layer: _Recurrent, backprops: torch.Tensor) -> tuple[_Pass, float]:
    """The layer's recorded pass, and the factor from its gradients to Opacus's:
    ``backprops`` is the output's gradient as Opacus scaled it (times the batch size for
    a mean loss), the backward pass saw the unscaled one. This assumes the loss reaches
    the layer through its output sequence, as in every fedrnn model."""
    record = layer._pass
    layer._pass = None
    if record is None or not record.sequences:
        raise RuntimeError("no per-sample gradients were recorded: run one forward pass of "
                           "the layer in training mode per backward pass")
    if record.output_norm is not None and record.output_norm > 0:
        return record, (torch.linalg.vector_norm(backprops) / record.output_norm).item()
    if any(seq.d_gi.any() or seq.d_gh.any() for seq in record.sequences):
        # Opacus sees only the output's gradient; its loss scale cannot be read off a zero
        # one, and guessing it wrong would under-clip every sample.
        raise RuntimeError("under Opacus the loss must reach shared.nn's recurrent layers "
                           "through their output sequence (the gradient reaching it is zero)")
    return record, 1.0  # no gradient at all: every per-sample gradient is zero


_SAMPLE_BUFFERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _buffer(layer: _Recurrent, name: str, shape: tuple[int, ...], like: torch.Tensor
            ) -> torch.Tensor:
    """A per-sample output buffer of ``layer`` kept between steps; held beside the layer,
    not in it, so that copying or pickling a model does not copy tens of MB of scratch."""
    buffers = _SAMPLE_BUFFERS.setdefault(layer, {})
    buf = buffers.get(name)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype:
        buf = buffers[name] = like.new_empty(shape)
    return buf


def _accumulate_grad(param: nn.Parameter, grad: torch.Tensor, scale: float) -> None:
    """``param.grad += grad * scale`` as autograd would accumulate it."""
    if scale != 1.0:
        grad = grad.mul_(scale)
    param.grad = grad if param.grad is None else param.grad + grad


def _register_with_opacus() -> None:
    """Opacus's own extension points: ``PrivacyEngine`` then handles these layers as it
    handles its own, in both of its clipping modes."""
    from opacus.grad_sample import register_grad_sampler, register_norm_sampler
    from opacus.grad_sample.embedding import compute_embedding_grad_sample

    register_grad_sampler(Embedding)(compute_embedding_grad_sample)
    register_grad_sampler([LSTM, GRU, RNN])(_recurrent_grad_sample)
    register_norm_sampler([LSTM, GRU, RNN])(_recurrent_norm_sample)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``then`` as soon as the package ``name`` has been imported.

    The layers register with Opacus when Opacus is imported, not when they are: importing
    Opacus costs 1.4 s of CPU, and processes that only hold a model's weights (the server,
    a simulation's driver beside its busy workers) never train it privately. Opacus
    cannot be used before it is imported, so nothing can reach it unregistered.
    """

    def __init__(self, name: str, then) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:  # the real finders locate the package
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        else:
            return None
        # The hook stays until the package has actually run: a mere look-up (an
        # ``importlib.util.find_spec`` availability check) discards this spec.
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            execute = spec.loader.exec_module

            def exec_module(module) -> None:
                execute(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                self.then()

            spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


if "opacus" in sys.modules:
    _register_with_opacus()
else:
    sys.meta_path.insert(0, _AfterImport("opacus", _register_with_opacus))
