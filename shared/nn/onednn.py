"""The LSTM's forward direction on oneDNN's fused primitive, the one torch's own
``nn.LSTM`` runs on the CPU, with what ``lstm._lstm_backward`` needs read from its
workspace; checked on every training call, with a fallback to the package's own loop."""

from __future__ import annotations

import torch

from fedrnn.shared.nn.buffers import _scratch
from fedrnn.shared.nn.steps import _tanh

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
