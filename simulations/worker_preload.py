"""Imported by each Ray worker process of ``fedrnn simulate`` as it starts (``ray_setup``).

The ClientApp's libraries (torch, Opacus, Flower) are then loaded while the
driver is still reading the data, not when round 1's first message arrives. So is
Flower's actor class.

The actor class lives in ``flwr.simulation.ray_transport.ray_actor``, and importing it runs
``flwr/simulation/__init__.py`` first, which imports Flower's whole simulation server
(LinkState, its SQL object store, SQLAlchemy, Alembic): CPU spent per worker while the
machine's cores are all busy starting up, for code a ClientApp actor never runs.
Here that package is registered without running its ``__init__`` until something asks
it for an attribute (``_DeferredPackage``).
"""

import importlib.util
import os
import sys
import threading

from fedrnn.simulations.ray_setup import CPUS_PER_CLIENT

# Ray sets OMP_NUM_THREADS to a task's CPUs only when the task starts, after this import:
# torch would already have sized its thread pool to the whole machine, and two actors on
# two cores would run four threads, oversubscribing the cores. Set it as Ray would.
os.environ.setdefault("OMP_NUM_THREADS", str(CPUS_PER_CLIENT))


class _DeferredPackage:
    """Package ``name`` in ``sys.modules`` with its ``__init__`` not yet run.

    The ``__init__`` runs, once and under a lock (Flower's actor runs threads), the first
    time anything asks the package for an attribute it lacks; until then its submodules
    import as usual. If the ``__init__`` fails, the package leaves ``sys.modules`` and the
    error is raised, as from a failed import. One difference remains: a submodule imported
    before that first look-up keeps its module as the package's attribute of that name,
    where the ``__init__`` would have bound something else (Flower's binds the function
    ``run_simulation`` over its submodule). A worker imports only ``ray_transport``.
    """

    def __init__(self, spec) -> None:
        self.spec, self.lock, self.done = spec, threading.RLock(), False
        self.package = importlib.util.module_from_spec(spec)
        self.package.__dict__["__getattr__"] = self._getattr
        sys.modules[spec.name] = self.package
        parent, _, child = spec.name.rpartition(".")
        setattr(sys.modules[parent], child, self.package)

    def _getattr(self, attribute: str):
        with self.lock:  # another thread's look-up waits here for the __init__ to finish
            if not self.done:
                self.done = True  # look-ups the __init__ itself makes fail as usual
                try:
                    self.spec.loader.exec_module(self.package)
                except BaseException:
                    sys.modules.pop(self.spec.name, None)
                    raise
                finally:
                    self.package.__dict__.pop("__getattr__", None)
        if attribute in self.package.__dict__:
            return self.package.__dict__[attribute]
        raise AttributeError(f"module {self.spec.name!r} has no attribute {attribute!r}")


def _defer(name: str) -> None:
    spec = importlib.util.find_spec(name)
    if name not in sys.modules and spec is not None and spec.loader is not None \
            and spec.submodule_search_locations:
        _DeferredPackage(spec)


import flwr  # noqa: E402

_defer("flwr.simulation")

import flwr.simulation.ray_transport.ray_actor  # noqa: E402, F401

import fedrnn.client.app  # noqa: E402, F401
import fedrnn.client.training  # noqa: E402, F401  (torch and Opacus: the handlers import it)
