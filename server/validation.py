"""The server trusts no reply: every site's reply is checked before anything uses it.

Flower's aggregation checks only that replies share their keys: a (1,)-shaped array is
broadcast into any weight, NaN passes through averaging and clipping, a negative or zero
``num-examples`` divides by zero. A reply that fails any check here is dropped from the
round with one reason; nothing a site sends reaches aggregation unchecked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Message, MetricRecord

from fedrnn.shared import protocol as P
from fedrnn.shared.tasks import METRICS

# metrics a site may send, and the range each must be in (NaN: "undefined here")
TRAIN_METRICS = {P.NUM_EXAMPLES: (0, math.inf, False), P.UNIT_WEIGHT: (0, math.inf, False),
                 P.TRAIN_LOSS: (0, math.inf, True), P.STEPS: (0, math.inf, False),
                 P.NOISE_MULTIPLIER: (0, math.inf, False), P.EPSILON: (0, math.inf, False)}
EVAL_RANGES = {"loss": (0, math.inf, True), "accuracy": (0, 1, True), "auroc": (0, 1, True),
               "perplexity": (1, math.inf, True), "mae": (0, math.inf, True),
               P.NUM_EXAMPLES: (0, math.inf, False), P.UNIT_WEIGHT: (0, math.inf, False),
               P.EPSILON: (0, math.inf, False)}


@dataclass(frozen=True)
class Shape:
    """What every array of a reply must be: the global model's names, shapes and dtypes."""

    arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]]

    @classmethod
    def of(cls, state: Mapping[str, np.ndarray]) -> Shape:
        return cls({k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in state.items()})


def check_train_reply(reply: Message, shape: Shape) -> str | None:
    """Why ``reply`` (a training reply with content) cannot be used; None if it can."""
    content = reply.content
    if set(content.keys()) != {P.ARRAYS, P.METRICS} or P.ARRAYS not in content.array_records \
            or P.METRICS not in content.metric_records:
        return f"its content is {sorted(content.keys())}, not {[P.ARRAYS, P.METRICS]}"
    arrays = content.array_records[P.ARRAYS]
    if set(arrays.keys()) != set(shape.arrays):
        missing = sorted(set(shape.arrays) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(shape.arrays))
        return f"its weights do not match the model (missing {missing[:3]}, extra {extra[:3]})"
    for name, (dims, dtype) in shape.arrays.items():
        array = arrays[name]
        if tuple(array.shape) != dims or np.dtype(array.dtype) != dtype:
            return (f"weight {name!r} is {array.dtype}{list(array.shape)}, not "
                    f"{dtype}{list(dims)}")
        if not np.isfinite(array.numpy()).all():
            return f"weight {name!r} holds NaN or infinite values"
    problem = _check_metrics(content.metric_records[P.METRICS], TRAIN_METRICS,
                             required=(P.NUM_EXAMPLES,))
    if problem:
        return problem
    if not content.metric_records[P.METRICS][P.NUM_EXAMPLES] > 0:
        return "num-examples is not positive"
    return None


def check_evaluate_reply(reply: Message, task: str) -> str | None:
    """Why ``reply`` (an evaluation reply with content) cannot be used; None if it can."""
    content = reply.content
    if set(content.keys()) != {P.METRICS} or P.METRICS not in content.metric_records:
        return f"its content is {sorted(content.keys())}, not {[P.METRICS]}"
    allowed = {k: v for k, v in EVAL_RANGES.items()
               if k in METRICS[task] or k in (P.NUM_EXAMPLES, P.UNIT_WEIGHT, P.EPSILON)}
    return _check_metrics(content.metric_records[P.METRICS], allowed,
                          required=(P.NUM_EXAMPLES, "loss"))


def _check_metrics(metrics: MetricRecord, allowed: Mapping[str, tuple[float, float, bool]],
                   required: tuple[str, ...]) -> str | None:
    unknown = sorted(set(metrics.keys()) - set(allowed))
    if unknown:
        return f"unknown metric(s) {unknown[:3]}"
    missing = [k for k in required if k not in metrics]
    if missing:
        return f"missing metric(s) {missing}"
    for key, value in metrics.items():
        low, high, nan_ok = allowed[key]
        if isinstance(value, (list, bool)):
            return f"metric {key!r} is not a number"
        value = float(value)
        if math.isnan(value):
            if not nan_ok:
                return f"metric {key!r} is NaN"
            continue
        if not low <= value <= high or (math.isinf(value) and key != P.EPSILON):
            return f"metric {key!r} = {value!r} is out of range"
    return None


def uniform_weight(reply: Message) -> Message:
    """User-level DP weighs every site alike: the server sets the weight itself, whatever
    the site sent (a site reporting a huge weight would scale the others away)."""
    reply.content.metric_records[P.METRICS][P.UNIT_WEIGHT] = 1
    return reply
