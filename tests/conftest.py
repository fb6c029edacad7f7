"""Shared fixtures: small files in each supported format, written per test."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def text_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "messages.jsonl"
    words = ["good", "bad", "fine", "poor"]
    rows = [{"client": f"clinic-{i % 3}", "text": f"the visit was {words[i % 4]} today",
             "label": "pos" if i % 4 in (0, 2) else "neg"} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def long_tailed_jsonl(tmp_path):
    """Speakers as real messages have them: a few write often, most write once, and some
    only ever sent an empty message."""
    rows = [{"client": f"frequent-{i % 3}", "text": f"message {i} from a regular"}
            for i in range(30)]
    rows += [{"client": f"once-{i:02d}", "text": f"hello there {i}"} for i in range(40)]
    rows += [{"client": f"silent-{i}", "text": " "} for i in range(2)]
    path = tmp_path / "speakers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def series_csv(tmp_path: Path) -> Path:
    path = tmp_path / "vitals.csv"
    lines = ["client,sequence_id,time,hr,temp,label"]
    for seq in range(24):
        for t in range(2 + seq % 4):
            temp = "" if (seq + t) % 5 == 0 else f"{36.5 + 0.1 * t:.1f}"  # missing values
            lines.append(f"ward-{seq % 2},p{seq},{t * 1.5},{60 + seq + t},{temp},"
                         f"{'sick' if seq % 3 == 0 else 'well'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def independent_rdp_epsilon(history, delta: float) -> float:
    """Epsilon of a DP-SGD history by Google's dp-accounting: an independent implementation."""
    acc = dp_accounting.rdp.RdpAccountant()
    for sigma, q, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                    steps)
    return acc.get_epsilon(delta)


@pytest.fixture
def rdp_reference():
    return independent_rdp_epsilon


def releases_by_site(ledger_dir: Path) -> dict[str, list]:
    """Every release in a simulation's ledger, by site (rounds, with their parameters)."""
    from fedrnn.client.ledger import Ledger

    rows: dict[str, list] = {}
    for path in sorted(Path(ledger_dir).glob("*.sqlite")):
        with Ledger(path) as ledger:
            for release in ledger.releases():
                rows.setdefault(release.site, []).append(release)
    return rows
