"""Work buffers: scratch tensors for one pass, views of a layer-direction's state buffer,
and per-sample output buffers kept between steps."""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import nn

_NUMPY_TYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _scratch(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """An uninitialised CPU work buffer of ``like``'s dtype, from numpy's allocator.

    torch asks glibc for 64-byte-aligned blocks; for blocks of these sizes (megabytes to
    tens of megabytes, every step) glibc grows the heap instead of reusing the block freed
    a step earlier, so every step's buffers are fresh pages the kernel must fault in and
    zero. numpy's 16-byte-aligned blocks are reused. Buffers only ever used inside this
    package."""
    np_type = _NUMPY_TYPES.get(like.dtype)
    if np_type is None or like.device.type != "cpu":
        return like.new_empty(shape)
    return torch.from_numpy(np.empty(shape, dtype=np_type))


def _before(buffer: torch.Tensor, reverse: bool) -> torch.Tensor:
    """[T, ...] view of a [T + 1, ...] state buffer: the state each time step started from.
    The forward direction fills the buffer from index 0, the reverse one from index T."""
    return buffer[1:] if reverse else buffer[:-1]


def _after(buffer: torch.Tensor, reverse: bool) -> torch.Tensor:
    """[T, ...] view of a [T + 1, ...] state buffer: the state after each time step."""
    return buffer[:-1] if reverse else buffer[1:]


_SAMPLE_BUFFERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _buffer(layer: nn.Module, name: str, shape: tuple[int, ...], like: torch.Tensor
            ) -> torch.Tensor:
    """A per-sample output buffer of ``layer`` kept between steps; held beside the layer,
    not in it, so that copying or pickling a model does not copy tens of MB of scratch."""
    buffers = _SAMPLE_BUFFERS.setdefault(layer, {})
    buf = buffers.get(name)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype:
        buf = buffers[name] = like.new_empty(shape)
    return buf
