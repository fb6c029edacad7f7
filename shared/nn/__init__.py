"""DP-ready recurrent layers: drop-in ``LSTM``, ``GRU``, ``RNN`` with cheap, exact per-sample
gradients under Opacus.

Same constructor, parameter names (``weight_ih_l0``, ``bias_hh_l1_reverse`` ...), outputs
and initial states as torch's layers, so state dicts load both ways. ``forward`` also
takes ``lengths`` [B]: steps past a sequence's length leave the state unchanged and
output zeros, and the reverse direction starts at each sequence's own end. Training under
Opacus needs ``register_with_opacus()`` once per process (``registration``).

Why they are fast. Each layer-direction is one autograd node (``autograd._Sweep``) whose
forward and backward are written out by hand, so the time loop holds only the sequential
work: per step one matmul with the recurrent weight and a handful of element-wise kernels
on preallocated buffers (autograd through torch's cell equations runs about 25 small ops
per step, plus a graph node for each). Everything that does not depend on the previous
step is done for all steps at once: the input projection, the gate derivatives, the input
gradient, and the weight gradients.

Per-sample work. The gradient of a weight is a sum over time of outer products,
``dW_hh[b] = sum_t dG_t[b] (x) h_{t-1}[b]`` with ``dG_t`` the gradient of the gate
pre-activations. When Opacus has hooked the layer, the backward pass leaves the weight
gradients to it and keeps (``dG``, input, previous state) per layer-direction:

- hooks mode: the registered grad sampler turns them into per-sample gradients, one
  batched matmul per weight, and sets the ordinary gradient from the same tensors;
- ghost mode: the registered norm sampler gives each sample's gradient norm from per-step
  Gram matrices, and Opacus's second backward pass (each sample's gradient rescaled by its
  clipping factor) is replayed without the time loop (``replay``).

Without Opacus, the backward pass computes the ordinary gradients, one matmul per weight.
``fedrnn bench dp-step`` measures a DP-SGD step against torch's and Opacus's layers.

The modules, in dependency order: ``buffers`` (work buffers), ``records`` (what a pass
leaves for Opacus), ``steps`` (the time loop's shared pieces), ``lstm``, ``onednn``, ``gru``,
``rnn`` (the cells), ``gradients``, ``replay``, ``autograd``, ``layers`` (this API),
``samplers`` (Opacus's grad and norm samplers) and ``registration``. Names with a leading
underscore are this package's own, not its API.
"""

from fedrnn.shared.nn.layers import GRU, LSTM, RNN, Embedding
from fedrnn.shared.nn.registration import register_with_opacus

__all__ = ["GRU", "LSTM", "RNN", "Embedding", "register_with_opacus"]
