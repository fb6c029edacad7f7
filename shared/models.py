"""Recurrent sequence models: an input layer, a stacked RNN/LSTM/GRU, and a task head.

The recurrent layers are ``fedrnn.shared.nn``'s: numerically torch's layers, with torch's
parameter names (saved weights load into ``torch.nn.GRU`` etc.), and per-sample gradients
Opacus computes at about the cost of ordinary training.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import torch
from torch import nn

from fedrnn.shared import nn as dpnn
from fedrnn.shared.config import RunConfig
from fedrnn.shared.data.tokenizers import make_tokenizer
from fedrnn.shared.tasks import get_task


class SequenceModel(nn.Module):
    """Maps a padded batch to per-step outputs (``lm``, ``forecast``) or one output per
    sequence taken at its last valid step (``classify``).

    Inputs: ``x`` [B, T] token ids or [B, T, C] channels, ``lengths`` [B] valid steps (>= 1).
    Outputs: [B, T, n_outputs] or [B, n_outputs].
    """

    def __init__(self, *, cell: str, n_outputs: int, per_step: bool, hidden_size: int,
                 num_layers: int, dropout: float = 0.0, nonlinearity: str = "tanh",
                 vocab_size: int = 0, embedding_dim: int = 0, n_channels: int = 0) -> None:
        super().__init__()
        if (vocab_size > 0) == (n_channels > 0):
            raise ValueError("give exactly one of vocab_size (tokens) or n_channels (series)")
        self.embed = dpnn.Embedding(vocab_size, embedding_dim) if vocab_size else None
        input_size = embedding_dim if vocab_size else n_channels
        extra = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
        rnn_class = {"rnn": dpnn.RNN, "gru": dpnn.GRU, "lstm": dpnn.LSTM}[cell]
        self.rnn = rnn_class(input_size, hidden_size, num_layers=num_layers, batch_first=True,
                             dropout=dropout if num_layers > 1 else 0.0, **extra)
        self.head = nn.Linear(hidden_size, n_outputs)
        self.per_step = per_step

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x  # [B, T, E]
        out, _ = self.rnn(h)  # [B, T, H]
        if self.per_step:
            return self.head(out)  # [B, T, n_outputs]
        last = (lengths - 1).clamp(min=0)
        return self.head(out[torch.arange(out.shape[0]), last])  # [B, n_outputs]


def build_model(config: RunConfig) -> SequenceModel:
    """The model a run's config describes (``features``/``labels`` resolved from the data)."""
    kwargs: dict = {}
    if config.feature_names:  # numeric series: [values, observed flags, gap] per step
        kwargs["n_channels"] = 2 * len(config.feature_names) + 1
    else:
        kwargs["vocab_size"] = vocab_size(config)
        kwargs["embedding_dim"] = config.embedding_dim
    task = get_task(config.task)
    n_outputs = task.n_outputs(config, vocab_size=kwargs.get("vocab_size", 0))
    if n_outputs < 1:
        raise ValueError(f"cannot size the {task.name} head: resolve labels/features first")
    return SequenceModel(cell=config.model, n_outputs=n_outputs,
                         per_step=task.per_step, hidden_size=config.hidden_size,
                         num_layers=config.num_layers, dropout=config.dropout,
                         nonlinearity=config.nonlinearity, **kwargs)


def vocab_size(config: RunConfig) -> int:
    """The number of token ids of a text run's tokenizer; 0 for numeric series."""
    if config.feature_names:
        return 0
    return make_tokenizer(config.tokenizer, config.vocab_size).vocab_size


def load_trained(run_dir: str | Path) -> tuple[SequenceModel, RunConfig]:
    """The final global model of a finished run, with the config that built it."""
    run_dir = Path(run_dir)
    with (run_dir / "config.toml").open("rb") as fh:
        config = RunConfig.from_flat(tomllib.load(fh))
    model = build_model(config)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    return model.eval(), config

