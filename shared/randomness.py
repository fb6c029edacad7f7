"""A site's own source of randomness: DP-SGD's noise, its Poisson batches, dropout's seed.

DP-SGD protects a record only if nobody can predict the noise added to the update. torch's
generator (Mersenne Twister) seeded with a 31-bit number fails twice: a server that knows
or guesses the seed (it sends the run's seed; 2**31 guesses are cheap) regenerates the noise
and subtracts it, and the Poisson batches tell it who was in each step. A deployed site
therefore draws both from a cryptographically secure generator keyed with 128 bits from the
operating system (``SiteRandomness.from_os``), never from anything the server sends.
Simulations, whose researcher holds every record anyway, key it from their seed instead
(``from_seed``) to be reproducible bit for bit.

The generator is numpy's ``Generator`` over randomgen's ``AESCounter`` (AES-128 in counter
mode). Opacus's own ``secure_mode`` would do this with ``torchcsprng``, which does not
install with the torch fedrnn uses.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
import randomgen
import torch

# AES-128 in counter mode rather than ChaCha20: both are secure stream ciphers, and AES runs
# on the CPU's AES instructions (every x86 machine of the project has them), so it is the
# faster of the two here (docs/benchmarks.md). Without the AES instructions randomgen
# falls back to a slower table-based AES, still correct. One algorithm everywhere, never
# chosen per machine: ``from_seed`` must give the same stream on every machine.
KEY_BITS = 128
_DOMAIN = b"fedrnn site randomness v1"  # keys from seeds never collide with another use


class SiteRandomness:
    """A cryptographically secure stream of random numbers, used by one training call.

    Not for sharing between threads that need reproducible streams: each draw advances
    one counter (randomgen's lock keeps concurrent draws safe, not ordered).
    """

    def __init__(self, key: int) -> None:
        if not 0 <= key < 2**KEY_BITS:
            raise ValueError(f"key must be an integer in [0, 2**{KEY_BITS})")
        self._rng = np.random.Generator(randomgen.AESCounter(key=key))

    @classmethod
    def from_os(cls) -> SiteRandomness:
        """Keyed with fresh bits from the operating system: what a deployed site uses.
        Nothing the server sends enters the key, so the server cannot regenerate the noise."""
        return cls(secrets.randbits(KEY_BITS))

    @classmethod
    def from_seed(cls, *seeds: int) -> SiteRandomness:
        """Keyed with SHA-256 of ``seeds``: the same integers give the same stream on every
        machine. Only for simulations, where whoever knows the seeds holds the data too."""
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError("from_seed needs one or more integers")
        digest = hashlib.sha256(_DOMAIN + b"".join(
            b"|" + str(s).encode() for s in seeds)).digest()
        return cls(int.from_bytes(digest[: KEY_BITS // 8], "big"))

    def gaussian(self, shape: torch.Size | tuple[int, ...], *, std: float,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Independent N(0, std**2) draws as a CPU tensor of ``shape`` and ``dtype``.

        float64 tensors get float64 draws; every other dtype float32 draws, converted (as
        ``torch.normal`` draws in the tensor's own precision).
        """
        if std < 0 or not np.isfinite(std):
            raise ValueError(f"std must be finite and non-negative, got {std}")
        if std == 0:
            return torch.zeros(shape, dtype=dtype)  # Opacus's zero-noise case: no draw
        draw = np.float64 if dtype == torch.float64 else np.float32
        noise = self._rng.standard_normal(int(np.prod(shape, dtype=np.int64)), dtype=draw)
        noise *= std
        return torch.from_numpy(noise).view(shape).to(dtype)

    def poisson_mask(self, n: int, rate: float) -> np.ndarray:
        """Which of ``n`` records one Poisson-sampled batch holds: each independently with
        probability ``rate`` (a boolean array of length ``n``)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        return self._rng.random(n) < rate

    def torch_seed(self) -> int:
        """A 63-bit seed for a torch generator: dropout and non-private shuffling, which
        protect nothing and may draw from torch's faster generator."""
        return int(self._rng.integers(0, 2**63, dtype=np.int64))
