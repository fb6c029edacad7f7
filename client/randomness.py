"""Interim: replaced by the CSPRNG module (randomgen ChaCha) on merge."""

from __future__ import annotations

import hashlib
import secrets

import numpy as np


class SiteRandomness:
    def __init__(self, key: int) -> None:
        self.generator = np.random.default_rng(key)
        self.key = key

    @classmethod
    def from_os(cls) -> SiteRandomness:
        return cls(secrets.randbits(256))

    @classmethod
    def from_seed(cls, *ints: int) -> SiteRandomness:
        digest = hashlib.sha256(",".join(map(str, ints)).encode()).digest()
        return cls(int.from_bytes(digest, "big"))

    def standard_normal(self, n: int) -> np.ndarray:
        return self.generator.standard_normal(n)

    def torch_seed(self) -> int:
        return int(self.generator.integers(0, 2**63 - 1))
