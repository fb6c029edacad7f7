"""The tasks fedrnn trains for, one object each, looked up by name: ``get_task("lm")``.

Every difference between tasks lives in its ``Task`` class (``base.py``): the model head's
size and whether it predicts per step, the loss, the metrics with their names, the bounds
of a site's DP evaluation, and the checks of the data against the task. Code elsewhere
asks the task object (``get_task(config.task)``) and never compares task names.

- ``classify`` (``classify.py``): one label per sequence; ``loss``, ``accuracy``, ``auroc``;
- ``lm`` (``lm.py``): next token; ``loss``, ``accuracy``, ``perplexity``;
- ``forecast`` (``forecast.py``): next observed values; ``loss``, ``mae``.

Adding a task:

1. Write ``shared/tasks/NAME.py`` with a ``Task`` subclass decorated by
   ``@register_task("NAME")``; implement its abstract methods (``classify.py`` is the
   shortest complete example) and set its ``synthetic`` corpus.
2. Import it below, so that registering it happens when the package is imported.
3. Add ``"NAME"`` to ``TASKS`` in ``shared/config.py``: the ``--task`` choices, checked
   without importing torch. ``tests/shared/test_tasks.py`` fails until the two lists agree.
"""

# Importing a task's module registers it.
from fedrnn.shared.tasks import classify, forecast, lm  # noqa: F401
from fedrnn.shared.tasks.base import Batch, Task
from fedrnn.shared.tasks.classify import auroc
from fedrnn.shared.tasks.registry import METRICS, get_task, register_task, task_names

__all__ = ["METRICS", "Batch", "Task", "auroc", "get_task", "register_task", "task_names"]
