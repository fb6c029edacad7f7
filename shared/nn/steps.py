"""The time loop's pieces that every cell shares.

Each cell's forward (``lstm``, ``gru``, ``rnn``) writes the states, keeps what its backward
needs, and returns it as a dict. Each backward returns (d_gi, d_gh, d_h0, d_c0): the
gradients of the input and recurrent pre-activations [T, B, G] (the same tensor except in
the GRU) and of the initial state. Gate derivatives that do not depend on the incoming
gradient are computed for all steps at once, so each backward step is a few multiplies and
one matmul.
"""

from __future__ import annotations

import torch


def _steps(order, reverse: bool):
    """Each time step in ``order`` with the indices of its state buffer rows: the state
    it starts from and the one it writes."""
    for t in order:
        yield t, (t + 1 if reverse else t), (t if reverse else t + 1)


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


def _tanh(a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``tanh(a)`` as ``2 sigmoid(2a) - 1``: torch's CPU tanh is several times slower than
    its sigmoid; the result differs from tanh by float32 rounding (about 1e-7), as oneDNN's
    own does."""
    torch.mul(a, 2, out=out).sigmoid_()
    return out.mul_(2).sub_(1)
