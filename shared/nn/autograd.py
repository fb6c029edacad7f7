"""``_Sweep``: one layer in one direction over the whole sequence as one autograd node,
its forward and backward written out by hand, so that the time loop holds only the
sequential work."""

from __future__ import annotations

import torch

from fedrnn.shared.nn.buffers import _after, _before, _scratch
from fedrnn.shared.nn.gradients import _input_grad, _weight_grads
from fedrnn.shared.nn.gru import _gru_backward, _gru_forward
from fedrnn.shared.nn.lstm import _lstm_backward, _lstm_forward
from fedrnn.shared.nn.onednn import _lstm_forward_onednn
from fedrnn.shared.nn.records import _opacus_will_sample, _require_samplers, _Sequence
from fedrnn.shared.nn.replay import _Backward, _per_sample_ratio, _replay
from fedrnn.shared.nn.rnn import _rnn_backward, _rnn_forward

_FORWARD = {"LSTM": _lstm_forward, "GRU": _gru_forward, "RNN": _rnn_forward}
_BACKWARD = {"LSTM": _lstm_backward, "GRU": _gru_backward, "RNN": _rnn_backward}


def _input_bias(mode: str, b_ih, b_hh, hidden: int):
    """The bias added with the input projection. The GRU's recurrent bias stays with its
    recurrent projection: the candidate sees ``r * (W_hn h + b_hn)``."""
    if b_ih is None or mode == "GRU":
        return b_ih
    return b_ih + b_hh


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
            _require_samplers(ctx.record.layer)
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
