"""The weights a run starts from: fresh, or earlier ones (``--init-from``).

``init-from`` names a run directory (its ``model.pt`` and ``config.toml``) or a bare
``model.pt``: a pretrained language model, an earlier federation. Every weight must match
the run's model by name and shape, except the task head (``head.*``): a classify head whose
labels differ from the earlier run's is re-initialised, with a warning, as is any head
with ``reset-head``. A run directory's inputs must also be this run's (tokenizer and its
vocabulary, numeric features in order), since weights of the right shapes could still be
read against other ids or channels. Anything else that does not match is a ``ConfigError`` (exit 2).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fedrnn.shared.config import RunConfig, load_toml
from fedrnn.shared.errors import ConfigError
from fedrnn.shared.models import build_model

log = logging.getLogger("fedrnn")

HEAD = "head."  # the task head's parameters (shared.models.SequenceModel.head)


def initial_weights(config: RunConfig) -> dict[str, torch.Tensor]:
    """The run's first global weights (``config`` resolved): a fresh model, with the
    weights of ``init-from`` loaded into it when it is set."""
    fresh = build_model(config).state_dict()
    if not config.init_from:
        return fresh
    source, earlier = _read(Path(config.init_from).expanduser())
    if earlier is not None:
        _check_inputs(source, earlier, config)
    reset = config.reset_head
    if earlier is not None and config.task == earlier.task == "classify" and (
            earlier.label_names != config.label_names):
        log.warning("%s: its labels %s differ from this run's %s; the classify head is "
                    "re-initialised", source, earlier.labels, config.labels)
        reset = True
    body = {k: v for k, v in _load(source).items() if not (reset and k.startswith(HEAD))}
    wrong = sorted({*body} ^ {k for k in fresh if not (reset and k.startswith(HEAD))})
    wrong += [k for k in body if k in fresh and body[k].shape != fresh[k].shape]
    heads = [k for k in wrong if k.startswith(HEAD)]
    if heads and len(heads) == len(wrong) and not reset:
        log.warning("%s: its head does not fit this run's (%s); it is re-initialised",
                    source, ", ".join(f"{k} {tuple(body[k].shape)}" for k in heads
                                      if k in body))
        body = {k: v for k, v in body.items() if not k.startswith(HEAD)}
    elif wrong:
        raise ConfigError(f"{source}: its model does not fit this run's architecture "
                          f"(--model, --hidden-size, --num-layers, the tokenizer ...): "
                          f"{', '.join(wrong[:4])} differ")
    return {**fresh, **body}


def _check_inputs(source: Path, earlier: RunConfig, config: RunConfig) -> None:
    """Weights of the same shapes can still read other inputs: another tokenizer whose
    vocabulary has as many ids, or as many numeric features under other names or in
    another order. Either is a ``ConfigError``: the embedding or input layer would be
    loaded onto the wrong ids or channels without a word."""
    if earlier.feature_names != config.feature_names:
        raise ConfigError(f"{source}: its inputs are the features "
                          f"{','.join(earlier.feature_names) or '(none: text)'}, this run's "
                          f"{','.join(config.feature_names) or '(none: text)'}; the same "
                          f"features in the same order (--features) are needed")
    if config.feature_names:
        return
    if _vocabulary(earlier) != _vocabulary(config):
        raise ConfigError(f"{source}: it was trained with the {_vocabulary(earlier)} "
                          f"tokenizer, this run uses {_vocabulary(config)}; use the same "
                          f"--tokenizer and --vocab-size")


def _vocabulary(config: RunConfig) -> str:
    """What a text run's token ids mean (char's are fixed; word's depend on the buckets)."""
    suffix = f" (vocab-size {config.vocab_size})" if config.tokenizer == "word" else ""
    return config.tokenizer + suffix


def _read(path: Path) -> tuple[Path, RunConfig | None]:
    """The weights file of ``path`` and, for a run directory, that run's config."""
    if path.is_dir():
        model = path / "model.pt"
        if not model.exists():
            raise ConfigError(f"{path}: no model.pt (not a finished fedrnn run)")
        settings = path / "config.toml"
        return model, RunConfig.from_flat(load_toml(settings)) if settings.exists() else None
    if not path.exists():
        raise ConfigError(f"{path}: init-from not found")
    return path, None


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"{path}: not a model's weights ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ConfigError(f"{path}: not a state_dict of tensors")
    return state
