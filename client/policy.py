"""A deployed site's own privacy policy, and its check of what a server proposes.

The server's run config is a proposal. The site's budget, delta, accountant and
train/evaluation split are the site's alone (``fedrnn client`` flags, passed to the
ClientApp as node config); the server can ask for less privacy loss, never for more.
"""

from __future__ import annotations

OFFERED_ACCOUNTANTS = ("rdp", "prv")  # GDP's CLT approximation can under-count small runs
