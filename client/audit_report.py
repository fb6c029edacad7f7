"""The audit as a picture and as one self-contained HTML file a privacy officer can file."""

from __future__ import annotations

import base64
import html
from datetime import UTC, datetime
from typing import Any

from fedrnn.client.audit import Audit, table
from fedrnn.client.empirical.report import html_section
from fedrnn.shared.plots import png_bytes, pyplot

MECHANISMS = """
<ul>
<li><b>Record-level DP (DP-SGD, at each site)</b>: every local step samples records with
probability q (Poisson), clips each record's gradient to the clip norm and adds Gaussian
noise of std (noise multiplier &times; clip norm). It protects each single record
(a message, a patient's sequence) of each site: the trained model and everything
derived from it changes little whether or not any one record was used.</li>
<li><b>User-level DP (DP-FedAvg, at the server)</b>: each site's whole update is clipped
and Gaussian noise is added to their mean. It protects each site's participation as a
whole, all its records together; it trusts the server, which sees the updates before
noise is added.</li>
<li>Every release is charged to the site's ledger before training starts; epsilon here is
recomputed from the stored (noise multiplier, sample rate, steps) history.</li>
</ul>
"""


def plot(result: Audit) -> bytes:
    """Epsilon against release (round), one line per site, budgets dashed. PNG bytes."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, site in enumerate(result.sites):
        color = f"C{i % 10}"
        ax.plot(range(1, len(site.curve) + 1), site.curve, marker="o", markersize=3,
                color=color, label=site.client)
        if site.budget_epsilon:
            ax.axhline(site.budget_epsilon, color=color, linestyle="--", linewidth=0.8)
    ax.set_xlabel("round (release)")
    ax.set_ylabel("epsilon spent")
    ax.set_title("Record-level privacy spend per site (dashed: budget)")
    ax.grid(alpha=0.3)
    if len(result.sites) <= 12:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return png_bytes(fig)


def render_html(result: Audit | None, empirical: dict[str, Any] | None = None) -> str:
    """The report: spend per site (``result``, None for a run without ledgers) and the
    empirical audit's section with its canaries' loss distributions (``empirical``)."""
    spend = source = config = ""
    if result is not None:
        image = base64.b64encode(plot(result)).decode()
        spend = (f"<h2>Spend per site</h2><pre>{html.escape(table(result))}</pre>"
                 f'<img alt="epsilon per round per site" src="data:image/png;base64,{image}">')
        source = f"Source: <code>{html.escape(str(result.source))}</code>; "
        config = (f"<h2>Run configuration</h2><pre>{html.escape(result.run_config)}</pre>"
                  if result.run_config else "")
    tested = "" if empirical is None else html_section(empirical)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedrnn privacy audit</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
pre{{background:#f5f5f5;padding:1em;overflow-x:auto;font-size:12px}}</style></head>
<body><h1>fedrnn privacy audit</h1>
<p>{source}generated {datetime.now(UTC).isoformat(timespec="seconds")}.</p>
<h2>Mechanisms and what they protect</h2>{MECHANISMS}
{spend}
{tested}
{config}
</body></html>
"""
