"""Opacus's ghost clipping runs a second backward pass through the same graph, each
sample's gradient rescaled by its clipping factor. A ``_Sweep`` recognises it and replays
its first pass rescaled (``_replay``), without the time loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedrnn.shared.nn.buffers import _scratch
from fedrnn.shared.nn.gradients import _outer_sum
from fedrnn.shared.nn.records import _Sequence


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
