"""Imported by each Ray worker process of ``fedrnn simulate`` as it starts (``ray_setup``).

The ClientApp's libraries (torch, Opacus, Flower: about 3.5 s) are then loaded while the
driver is still reading the data, not when round 1's first message arrives. So is
Flower's actor class, whose module pulls in the rest of Flower's simulation package.
"""

import os

from simulations.ray_setup import CPUS_PER_CLIENT

# Ray sets OMP_NUM_THREADS to a task's CPUs only when the task starts, after this import:
# torch would already have sized its thread pool to the whole machine, and two actors on
# two cores would run four threads (measured: rounds 5x slower). Set it as Ray would.
os.environ.setdefault("OMP_NUM_THREADS", str(CPUS_PER_CLIENT))

import flwr.simulation.ray_transport.ray_actor  # noqa: E402, F401

import client.app  # noqa: E402, F401
import client.training  # noqa: E402, F401  (torch and Opacus: the handlers import it)
