"""``fedrnn bench simulation``: what Flower's Simulation Engine costs on top of the training.

One fixed workload (the default nafld GRU with DP-SGD, 100 clients, 20 sampled per round
to train and 20 to evaluate, 10 rounds, seed 0) is run twice, each in a fresh process
timed from spawn to exit, start-up included:

- ``simulation``: ``fedrnn simulate`` (ServerApp, Ray workers, Flower messages, run dir);
- ``plain``: the same client work back to back in one process with no framework: the
  same sampled clients (``ClientSampler``), each running the ClientApp's own round
  (``client.site``: calibrate its noise, charge its ledger, train with DP-SGD from the
  current global weights), then FedAvg's weighted mean (``fedavg``); the same
  evaluations. One torch thread, the fastest for this model on 2 cores.

``overhead_ratio = simulation_s / compute_s``, of the median of ``repeats`` alternating
pairs. The breakdown says where the rest goes: start-up (imports, data, Ray and its
workers) versus rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

# fedrnn is imported inside the functions: the plain process times its own imports
if TYPE_CHECKING:
    import torch

WORKLOAD = {"clients": 100, "clients-per-round": 20, "eval-clients-per-round": 20,
            "rounds": 10, "seed": 0}


def _flags(workload: dict[str, int]) -> list[str]:
    return [item for key, value in workload.items() for item in (f"--{key}", str(value))]


def run_simulation(workload: dict[str, int], work: Path) -> dict[str, float]:
    """``fedrnn simulate`` in a child process; wall time and its start-up/rounds split."""
    out = work / "simulation"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fedrnn.shared.cli", "simulate", *_flags(workload),
                           "--out", str(out)], capture_output=True, text=True)
    total = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"the simulation failed:\n{proc.stderr[-3000:]}")
    from fedrnn.shared.run_records import read_rows

    rows = read_rows(out)
    rounds = sum(r.seconds for r in rows)
    return {"total_s": total, "rounds_s": rounds, "startup_s": total - rounds,
            "first_round_s": rows[0].seconds}


def run_plain(workload: dict[str, int], work: Path) -> dict[str, float]:
    """The same client work in a fresh plain process (``plain_main``), wall-clocked."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from fedrnn.simulations.bench_simulation "
                           "import plain_main; plain_main()", json.dumps(workload),
                           str(work / "plain")],
                          capture_output=True, text=True)
    total = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"the plain run failed:\n{proc.stderr[-3000:]}")
    inside = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"total_s": total, **inside}


def plain_main() -> None:
    """Child process body: imports, data, then every round's client work, timed in parts."""
    started = time.perf_counter()
    import torch

    from fedrnn.client.site import simulated_site, train_round
    from fedrnn.client.training import evaluate
    from fedrnn.server.sampling import ClientSampler
    from fedrnn.shared import protocol as P
    from fedrnn.shared.config import RunConfig
    from fedrnn.shared.data import client_data, resolve
    from fedrnn.shared.models import build_model

    torch.set_num_threads(1)
    workload, work = json.loads(sys.argv[1]), Path(sys.argv[2])
    imported = time.perf_counter()
    config = resolve(RunConfig.from_flat(workload)).replace(run_id="plain", out=str(work))
    sampler = ClientSampler(range(config.clients), config)
    model = build_model(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = time.perf_counter()
    train_s = eval_s = 0.0
    for server_round in range(1, config.rounds + 1):
        t0 = time.perf_counter()
        updates = []
        for pid in sampler.sample(server_round, "train"):
            local = build_model(config)
            local.load_state_dict(state)
            # the simulated site's own round, as its ClientApp runs it, without Flower
            metrics = train_round(simulated_site(config, pid, server_round), config,
                                  server_round, local)
            updates.append((metrics[P.NUM_EXAMPLES], local.state_dict()))
        state = fedavg(updates)
        t1 = time.perf_counter()
        model.load_state_dict(state)
        for pid in sampler.sample(server_round, "evaluate"):
            evaluate(model, client_data(config, pid).eval, config)
        train_s += t1 - t0
        eval_s += time.perf_counter() - t1
    print(json.dumps({"import_s": imported - started, "data_s": loaded - imported,
                      "train_s": train_s, "eval_s": eval_s}))


def fedavg(updates: list[tuple[float, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The mean of the ``(weight, state_dict)`` updates weighted by their weights: what
    Flower's FedAvg computes on the server (``tests/simulations/test_scenarios_sweeps.py`` checks it
    against Flower's own). The plain run does not import Flower to compute it: that
    import (0.6 to 1.1 s on 2 shared cores) is part of the cost the benchmark measures."""
    total = sum(n for n, _ in updates)
    return {k: sum(n * s[k] for n, s in updates) / total for k in updates[0][1]}


def check_workload(workload: dict) -> None:
    """Refuse a workload the plain run would not reproduce: it aggregates with FedAvg's
    weighted mean only (no other strategy, no user-level DP's clipping and noise)."""
    from fedrnn.shared.config import RunConfig

    config = RunConfig.from_flat(workload)
    if config.strategy != "fedavg" or config.user_level:
        raise ValueError(f"the plain run reproduces FedAvg with record-level or no DP only, "
                         f"not strategy {config.strategy} with dp-level {config.dp_level}")


def bench_simulation(workload: dict[str, int] | None = None, *, repeats: int = 3,
                     progress=print) -> dict:
    """``repeats`` alternating pairs (plain, then simulation); the pair with the median
    ratio is reported, with every pair's ratio in ``ratios``. Alternating keeps a drift
    of the machine's speed (large over minutes on shared machines) from landing on
    one side only."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    workload = {**WORKLOAD, **(workload or {})}
    check_workload(workload)
    pairs = []
    with tempfile.TemporaryDirectory(prefix="fedrnn-bench-") as tmp:
        for i in range(repeats):
            work = Path(tmp) / str(i)
            progress(f"pair {i + 1}/{repeats}: plain process, the same client work, "
                     "no framework")
            plain = run_plain(workload, work)
            progress(f"pair {i + 1}/{repeats}: fedrnn simulate on Flower's Simulation Engine")
            simulation = run_simulation(workload, work)
            pairs.append((simulation["total_s"] / plain["total_s"], simulation, plain))
            progress(f"pair {i + 1}/{repeats}: ratio {pairs[-1][0]:.2f}")
    ratio, simulation, plain = sorted(pairs, key=lambda pair: pair[0])[(len(pairs) - 1) // 2]
    return {"workload": workload, "cores": os.cpu_count(), "simulation": simulation,
            "plain": plain, "simulation_s": simulation["total_s"],
            "compute_s": plain["total_s"], "overhead_ratio": ratio,
            "ratios": [pair[0] for pair in pairs]}


def format_report(result: dict) -> str:
    w, sim, plain = result["workload"], result["simulation"], result["plain"]
    lines = [f"workload: {w.get('dataset', 'nafld')} gru DP-SGD, {w['clients']} clients, "
             f"{w['clients-per-round']} per round (train) + {w['eval-clients-per-round']} "
             f"(evaluate), {w['rounds']} rounds, {result['cores']} cores",
             f"{'':<34}{'simulation':>12}{'plain':>10}",
             f"{'start-up: imports, data (+ Ray)':<34}{sim['startup_s']:>12.1f}"
             f"{plain['import_s'] + plain['data_s']:>10.1f}",
             f"{'rounds: train + evaluate':<34}{sim['rounds_s']:>12.1f}"
             f"{plain['train_s'] + plain['eval_s']:>10.1f}",
             f"{'  of which round 1':<34}{sim['first_round_s']:>12.1f}{'':>10}",
             f"{'total (process wall clock)':<34}{sim['total_s']:>12.1f}{plain['total_s']:>10.1f}",
             f"overhead ratio (simulation / plain): {result['overhead_ratio']:.2f} "
             f"(median of {len(result['ratios'])} alternating pairs: "
             + ", ".join(f"{r:.2f}" for r in result["ratios"]) + ")"]
    return "\n".join(lines)


def main_bench_simulation(*, as_json: bool, repeats: int = 3) -> None:
    result = bench_simulation(repeats=repeats,
                              progress=lambda m: print(f"fedrnn: bench: {m}", file=sys.stderr))
    if as_json:
        print(json.dumps({k: result[k] for k in ("workload", "simulation", "plain",
                                                  "ratios")}))
        print(json.dumps({k: result[k] for k in ("simulation_s", "compute_s",
                                                  "overhead_ratio")}))
    else:
        print(format_report(result))
