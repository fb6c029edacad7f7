"""The run configuration: every default in one place, one path from defaults to flags.

A run is described by one flat mapping of kebab-case keys (``rounds``, ``clients-per-round``,
``noise-multiplier`` ...). The same keys appear in ``[tool.flwr.app.config]`` of
pyproject.toml (``flwr run .``), in a ``--config FILE.toml`` and as ``fedrnn simulate``
flags; precedence is defaults < file < flags. The server sends the resolved mapping to
clients inside every round's ConfigRecord, so a site needs nothing but its data and
ledger paths.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedrnn.shared.errors import ConfigError
from fedrnn.shared.mechanisms import DP_LEVELS, LEVELS, DPMechanism, mechanism_of

TASKS = ("classify", "lm", "forecast")
MODELS = ("gru", "lstm", "rnn")
TOKENIZERS = ("char", "word")
PARTITIONERS = ("auto", "natural", "record", "iid", "dirichlet", "quantity")
STRATEGIES = ("fedavg", "fedadam", "fedmedian", "trimmed-mean", "krum")
ROBUST_STRATEGIES = ("fedmedian", "trimmed-mean", "krum")  # Flower's, robust to outliers
ATTACKS = ("none", "nan", "shape", "scale", "sign-flip")
ACCOUNTANTS = ("rdp", "prv", "gdp")
OPTIMIZERS = ("sgd", "adam")


# Which flags each command offers: a command lists the groups it reads (``fedrnn split
# --help`` shows the data and partition settings, not the model's). Every field is in exactly
# one group (tests/shared/test_config.py).
FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("dataset", "data", "task", "tokenizer", "vocab_size", "max_len", "labels",
             "features"),
    "partition": ("partitioner", "dirichlet_alpha", "clients", "eval_fraction"),
    "model": ("model", "nonlinearity", "hidden_size", "num_layers", "dropout", "embedding_dim"),
    "federation": ("rounds", "clients_per_round", "eval_clients_per_round", "strategy",
                   "server_lr", "trim_beta", "krum_byzantine", "local_epochs", "batch_size",
                   "optimizer", "lr", "early_stopping_patience", "early_stopping_metric",
                   "early_stopping_min_delta", "init_from", "reset_head"),
    "faults": ("dropout_rate", "straggler_rate", "attack", "attack_rate", "attack_scale",
               "straggler_delay"),
    "privacy": ("dp", "epsilon", "delta", "noise_multiplier", "clip_norm", "accountant",
                "dp_level", "user_noise_multiplier", "user_clip_norm"),
    "ledger": ("budget_epsilon", "budget_delta", "ledger_dir"),
    "run": ("round_timeout", "seed", "out", "run_id"),
    "audit": ("canaries", "canary_site", "canary_secrets", "canary_repeats", "canary_draw",
              "canary_clients"),
}

def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run. Field ``noise_multiplier`` has key ``noise-multiplier``."""

    # --- data -------------------------------------------------------------------------------
    dataset: str = _opt("nafld", "built-in dataset: nafld, tweets, synthetic (ignored with --data)")
    data: str = _opt("", "your own data file: .jsonl/.csv text or long-format numeric .csv")
    task: str = _opt("classify", "what to learn", TASKS)
    tokenizer: str = _opt("char", "text tokenizer (fixed vocabulary, nothing learnt from data)",
                          TOKENIZERS)
    vocab_size: int = _opt(4096, "hash buckets of the word tokenizer")
    max_len: int = _opt(48, "tokens or time steps kept per sequence; longer ones are truncated")
    labels: str = _opt("", "comma-separated class names (filled from the data when empty)")
    features: str = _opt("", "comma-separated numeric feature columns (filled from the data)")
    partitioner: str = _opt("auto", "how records are split into clients: auto uses the "
                            "'client' column when present, else iid (natural: a client of one "
                            "record trains or evaluates); record: one client per record; "
                            "dirichlet: label skew; quantity: size skew", PARTITIONERS)
    dirichlet_alpha: float = _opt(0.5, "skew of the dirichlet (labels) and quantity (sizes) "
                                  "partitioners (smaller = more)")
    eval_fraction: float = _opt(0.2, "share of each client's sequences held out for evaluation")
    # --- model ------------------------------------------------------------------------------
    model: str = _opt("gru", "recurrent cell", MODELS)
    nonlinearity: str = _opt("tanh", "activation of the vanilla rnn", ("tanh", "relu"))
    hidden_size: int = _opt(64, "hidden units per layer")
    num_layers: int = _opt(1, "stacked recurrent layers")
    dropout: float = _opt(0.0, "dropout between stacked layers")
    embedding_dim: int = _opt(32, "token embedding size (text inputs)")
    # --- federation -------------------------------------------------------------------------
    rounds: int = _opt(15, "federated rounds")
    clients: int = _opt(10, "simulated sites when a partitioner splits the data")
    clients_per_round: int = _opt(0, "sites sampled per training round (0 = all)")
    eval_clients_per_round: int = _opt(0, "sites sampled per evaluation round (0 = as many as "
                                       "clients-per-round)")
    strategy: str = _opt("fedavg", "server aggregation (Flower's): fedavg, fedadam, or a robust "
                         "one, fedmedian (coordinate-wise median), trimmed-mean (trim-beta "
                         "cut at each end), krum (krum-byzantine assumed hostile)", STRATEGIES)
    server_lr: float = _opt(0.05, "server learning rate of fedadam")
    trim_beta: float = _opt(0.2, "share of updates trimmed at each end by trimmed-mean")
    krum_byzantine: int = _opt(0, "hostile sites krum assumes among those sampled")
    local_epochs: int = _opt(1, "passes over local data per round (in expectation, with DP)")
    batch_size: int = _opt(64, "expected batch size (Poisson sampling rate = batch/records)")
    optimizer: str = _opt("adam", "client optimizer", OPTIMIZERS)
    lr: float = _opt(0.01, "client learning rate")
    early_stopping_patience: int = _opt(0, "stop once the federated evaluation's "
                                        "early-stopping-metric has not improved for this "
                                        "many rounds (0 = off); the best round's weights "
                                        "are kept as model_best.pt")
    early_stopping_metric: str = _opt("", "metric early stopping watches (empty: the task's "
                                      "main one: auroc, loss for lm, mae); loss, perplexity "
                                      "and mae improve downwards, accuracy and auroc upwards")
    early_stopping_min_delta: float = _opt(0.0, "smallest change of the metric that counts as "
                                           "an improvement")
    init_from: str = _opt("", "start from earlier weights: a run directory or a model.pt "
                          "of the same architecture")
    reset_head: bool = _opt(False, "with init-from, re-initialise the output layer (done "
                            "anyway, with a warning, when the labels differ)")
    # --- faults (simulation) ----------------------------------------------------------------
    dropout_rate: float = _opt(0.0, "share of sampled sites that fail mid-round: after charging "
                               "their ledger and training, before replying")
    straggler_rate: float = _opt(0.0, "share of sampled sites that reply straggler-delay late")
    attack: str = _opt("none", "simulated hostile sites' crafted update (simulation only): nan, "
                       "shape (1-element arrays), scale or sign-flip (the update times "
                       "+-attack-scale)", ATTACKS)
    attack_rate: float = _opt(0.0, "share of sampled sites that attack")
    attack_scale: float = _opt(10.0, "how much scale and sign-flip attacks magnify an update")
    straggler_delay: float = _opt(30.0, "seconds a straggler's reply is late (see "
                                  "round-timeout)")
    # --- privacy ----------------------------------------------------------------------------
    dp: bool = _opt(True, "train with DP-SGD (false: non-private baseline)")
    epsilon: float = _opt(8.0, "target record-level epsilon per site over the whole run")
    delta: float = _opt(1e-5, "target delta per site")
    noise_multiplier: float = _opt(0.0, "explicit noise multiplier (0 = calibrate to --epsilon)")
    clip_norm: float = _opt(1.0, "per-sample gradient clipping norm")
    accountant: str = _opt("rdp", "privacy accountant", ACCOUNTANTS)
    dp_level: str = _opt("record", "record: DP-SGD at each site; user: the server clips and "
                         "noises whole site updates (DP-FedAvg); both", DP_LEVELS)
    user_noise_multiplier: float = _opt(1.0, "user-level noise multiplier (std of the noise on "
                                        "the mean update = this x user-clip-norm / sampled)")
    user_clip_norm: float = _opt(1.0, "user-level clipping norm of a site's whole update")
    budget_epsilon: float = _opt(0.0, "each site's total epsilon budget across runs "
                                 "(0 = the epsilon target)")
    budget_delta: float = _opt(0.0, "each site's delta budget (0 = delta)")
    ledger_dir: str = _opt("", "directory of the simulated sites' privacy ledger (sites.sqlite, "
                           "per-record accounts of every site; default <out>/ledgers); reuse it "
                           "to carry budgets across runs")
    # --- audit ------------------------------------------------------------------------------
    canary_clients: int = _opt(0, "simulation with user-level DP: clients whose update is a "
                               "secret random direction above user-clip-norm, for the "
                               "user-level empirical audit (fedrnn audit RUN --empirical)")
    # --- run --------------------------------------------------------------------------------
    round_timeout: float = _opt(0.0, "seconds a round waits for the sampled sites' replies; "
                                "sites that miss it are dropped from the round (0: no limit)")
    seed: int = _opt(0, "random seed (data split, model init, sampling, noise)")
    out: str = _opt("", "run directory (default runs/<time>)")
    run_id: str = _opt("", "name of the run in the ledgers (default: from the run directory)")
    # --- empirical audit (simulation only; docs/empirical-audit.md) ---------------------------
    canaries: int = _opt(0, "canary records planted at the canary site, each trained on with "
                         "probability 1/2 by a secret draw kept in <out>/audit/canaries.json "
                         "(fedrnn audit RUN --empirical)")
    canary_site: str = _opt("", "the site that holds the canaries (default: the first site "
                            "that trains)")
    canary_secrets: int = _opt(0, "random secrets ('my code is 4 8 1 5 0 9') planted at the "
                               "canary site for the exposure test (task lm)")
    canary_repeats: int = _opt(1, "copies of each secret in the canary site's records")
    canary_draw: str = _opt("", "plant the canaries of an earlier run (its audit/canaries.json) "
                            "instead of a fresh draw: the same canaries in a DP and a "
                            "no-noise run")

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and math.isnan(value):
                problems.append(f"{key_of(f.name)} is NaN")
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                problems.append(f"{key_of(f.name)} must be one of {', '.join(choices)}, "
                                f"not {getattr(self, f.name)!r}")
        positive = ("rounds", "clients", "batch_size", "hidden_size", "num_layers",
                    "local_epochs", "max_len", "vocab_size", "embedding_dim")
        problems += [f"{key_of(n)} must be at least 1" for n in positive if getattr(self, n) < 1]
        if self.clients_per_round < 0 or self.eval_clients_per_round < 0:
            problems.append("clients-per-round must be 0 (all) or positive")
        if self.dp:
            if not (self.epsilon > 0):
                problems.append("epsilon must be positive (use --no-dp for no privacy)")
            if not (0 < self.delta < 1):
                problems.append("delta must be in (0, 1)")
            # an infinite clip bounds nothing: the ledger would charge an epsilon that the
            # update does not have
            if not 0 < self.clip_norm < math.inf:
                problems.append("clip-norm must be a positive number")
            if not 0 <= self.noise_multiplier < math.inf:
                problems.append("noise-multiplier must be 0 (calibrate) or a positive number")
        if self.budget_epsilon < 0 or not (0 <= self.budget_delta < 1):
            problems.append("budget-epsilon must be >= 0 and budget-delta in [0, 1)")
        asked = LEVELS.get(self.dp_level)  # with or without --no-dp; None: reported above
        if asked and asked.server_clips_and_noises and not (
                0 < self.user_noise_multiplier < math.inf and 0 < self.user_clip_norm < math.inf):
            problems.append("user-noise-multiplier and user-clip-norm must be positive numbers")
        if self.early_stopping_patience < 0:
            problems.append("early-stopping-patience must be 0 (off) or positive")
        if not 0 <= self.early_stopping_min_delta < math.inf:
            problems.append("early-stopping-min-delta must be a number >= 0")
        if not self.round_timeout >= 0:
            problems.append("round-timeout must be >= 0")
        if not (0 < self.eval_fraction < 1):
            problems.append("eval-fraction must be in (0, 1)")
        if not (0 <= self.dropout < 1):
            problems.append("dropout must be in [0, 1)")
        if self.lr <= 0 or self.server_lr <= 0 or self.dirichlet_alpha <= 0:
            problems.append("lr, server-lr and dirichlet-alpha must be positive")
        if not (0 <= self.dropout_rate < 1 and 0 <= self.straggler_rate < 1):
            problems.append("dropout-rate and straggler-rate must be in [0, 1)")
        if self.straggler_delay < 0:
            problems.append("straggler-delay must be >= 0")
        if not (0 <= self.attack_rate < 1 and 0 < self.attack_scale < math.inf):
            problems.append("attack-rate must be in [0, 1) and attack-scale a positive number")
        if not 0 < self.trim_beta < 0.5 or self.krum_byzantine < 0:
            problems.append("trim-beta must be in (0, 0.5) and krum-byzantine >= 0")
        if self.strategy in ROBUST_STRATEGIES and asked and self.user_level:
            problems.append(f"strategy {self.strategy} does not combine with user-level DP, "
                            "whose noise is calibrated to a mean of clipped updates (one "
                            "site moves it by at most clip / sampled): use fedavg or fedadam")
        if self.canary_clients < 0:
            problems.append("canary-clients must be >= 0")
        elif self.canary_clients and asked and not (self.dp and asked.server_clips_and_noises):
            # a canary client's update is a whole site's update: only the server's clipping
            # and noise of whole updates (user-level DP) bound what it reveals
            problems.append("canary-clients audits user-level DP: use it with --dp-level "
                            "user or both")
        if self.canaries < 0 or self.canary_secrets < 0 or self.canary_repeats < 1:
            problems.append("canaries and canary-secrets must be >= 0, canary-repeats >= 1")
        if self.canary_secrets and self.task != "lm":
            problems.append("canary-secrets needs task lm (secrets are text a language model "
                            "can complete)")
        if problems:
            raise ConfigError("; ".join(problems))

    # --- derived ------------------------------------------------------------------------------
    @property
    def label_names(self) -> list[str]:
        return [s for s in self.labels.split(",") if s] if self.labels else []

    @property
    def feature_names(self) -> list[str]:
        return [s for s in self.features.split(",") if s] if self.features else []

    @property
    def eval_per_round(self) -> int:
        """Sites evaluating per round: eval-clients-per-round, else clients-per-round; 0 = all."""
        return self.eval_clients_per_round or self.clients_per_round

    @property
    def mechanism(self) -> DPMechanism:
        """Where the run's DP comes from (``shared.mechanisms``): ``dp`` and ``dp-level``."""
        return mechanism_of(dp=self.dp, dp_level=self.dp_level)

    @property
    def record_level(self) -> bool:
        """Whether sites run DP-SGD (record-level DP)."""
        return self.mechanism.sites_run_dpsgd

    @property
    def user_level(self) -> bool:
        """Whether the server clips and noises whole site updates (user-level DP)."""
        return self.mechanism.server_clips_and_noises

    @property
    def site_budget(self) -> tuple[float, float]:
        """(epsilon, delta) a site may spend in total, across runs."""
        return (self.budget_epsilon or self.epsilon, self.budget_delta or self.delta)

    @property
    def ledger_root(self) -> Path:
        """Where simulated sites keep their ledgers: ``ledger-dir``, else ``<out>/ledgers``."""
        return Path(self.ledger_dir) if self.ledger_dir else Path(self.out) / "ledgers"

    @property
    def calibrate_noise(self) -> bool:
        """Whether the noise multiplier is solved from the epsilon target."""
        return self.record_level and self.noise_multiplier == 0 and math.isfinite(self.epsilon)

    # --- conversions --------------------------------------------------------------------------
    def to_flat(self) -> dict[str, Any]:
        """Kebab-case mapping of every field (ConfigRecord- and TOML-friendly)."""
        return {key_of(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], *, base: RunConfig | None = None) -> RunConfig:
        """Build from a kebab-case mapping; unknown keys are an error, missing keys default."""
        known = {key_of(f.name): f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known))})")
        kwargs = {}
        for key, value in values.items():
            f = known[key]
            kwargs[f.name] = _coerce(key, value, type(getattr(base or cls(), f.name)))
        return dataclasses.replace(base or cls(), **kwargs)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def key_of(field_name: str) -> str:
    return field_name.replace("_", "-")


def _coerce(key: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a {kind.__name__}, not {value!r}") from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file; accepts top-level keys or a ``[fedrnn]`` table."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return data.get("fedrnn", data)


def dump_toml(config: RunConfig) -> str:
    """Resolved config as TOML text (``config.toml`` in a run directory)."""
    lines = []
    for key, value in config.to_flat().items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, float) and math.isinf(value):
            text = "inf" if value > 0 else "-inf"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
