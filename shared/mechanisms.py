"""Where a run's differential privacy comes from: one object per DP level.

``RunConfig.mechanism`` resolves ``dp`` and ``dp-level`` once into one of these, and code
asks it instead of comparing level names:

- ``NO_DP`` (``--no-dp``): a non-private baseline; sites train on plain SGD;
- ``RECORD_LEVEL`` (``dp-level record``): DP-SGD at every site, each release charged to
  the site's ledger; a run's epsilon is the largest any site has spent;
- ``USER_LEVEL`` (``dp-level user``): the server clips every site's whole update and noises
  the mean (DP-FedAvg); sites train without DP, so no record-level epsilon holds;
- ``RECORD_AND_USER_LEVEL`` (``dp-level both``): both of the above.

The accounting mathematics is ``shared.privacy``'s; this module only says which mechanisms
run where.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DPMechanism:
    level: str  # what a run's summary reports as its privacy "level"
    sites_run_dpsgd: bool  # record-level: every site's update is DP-SGD, charged to its ledger
    server_clips_and_noises: bool  # user-level: DP-FedAvg on the server

    @property
    def private(self) -> bool:
        return self.sites_run_dpsgd or self.server_clips_and_noises

    def describe(self) -> str:
        """``no DP`` or ``dp-level LEVEL``, as messages name it."""
        return f"dp-level {self.level}" if self.private else "no DP"


NO_DP = DPMechanism("none", sites_run_dpsgd=False, server_clips_and_noises=False)
RECORD_LEVEL = DPMechanism("record", sites_run_dpsgd=True, server_clips_and_noises=False)
USER_LEVEL = DPMechanism("user", sites_run_dpsgd=False, server_clips_and_noises=True)
RECORD_AND_USER_LEVEL = DPMechanism("both", sites_run_dpsgd=True, server_clips_and_noises=True)

# dp-level's choices and the mechanism each asks for when DP is on
LEVELS = {m.level: m for m in (RECORD_LEVEL, USER_LEVEL, RECORD_AND_USER_LEVEL)}
DP_LEVELS = tuple(LEVELS)


def mechanism_of(*, dp: bool, dp_level: str) -> DPMechanism:
    """The mechanism of a run's ``dp`` and ``dp-level`` settings (``dp`` false: ``NO_DP``,
    whatever the level)."""
    if not dp:
        return NO_DP
    try:
        return LEVELS[dp_level]
    except KeyError:
        raise ValueError(f"dp-level must be one of {', '.join(DP_LEVELS)}, "
                         f"not {dp_level!r}") from None
