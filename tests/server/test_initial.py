import logging

import pytest
import torch

from fedrnn.server.initial import initial_weights
from fedrnn.shared.config import RunConfig, dump_toml
from fedrnn.shared.errors import ConfigError
from fedrnn.shared.models import build_model

CONFIG = RunConfig(task="classify", labels="neg,pos", hidden_size=8, embedding_dim=4)


def _finished_run(tmp_path, config):
    run = tmp_path / "earlier"
    run.mkdir(parents=True)
    model = build_model(config)
    torch.save(model.state_dict(), run / "model.pt")
    (run / "config.toml").write_text(dump_toml(config))
    return run, model.state_dict()


def test_starts_from_an_earlier_runs_weights(tmp_path):
    run, earlier = _finished_run(tmp_path, CONFIG)
    for source in (run, run / "model.pt"):
        weights = initial_weights(CONFIG.replace(init_from=str(source)))
        assert all(torch.equal(weights[k], earlier[k]) for k in earlier)


def test_a_head_of_other_labels_is_reinitialised_with_a_warning(tmp_path, caplog):
    run, earlier = _finished_run(tmp_path, CONFIG.replace(labels="a,b,c"))
    with caplog.at_level(logging.WARNING, logger="fedrnn"):
        weights = initial_weights(CONFIG.replace(init_from=str(run)))
    assert "labels a,b,c differ" in caplog.text
    assert weights["head.weight"].shape == (2, 8)
    assert all(torch.equal(weights[k], earlier[k]) for k in earlier if not k.startswith("head"))


def test_reset_head_forces_a_fresh_head(tmp_path):
    run, earlier = _finished_run(tmp_path, CONFIG)
    forced = initial_weights(CONFIG.replace(init_from=str(run), reset_head=True))
    assert not torch.equal(forced["head.weight"], earlier["head.weight"])
    assert torch.equal(forced["embed.weight"], earlier["embed.weight"])


def test_another_architecture_is_one_clear_error(tmp_path):
    run, _ = _finished_run(tmp_path, CONFIG.replace(hidden_size=16))
    with pytest.raises(ConfigError, match="does not fit this run's architecture"):
        initial_weights(CONFIG.replace(init_from=str(run)))
    with pytest.raises(ConfigError, match="not found"):
        initial_weights(CONFIG.replace(init_from=str(tmp_path / "nothing.pt")))
    (tmp_path / "junk.pt").write_text("not a model")
    with pytest.raises(ConfigError, match="not a model's weights"):
        initial_weights(CONFIG.replace(init_from=str(tmp_path / "junk.pt")))


def test_weights_of_the_same_shapes_over_other_inputs_are_refused(tmp_path):
    # A word tokenizer of 95 buckets has as many ids as char (4 special + 95 printable):
    # every shape fits, only the meaning of the embedding's rows differs.
    lm = RunConfig(task="lm", hidden_size=8, embedding_dim=4)
    word = lm.replace(tokenizer="word", vocab_size=95)
    assert build_model(word).embed.weight.shape == build_model(lm).embed.weight.shape
    run, _ = _finished_run(tmp_path / "text", word)
    with pytest.raises(ConfigError, match="word \\(vocab-size 95\\) tokenizer, this run uses char"):
        initial_weights(lm.replace(init_from=str(run)))
    assert initial_weights(word.replace(init_from=str(run)))  # the same inputs load
    # The same features in another order: the input layer would read swapped channels.
    series = RunConfig(task="forecast", features="hr,temp", hidden_size=8)
    run, _ = _finished_run(tmp_path / "series", series)
    with pytest.raises(ConfigError, match="features hr,temp, this run's temp,hr"):
        initial_weights(series.replace(features="temp,hr", init_from=str(run)))
    assert initial_weights(series.replace(init_from=str(run)))
