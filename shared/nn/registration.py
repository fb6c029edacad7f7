"""``register_with_opacus``: the layers' samplers put in Opacus's registries, its own
extension points, so that ``PrivacyEngine`` handles these layers as it handles its own in
both of its clipping modes.

Importing the layers does not import Opacus: processes that only hold a model's weights
(the server, a simulation's driver beside its busy workers) never train it privately, and
Opacus is slow to import. Code that trains under Opacus calls ``register_with_opacus()``
where it imports Opacus (``fedrnn.client.training`` does); a layer that reaches Opacus
unregistered stops its backward pass with an error that names this function.
"""

from __future__ import annotations

from fedrnn.shared.nn.layers import GRU, LSTM, RNN, Embedding
from fedrnn.shared.nn.samplers import _recurrent_grad_sample, _recurrent_norm_sample


def register_with_opacus() -> None:
    """Register ``LSTM``, ``GRU``, ``RNN`` (grad and norm samplers) and ``Embedding`` (Opacus's
    own embedding grad sampler, so its per-sample gradient norms come from per-sample
    gradients) with Opacus. Imports Opacus; idempotent, so every caller may call it."""
    from opacus.grad_sample import register_grad_sampler, register_norm_sampler
    from opacus.grad_sample.embedding import compute_embedding_grad_sample

    register_grad_sampler(Embedding)(compute_embedding_grad_sample)
    register_grad_sampler([LSTM, GRU, RNN])(_recurrent_grad_sample)
    register_norm_sampler([LSTM, GRU, RNN])(_recurrent_norm_sample)
