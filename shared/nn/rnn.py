"""The plain RNN cell (tanh or relu): torch's equations, forward and backward over all steps
(see ``steps``)."""

from __future__ import annotations

import torch

from fedrnn.shared.nn.buffers import _after, _scratch
from fedrnn.shared.nn.steps import _backward_steps, _mask_state, _steps, _through


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
