"""Peak resident memory of a command and every process it starts, all together.

``python -m fedrnn.simulations.peak_memory -- fedrnn simulate --scenario nafld-patients``

Every 0.2 s the resident set sizes (``/proc/PID/statm``, Linux) of the command and all its
descendants (by parent id: Ray's GCS, raylet, agents and workers included) are summed;
the largest sum is reported with the processes that made it up. A sampler can miss a
peak shorter than its period; the simulation's memory grows and shrinks over seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

PERIOD_S = 0.2


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, resident bytes, command line) of every readable process."""
    page = os.sysconf("SC_PAGE_SIZE")
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{name}/statm") as fh:
                resident = int(fh.read().split()[1]) * page
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                command = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue  # ended while being read
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        found[int(name)] = (parent, resident, command)
    return found


def tree_rss(root: int) -> dict[int, tuple[int, str]]:
    """pid -> (resident bytes, command) of ``root`` and all its descendants."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in procs.items():
        children.setdefault(parent, []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in procs and pid not in tree:
            tree[pid] = procs[pid][1:]
            todo += children.get(pid, [])
    return tree


def watch(command: list[str]) -> dict:
    started = time.monotonic()
    proc = subprocess.Popen(command)
    peak, at_peak = 0, {}
    while proc.poll() is None:
        tree = tree_rss(proc.pid)
        total = sum(rss for rss, _ in tree.values())
        if total > peak:
            peak, at_peak = total, tree
        time.sleep(PERIOD_S)
    return {"returncode": proc.returncode, "seconds": round(time.monotonic() - started, 1),
            "peak_mib": round(peak / 2**20), "processes_at_peak": len(at_peak),
            "by_process_mib": [[round(rss / 2**20), cmd[:100]]
                               for rss, cmd in sorted(at_peak.values(), reverse=True)]}


def main() -> int:
    args = sys.argv[1:]
    if "--" not in args or args.index("--") == len(args) - 1:
        print("usage: python -m fedrnn.simulations.peak_memory [--json] -- COMMAND ...",
              file=sys.stderr)
        return 2
    result = watch(args[args.index("--") + 1:])
    if "--json" in args[: args.index("--")]:
        print(json.dumps(result))
    else:
        print(f"peak resident memory, all processes together: {result['peak_mib']} MiB "
              f"({result['processes_at_peak']} processes), exit status "
              f"{result['returncode']}, {result['seconds']} s", file=sys.stderr)
        for mib, cmd in result["by_process_mib"]:
            print(f"{mib:>8} MiB  {cmd}", file=sys.stderr)
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
