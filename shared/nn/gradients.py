"""A sequence's weight and input gradients from its gate gradients: one matmul each, for
all steps and samples at once."""

from __future__ import annotations

import torch

from fedrnn.shared.nn.buffers import _scratch

# Operands narrower than this are multiplied the transposed way (``_outer_sum``).
_NARROW = 64


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
    """``d_g @ w_ih`` [T, B, I]; a narrow one the transposed way, as in ``_outer_sum``."""
    flat = d_g.reshape(-1, d_g.shape[2])
    if x.shape[2] < _NARROW:
        return torch.mm(w_ih.t(), flat.t()).t().view_as(x)
    return torch.mm(flat, w_ih, out=_scratch(x, flat.shape[0], x.shape[2])).view_as(x)


def _outer_sum(d_g: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
    """``sum_{t,b} d_g[t, b] (x) operand[t, b]``, a weight's gradient [G, I]. For a narrow
    operand (the first layer's embeddings) MKL is several times faster at the transposed
    product [I, G] than at [G, I]."""
    gates, width = d_g.shape[-1], operand.shape[-1]
    flat_g, flat_a = d_g.reshape(-1, gates), operand.reshape(-1, width)
    if width < _NARROW:
        return torch.mm(flat_a.t(), flat_g).t().contiguous()
    return torch.mm(flat_g.t(), flat_a)
