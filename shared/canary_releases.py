"""The canary site's releases, kept for the white-box audit of a simulation with canaries.

Record-level DP at a site protects what the site releases: its update of each round,
which the server receives on its own (no secure aggregation). The audit of that
guarantee may so look at exactly what the server received, not only at the final model
in which FedAvg has diluted the site's update among the others.

For every round the canary site trained, ``fedrnn simulate --canaries M`` keeps
``RUN/audit/releases/round-NNNN.pt`` (mode 0600): the global weights the site was sent
and the weights it replied, as the server received them (clipped and noised by the site).
Both are messages the server holds anyway; the file adds nothing the server does not see.
A deployed server keeps none.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedrnn.shared.data.canaries import AUDIT_DIR
from fedrnn.shared.files import write_atomic

RELEASES_DIR = "releases"
PATTERN = "round-*.pt"


@dataclass(frozen=True)
class Release:
    """One round's release of the canary site: the weights it was sent, and its reply."""

    server_round: int
    received: dict[str, torch.Tensor]
    released: dict[str, torch.Tensor]


def releases_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / AUDIT_DIR / RELEASES_DIR


def write_release(run_dir: str | Path, *, server_round: int,
                  received: Mapping[str, torch.Tensor],
                  released: Mapping[str, torch.Tensor]) -> Path:
    """Keep round ``server_round``'s release (mode 0600, directory 0700); returns its path.
    A resumed round overwrites its file: the reply the run went on with is the one kept."""
    folder = releases_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    buffer = io.BytesIO()
    torch.save({"round": server_round, "received": dict(received),
                "released": dict(released)}, buffer)
    path = folder / f"round-{server_round:04d}.pt"
    write_atomic(path, buffer.getvalue(), private=True)
    return path


def read_releases(run_dir: str | Path) -> list[Release]:
    """Every kept release, in round order; empty when the run kept none."""
    out = []
    for path in sorted(releases_dir(run_dir).glob(PATTERN)):
        data = torch.load(path, weights_only=True)
        out.append(Release(server_round=int(data["round"]), received=data["received"],
                           released=data["released"]))
    return sorted(out, key=lambda r: r.server_round)
