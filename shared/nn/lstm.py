"""The LSTM cell: torch's equations, forward and backward over all steps (see ``steps``).
The forward direction of an unmasked layer runs on oneDNN instead (``onednn``), whose
workspace gives the same saved tensors to this backward pass."""

from __future__ import annotations

import torch

from fedrnn.shared.nn.buffers import _before, _scratch
from fedrnn.shared.nn.steps import _backward_steps, _chunks, _mask_state, _steps, _through


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
