"""The GRU cell: torch's equations, forward and backward over all steps (see ``steps``)."""

from __future__ import annotations

import torch

from fedrnn.shared.nn.buffers import _before, _scratch
from fedrnn.shared.nn.steps import _backward_steps, _chunks, _mask_state, _steps


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
    # steps at once, they have left the cache by the time the loop reads them).
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
