"""The grad sampler and norm sampler that Opacus calls for the recurrent layers (its
extension points, registered by ``registration``): per-sample gradients or their norms
from what the layer's last backward pass recorded."""

from __future__ import annotations

import torch
from torch import nn

from fedrnn.shared.nn.buffers import _buffer
from fedrnn.shared.nn.layers import _Recurrent
from fedrnn.shared.nn.records import _Pass


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
            # a fresh one per weight and step (tens of MB) costs its page faults each time.
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


def _accumulate_grad(param: nn.Parameter, grad: torch.Tensor, scale: float) -> None:
    """``param.grad += grad * scale`` as autograd would accumulate it."""
    if scale != 1.0:
        grad = grad.mul_(scale)
    param.grad = grad if param.grad is None else param.grad + grad
