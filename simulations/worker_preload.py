"""Imported by each Ray worker process of ``fedrnn simulate`` as it starts (``ray_setup``).

The ClientApp's libraries (torch, Opacus, Flower: about 3.5 s) are then loaded while the
driver is still reading the data, not when round 1's first message arrives. So is
Flower's actor class.

The actor class lives in ``flwr.simulation.ray_transport.ray_actor``, and importing it runs
``flwr/simulation/__init__.py`` first, which imports Flower's whole simulation server
(LinkState, its SQL object store, SQLAlchemy, Alembic): about 1 s of CPU per worker, spent
while the machine's cores are all busy starting up, for code a ClientApp actor never runs.
Here that package is registered without running its ``__init__`` until something asks
it for an attribute (``_deferred_package``); its submodules import as usual.
"""

import importlib.util
import os
import sys

from simulations.ray_setup import CPUS_PER_CLIENT

# Ray sets OMP_NUM_THREADS to a task's CPUs only when the task starts, after this import:
# torch would already have sized its thread pool to the whole machine, and two actors on
# two cores would run four threads (measured: rounds 5x slower). Set it as Ray would.
os.environ.setdefault("OMP_NUM_THREADS", str(CPUS_PER_CLIENT))


def _deferred_package(name: str) -> None:
    """Put package ``name`` in ``sys.modules`` with its ``__init__`` not yet run: importing
    its submodules works as usual, and the first attribute looked up on the package itself
    runs the ``__init__`` (so nothing that needs it can tell the difference)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return
    package = importlib.util.module_from_spec(spec)

    def __getattr__(attribute: str):  # noqa: N807 (module-level __getattr__, PEP 562)
        del package.__dict__["__getattr__"]
        spec.loader.exec_module(package)
        return getattr(package, attribute)

    package.__dict__["__getattr__"] = __getattr__
    sys.modules[name] = package
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, package)


import flwr  # noqa: E402

_deferred_package("flwr.simulation")

import flwr.simulation.ray_transport.ray_actor  # noqa: E402, F401

import client.app  # noqa: E402, F401
import client.training  # noqa: E402, F401  (torch and Opacus: the handlers import it)
