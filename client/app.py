"""The fedrnn ClientApp: one site's train and evaluate handlers (Flower Message API).

A site receives the global weights and the run's config; it trains with DP-SGD on its own
records and replies with the trained weights and the metrics in ``shared.protocol``.
Its privacy history lives in ``context.state`` and grows every round, so the epsilon it
reports is its cumulative spend over the run.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.training import evaluate as evaluate_local
from client.training import train as train_local
from shared import protocol as P
from shared.config import RunConfig
from shared.data import ClientData, client_data
from shared.models import SequenceModel, build_model
from shared.privacy import History, calibrate_noise, epsilon, sample_rate, steps_per_round

app = ClientApp()

PRIVACY_STATE = "privacy-history"


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, server_round = _run_config(msg)
    data = _site_data(config, context)
    model = _global_model(config, msg)
    history = _history(context)
    sigma = noise_multiplier(config, n_records=len(data.train))
    result = train_local(model, data.train, config, noise_multiplier=sigma,
                         seed=_seed(config, context, server_round))
    if result.history:
        history += result.history
        _save_history(context, history)
    metrics = {
        P.NUM_EXAMPLES: len(data.train),
        P.TRAIN_LOSS: result.loss,
        P.STEPS: result.steps,
        P.NOISE_MULTIPLIER: sigma or 0.0,
        P.EPSILON: epsilon(history, delta=config.delta, accountant=config.accountant)
        if config.dp else float("inf"),
    }
    content = RecordDict({P.ARRAYS: ArrayRecord(model.state_dict()),
                          P.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, _ = _run_config(msg)
    data = _site_data(config, context)
    metrics = evaluate_local(_global_model(config, msg), data.eval, config)
    return Message(content=RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)


def noise_multiplier(config: RunConfig, *, n_records: int) -> float | None:
    """The site's noise multiplier; None without DP.

    Calibrated so that taking part in *every* planned round stays within the epsilon
    target: the site does not control how often it is sampled, so it plans for the worst.
    """
    if not config.dp:
        return None
    if not config.calibrate_noise:
        return config.noise_multiplier
    steps = config.rounds * steps_per_round(n_records, config.batch_size, config.local_epochs)
    return calibrate_noise(target_epsilon=config.epsilon, delta=config.delta,
                           sample_rate=sample_rate(n_records, config.batch_size), steps=steps,
                           accountant=config.accountant)


def _run_config(msg: Message) -> tuple[RunConfig, int]:
    values = dict(msg.content[P.CONFIG])
    server_round = int(values.pop(P.ROUND, 0))
    return RunConfig.from_flat(values), server_round


def _site_data(config: RunConfig, context: Context) -> ClientData:
    return client_data(config, int(context.node_config["partition-id"]))


def _global_model(config: RunConfig, msg: Message) -> SequenceModel:
    model = build_model(config)
    model.load_state_dict(msg.content[P.ARRAYS].to_torch_state_dict())
    return model


def _seed(config: RunConfig, context: Context, server_round: int) -> int:
    return (config.seed * 1_000_003 + int(context.node_config["partition-id"]) * 10_007
            + server_round) % 2**31


def _history(context: Context) -> History:
    record = context.state.config_records.get(PRIVACY_STATE)
    if record is None:
        return []
    return list(zip(record["noise"], record["rate"], record["steps"], strict=True))


def _save_history(context: Context, history: History) -> None:
    context.state[PRIVACY_STATE] = ConfigRecord({
        "noise": [float(s) for s, _, _ in history],
        "rate": [float(q) for _, q, _ in history],
        "steps": [int(n) for _, _, n in history],
    })
