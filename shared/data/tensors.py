"""Turning one client's records into fixed-shape tensors.

Every client pads its records to one length (its longest, at most ``max_len``), so that
Opacus's Poisson sampler can hand out empty batches of the right shape; each batch is
later trimmed to its own longest record. Padding sits after the last valid step and the
recurrent models are unidirectional, so it never influences a valid output; the task
losses and metrics mask it out as well.

Series records become per-step channels ``[z-values (F), observed flags (F), gap (1)]``:
missing values are zero with their observed flag 0, never imputed from other records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedrnn.shared.data.tokenizers import BOS, EOS, PAD, Tokenizer

Z_CLIP = 5.0  # standardised values beyond +-5 (entry errors like sbp=13682) are clipped
GAP_SCALE = 5.0  # gap channel = log1p(time since previous observation) / GAP_SCALE


@dataclass
class SequenceTensors:
    """One client's split. ``inputs`` [N, T] token ids or [N, T, 2F+1] channels."""

    inputs: torch.Tensor
    lengths: torch.Tensor  # [N] valid steps, each >= 1
    labels: torch.Tensor  # [N] class index, -1 when the record has none

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def subset(self, index: np.ndarray | torch.Tensor) -> SequenceTensors:
        """The records at ``index`` (positions or a boolean mask), in that order."""
        index = torch.as_tensor(index)
        return SequenceTensors(self.inputs[index], self.lengths[index], self.labels[index])

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.inputs, self.lengths, self.labels)


def encode_text(texts: list[str], tokenizer: Tokenizer, max_len: int) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """``[BOS, tokens..., EOS]`` truncated to ``max_len + 1`` ids (inputs plus the next-token
    target of the last input), padded with PAD."""
    encoded = [[BOS, *tokenizer.encode(t), EOS][: max_len + 1] for t in texts]
    width = max((len(e) for e in encoded), default=1)  # no records: an empty [0, 1] batch
    tokens = torch.full((len(encoded), width), PAD, dtype=torch.long)
    for i, ids in enumerate(encoded):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens, torch.tensor([len(e) for e in encoded], dtype=torch.long)


def local_scaling(values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std of one client's own observations (never sent anywhere)."""
    stacked = np.concatenate(values, axis=0)
    with np.errstate(all="ignore"):
        observed = ~np.isnan(stacked)
        count = observed.sum(axis=0)
        mean = np.where(count > 0, np.nansum(stacked, axis=0) / np.maximum(count, 1), 0.0)
        var = np.where(count > 1, np.nansum((stacked - mean) ** 2, axis=0)
                       / np.maximum(count - 1, 1), 1.0)
    std = np.sqrt(var)
    return mean, np.where(std > 1e-8, std, 1.0)


def encode_series(values: list[np.ndarray], times: list[np.ndarray], *, mean: np.ndarray,
                  std: np.ndarray, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels per step, keeping the most recent ``max_len`` observations of each record."""
    n_features = len(mean)
    kept = [(v[-max_len:], t[-max_len:]) for v, t in zip(values, times, strict=True)]
    width = max((len(v) for v, _ in kept), default=1)
    out = np.zeros((len(kept), width, 2 * n_features + 1), dtype=np.float32)
    for i, (v, t) in enumerate(kept):
        observed = ~np.isnan(v)
        z = np.clip(np.nan_to_num((v - mean) / std, nan=0.0), -Z_CLIP, Z_CLIP)
        gaps = np.diff(t, prepend=t[0])
        out[i, : len(v), :n_features] = z * observed
        out[i, : len(v), n_features: 2 * n_features] = observed
        out[i, : len(v), -1] = np.log1p(np.maximum(gaps, 0.0)) / GAP_SCALE
    lengths = torch.tensor([len(v) for v, _ in kept], dtype=torch.long)
    return torch.from_numpy(out), lengths
