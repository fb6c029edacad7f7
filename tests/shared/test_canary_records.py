"""Canaries of the empirical audit: planted at the canary site alone, exactly as drawn, the
draw private and sufficient to regenerate them."""

from __future__ import annotations

import stat

import numpy as np
import pytest
import torch

from fedrnn.shared.config import RunConfig
from fedrnn.shared.data import (
    canary_tensors,
    client_data,
    resolve,
    site_records,
    text_tensors,
)
from fedrnn.shared.data.canaries import (
    CanaryDraw,
    draw_path,
    is_planted,
    new_draw,
    read_draw,
    secret_texts,
    write_draw,
)
from fedrnn.shared.errors import ConfigError


def _planted_config(tmp_path, **changes) -> RunConfig:
    config = resolve(RunConfig(dataset="synthetic", clients=3, out=str(tmp_path),
                               canaries=40, canary_site="site-1", **changes))
    write_draw(tmp_path, new_draw(config, "site-1"))
    return config


@pytest.mark.parametrize("task", ["classify", "forecast", "lm"])
def test_only_the_canary_site_holds_canaries_and_exactly_the_included_ones(tmp_path, task):
    config = _planted_config(tmp_path, task=task)
    draw = read_draw(tmp_path)
    plain = config.replace(canaries=0, canary_site="")
    for partition in range(3):
        planted, own = client_data(config, partition), client_data(plain, partition)
        n_own = len(own.train)
        assert planted.eval_keys == own.eval_keys  # never in evaluation
        assert torch.equal(planted.eval.inputs, own.eval.inputs)
        if planted.name != "site-1":
            assert planted is own or planted.train_keys == own.train_keys
            assert not any(is_planted(k) for k in planted.train_keys)
            continue
        extra = planted.train_keys[n_own:]
        assert planted.train_keys[:n_own] == own.train_keys
        assert extra == [f"canary:{i}" for i, inside in enumerate(draw.included) if inside]
        # the appended tensors are the included canaries, as the audit regenerates them
        every = canary_tensors(config, draw)
        chosen = every.subset(np.array(draw.included))
        width = chosen.inputs.shape[1]
        assert torch.equal(planted.train.inputs[n_own:, :width], chosen.inputs)
        assert torch.equal(planted.train.labels[n_own:], chosen.labels)
        assert torch.equal(planted.train.inputs[:n_own, : own.train.inputs.shape[1]],
                           own.train.inputs)


def test_site_records_are_the_canary_sites_own_records_without_anything_planted(tmp_path):
    # what the release score's auditor reads: the site's records, never which canaries
    # were planted (the planted set's size alone would tell how many were included)
    config = _planted_config(tmp_path, task="lm", canary_secrets=2)
    own = client_data(config.replace(canaries=0, canary_secrets=0, canary_site=""), 1).train
    records = site_records(config, "site-1")
    assert len(records) == len(own) < len(client_data(config, 1).train)
    assert torch.equal(records.inputs, own.inputs)
    with pytest.raises(ConfigError, match="no client named 'site-7'"):
        site_records(config, "site-7")


def test_the_draw_is_private_and_regenerates_the_same_canaries(tmp_path):
    config = _planted_config(tmp_path)
    path = draw_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    draw = read_draw(tmp_path)
    assert draw == CanaryDraw.from_json(draw.to_json())
    assert len(draw.included) == 40 and 0 < sum(draw.included) < 40
    first, again = canary_tensors(config, draw), canary_tensors(config, read_draw(tmp_path))
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.labels, again.labels)
    # unrelated to the run's seed: two draws of one config differ
    assert new_draw(config, "site-1").seed != draw.seed


def test_secrets_are_planted_repeats_times(tmp_path):
    config = resolve(RunConfig(dataset="synthetic", task="lm", clients=2, out=str(tmp_path),
                               canary_secrets=3, canary_repeats=4, canary_site="site-0"))
    draw = new_draw(config, "site-0")
    write_draw(tmp_path, draw)
    data = client_data(config, 0)
    secrets = secret_texts(draw)
    assert all(s.startswith("my code is ") and len(s.split()) == 9 for s in secrets)
    assert sum(k.startswith("secret:") for k in data.train_keys) == 12
    encoded = text_tensors(config, secrets)
    assert torch.equal(data.train.inputs[-1, : encoded.inputs.shape[1]], encoded.inputs[-1])


def test_a_canary_site_without_its_draw_stops_with_a_message(tmp_path):
    config = resolve(RunConfig(dataset="synthetic", clients=2, out=str(tmp_path / "none"),
                               canaries=10, canary_site="site-0"))
    with pytest.raises(ConfigError, match="canaries.json"):
        client_data(config, 0)


def test_bad_audit_settings_are_refused():
    with pytest.raises(ConfigError, match="canary-secrets needs task lm"):
        RunConfig(canary_secrets=2)
    with pytest.raises(ConfigError, match="canaries"):
        RunConfig(canaries=-1)
