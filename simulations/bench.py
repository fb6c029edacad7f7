"""``fedrnn bench dp-step``: one full DP-SGD step of a character LSTM/GRU/RNN, four ways.

The workload is the LEAF Shakespeare model by default (embedding 8, 2 x 256, batch 64,
80 characters). One step = forward, backward, per-sample clipping, noise, optimizer step.

- ``torch``: torch's layer, non-private (plain SGD step): the cost to beat;
- ``opacus``: Opacus's ``DPLSTM``/``DPGRU``/``DPRNN`` under ``PrivacyEngine``;
- ``fedrnn``: ``fedrnn.shared.nn``'s layer under the same ``PrivacyEngine``, noise from torch's
  generator;
- ``fedrnn-csprng``: the same step as the client runs it (``fedrnn.client.training.make_private``),
  noise from the site's cryptographically secure generator (``shared.randomness``). Its
  ratio to ``fedrnn`` is the price of unpredictable noise (the issue's target: under 1.05).

Timing: one process, implementations interleaved round-robin so that machine noise hits
all alike, median of ``repeats`` steps after one warm-up step each; the secure generator's
ratio is the median of each repeat's ratio of two adjacent steps. Peak memory: each
implementation runs warm-up plus one step in a fresh child process, whose peak resident
set (``ru_maxrss``) is reported; a shared process could not attribute its peak.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fedrnn.shared.memory import reuse_freed_memory

IMPLEMENTATIONS = ("torch", "opacus", "fedrnn", "fedrnn-csprng")
VOCAB = 80  # LEAF Shakespeare's character set


@dataclass(frozen=True)
class StepSpec:
    model: str = "lstm"
    batch: int = 64
    seq_len: int = 80
    hidden: int = 256
    layers: int = 2
    embedding: int = 8


class CharModel(nn.Module):
    def __init__(self, rnn: nn.Module, spec: StepSpec) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, spec.embedding)
        self.rnn = rnn
        self.head = nn.Linear(spec.hidden, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out)  # [B, T, VOCAB]


def _layer(impl: str, spec: StepSpec) -> nn.Module:
    from opacus import layers as opacus_layers

    from fedrnn.shared import nn as fedrnn_layers

    name = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[spec.model]
    module = {"torch": nn, "opacus": opacus_layers, "fedrnn": fedrnn_layers}[impl]
    cls = getattr(module, ("DP" + name) if impl == "opacus" else name)
    return cls(spec.embedding, spec.hidden, num_layers=spec.layers, batch_first=True)


def make_step(impl: str, spec: StepSpec, seed: int = 0, clipping: str = "ghost"):
    """A closure performing one full training step of ``impl`` on a fixed random batch.

    ``clipping`` is Opacus's ``grad_sample_mode`` for fedrnn's layers: ``ghost`` (per-sample
    gradient norms, then Opacus's second backward pass for the clipped sum; what the client
    uses) or ``hooks`` (per-sample gradients materialised, Opacus's default). Opacus's own
    layer always runs in ``hooks`` mode, the mode its DP layers are documented with.
    """
    torch.manual_seed(seed)
    model = CharModel(_layer(impl.removesuffix("-csprng"), spec), spec)
    if impl.startswith("fedrnn"):
        from fedrnn.shared import nn as fedrnn_layers

        embed = fedrnn_layers.Embedding(VOCAB, spec.embedding)
        embed.load_state_dict(model.embed.state_dict())  # the same start as the others
        model.embed = embed
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, VOCAB, (spec.batch, spec.seq_len + 1))
    # contiguous: Opacus's ghost-clipping embedding code views the token ids
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    criterion = nn.CrossEntropyLoss()
    mode = clipping if impl.startswith("fedrnn") else "hooks"
    if impl == "fedrnn-csprng":
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
        from torch.utils.data import DataLoader, TensorDataset

        from fedrnn.client.training import make_private
        from fedrnn.shared.randomness import SiteRandomness

        if mode != "ghost":
            raise ValueError("the client's DP optimizer is Opacus's ghost clipping only")
        # the fixed batch as the loader: the accountant's rate and the expected batch size
        # are then 1 and spec.batch, as for the other implementations
        loader = DataLoader(TensorDataset(inputs, targets), batch_size=spec.batch)
        model, optimizer, _ = make_private(model, optimizer, loader, noise_multiplier=1.0,
                                           clip_norm=1.0, accountant="rdp",
                                           randomness=SiteRandomness.from_os())
        criterion = DPLossFastGradientClipping(model, optimizer, criterion)
    elif impl != "torch":
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        from fedrnn.shared.nn import register_with_opacus

        register_with_opacus()
        loader = DataLoader(TensorDataset(inputs, targets), batch_size=spec.batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=1.0, poisson_sampling=False, criterion=criterion,
                grad_sample_mode=mode)
        model, optimizer = private[0], private[1]
        if mode == "ghost":
            criterion = private[2]  # per-sample losses for Opacus's two backward passes
    model.train()
    shape = {"shape": (spec.batch, spec.seq_len)} if mode == "ghost" and impl != "torch" else {}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = criterion(logits.reshape(-1, VOCAB), targets.reshape(-1), **shape)
        loss.backward()
        optimizer.step()

    return step


def _peak_child(impl: str, spec: StepSpec, clipping: str, queue) -> None:
    warnings.simplefilter("ignore")
    reuse_freed_memory()
    step = make_step(impl, spec, clipping=clipping)
    step()
    step()
    queue.put(_high_water_mib())


def _high_water_mib() -> float:
    """Peak resident memory of this process's own address space (``VmHWM``). Unlike
    ``ru_maxrss``, which Linux carries over from the parent across exec, it starts afresh
    in a spawned child."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB -> MiB
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024.0


def peak_mb(impl: str, spec: StepSpec, clipping: str = "ghost") -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(impl, spec, clipping, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return float(value)


def bench_dp_step(spec: StepSpec, *, repeats: int = 5, clipping: str = "ghost",
                  progress=None) -> list[dict]:
    """Median milliseconds per step and peak MiB of each implementation; the
    ``fedrnn-csprng`` row also has ``vs_torch_rng``, the median over repeats of its step's
    time over the adjacent ``fedrnn`` step's (ghost mode only: the client's)."""
    warnings.simplefilter("ignore")
    reuse_freed_memory()  # as the client does before training (shared.memory)
    impls = [i for i in IMPLEMENTATIONS if clipping == "ghost" or i != "fedrnn-csprng"]
    steps = {impl: make_step(impl, spec, clipping=clipping) for impl in impls}
    for impl, step in steps.items():  # warm-up
        step()
        if progress:
            progress(f"warmed up {impl}")
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(repeats):
        for impl, step in steps.items():
            started = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - started)
        if progress:
            progress(f"repeat {r + 1}/{repeats}: " + ", ".join(
                f"{impl} {1000 * t[-1]:.0f} ms" for impl, t in times.items()))
    del steps
    rows = [{"impl": impl, "model": spec.model,
             "ms_per_step": 1000 * statistics.median(times[impl]),
             "peak_mb": peak_mb(impl, spec, clipping)} for impl in impls]
    if "fedrnn-csprng" in times:
        rows[-1]["vs_torch_rng"] = statistics.median(
            secure / plain for secure, plain in zip(times["fedrnn-csprng"], times["fedrnn"],
                                                    strict=True))
    return rows


def format_table(rows: list[dict], spec: StepSpec, clipping: str = "ghost") -> str:
    base = next(r["ms_per_step"] for r in rows if r["impl"] == "torch")
    opacus = next(r["ms_per_step"] for r in rows if r["impl"] == "opacus")
    lines = [f"DP-SGD step, {spec.model}: batch {spec.batch}, {spec.seq_len} steps, "
             f"{spec.layers} x {spec.hidden}, embedding {spec.embedding}, "
             f"{torch.get_num_threads()} threads; fedrnn in Opacus's {clipping!r} mode",
             f"{'impl':<14}{'ms/step':>10}{'x torch':>10}{'opacus/x':>10}{'peak MiB':>10}"]
    for r in rows:
        lines.append(f"{r['impl']:<14}{r['ms_per_step']:>10.1f}"
                     f"{r['ms_per_step'] / base:>10.2f}{opacus / r['ms_per_step']:>10.1f}"
                     f"{r['peak_mb']:>10.0f}")
    secure = next((r for r in rows if "vs_torch_rng" in r), None)
    if secure is not None:
        lines.append(f"secure noise: fedrnn-csprng / fedrnn = {secure['vs_torch_rng']:.3f} "
                     "(median of paired steps; target < 1.05)")
    return "\n".join(lines)


def main_dp_step(spec: StepSpec, *, as_json: bool, repeats: int, clipping: str = "ghost"
                 ) -> None:
    import sys

    rows = bench_dp_step(spec, repeats=repeats, clipping=clipping,
                         progress=lambda m: print(f"fedrnn: bench: {m}", file=sys.stderr))
    if as_json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_table(rows, spec, clipping))
