"""The task registry: task names to the one object that implements each task.

``register_task("name")`` decorates a ``Task`` subclass; ``get_task(name)`` returns its
instance (tasks hold no state, so one instance serves every run). ``METRICS`` maps each
registered task to its metric names, the form the server's records and validation read.
"""

from __future__ import annotations

from collections.abc import Callable

from fedrnn.shared.errors import ConfigError
from fedrnn.shared.tasks.base import Task

_TASKS: dict[str, Task] = {}
METRICS: dict[str, tuple[str, ...]] = {}  # task name -> its metric names, "loss" first


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make ``cls`` the task ``name`` (the ``--task`` value)::

        @register_task("classify")
        class Classify(Task):
            metrics = ("loss", "accuracy", "auroc")
            ...
    """

    def register(cls: type[Task]) -> type[Task]:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is registered twice "
                             f"({type(_TASKS[name]).__name__} and {cls.__name__})")
        if not cls.metrics or cls.metrics[0] != "loss":
            raise ValueError(f"task {name!r}: its metrics must start with 'loss'")
        if cls.main_metric not in cls.metrics:
            raise ValueError(f"task {name!r}: its main metric must be one of its metrics")
        cls.name = name
        _TASKS[name] = cls()
        METRICS[name] = tuple(cls.metrics)
        return cls

    return register


def get_task(name: str) -> Task:
    """The registered task ``name``; a ConfigError naming the valid tasks otherwise."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(_TASKS)}") from None


def task_names() -> tuple[str, ...]:
    """The registered tasks' names, in registration order."""
    return tuple(_TASKS)
