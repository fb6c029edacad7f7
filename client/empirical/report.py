"""The empirical audit as text (``fedrnn audit RUN --empirical``) and as an HTML section."""

from __future__ import annotations

import base64
import html
from typing import Any

from fedrnn.client.empirical.user_level import table as user_level_table
from fedrnn.shared.plots import png_bytes, pyplot


def _eps(value: Any) -> str:
    return value if isinstance(value, str) else f"{value:.3f}"


def table(emp: dict[str, Any]) -> str:
    """Fixed-width lines: the one-run bound beside the accounted epsilon, every guess
    plan tried, and the secrets' exposure."""
    lines = []
    if "epsilon_lower_bound" in emp:
        lines += [
            f"empirical audit (one run, Steinke et al. 2023) at site {emp['site']}: "
            f"{emp['canaries']} canaries, each trained on with probability 1/2",
            f"  epsilon lower bound {emp['epsilon_lower_bound']:.3f} at "
            f"{100 * emp['confidence']:.0f}% confidence (delta {emp['delta']:g}); "
            f"accounted epsilon {_eps(emp['epsilon_accounted'])}",
            f"  best plan: {emp['correct']} of {emp['guesses']} guesses correct "
            f"({emp['k_in']} guessed in, {emp['k_out']} out; score: {emp['score']})",
            f"  every (score, plan) pair tried, each at "
            f"{100 * emp['confidence_per_plan']:.3f}% (Bonferroni; {emp['releases']} "
            "release(s) of the canary site kept for the release score):",
            "    score    guessed in  guessed out  correct  bound",
        ]
        lines += [f"    {t['score']:<7}  {t['k_in']:>10}  {t['k_out']:>11}  {t['correct']:>7}  "
                  f"{t['epsilon_lower_bound']:.3f}" for t in emp["tried"]]
        if isinstance(emp["epsilon_accounted"], float) and \
                emp["epsilon_lower_bound"] > emp["epsilon_accounted"]:
            lines.append("  BOUND ABOVE THE ACCOUNTED EPSILON: the implementation leaks more "
                         "than its ledger charges")
    exposure = emp.get("exposure")
    if exposure:
        lines.append(f"secret exposure (Carlini et al. 2019): {len(exposure['secrets'])} "
                     f"secret(s) x {exposure['repeats']}, rank among "
                     f"{exposure['candidates_sampled']} sampled candidates of "
                     f"{exposure['space']:g}; largest exposure {exposure['max_exposure']:.2f} "
                     f"of {exposure['largest_possible']:.2f} bits")
        lines += [f"  {s['secret']!r}: exposure {s['exposure']:.2f}, rank {s['rank']:.0f}"
                  for s in exposure["secrets"]]
    if emp.get("user_level"):
        lines.append(user_level_table(emp["user_level"]))
    return "\n".join(lines)


def plot_losses(emp: dict[str, Any]) -> bytes:
    """Histograms of the included and the excluded canaries' losses. PNG bytes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    losses = emp["losses"]
    values = losses["included"] + losses["excluded"]
    bins = 40 if values else 1
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    for key, color in (("included", "C0"), ("excluded", "C1")):
        ax.hist(losses[key], bins=bins, range=(low, high), alpha=0.55, color=color,
                label=f"{key} ({len(losses[key])})")
    ax.set_xlabel("canary loss under the final model (lower: guessed in)")
    ax.set_ylabel("canaries")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def html_section(emp: dict[str, Any]) -> str:
    image = ""
    if "losses" in emp:
        data = base64.b64encode(plot_losses(emp)).decode()
        image = (f'<img alt="losses of included and excluded canaries" '
                 f'src="data:image/png;base64,{data}">')
    return (f"<h2>Empirical audit</h2><pre>{html.escape(table(emp))}</pre>{image}"
            "<p>The one-run bound is a lower bound: the training is not (epsilon, delta)-DP "
            "for any epsilon below it, at the stated confidence. It must stay below the "
            "accounted epsilon; a bound above it means the implementation releases more "
            "than its ledger charges.</p>")
