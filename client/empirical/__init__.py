"""The empirical privacy audit (``fedrnn audit RUN --empirical``): what the trained model
shows of the canaries an audited simulation planted (``shared.data.canaries``).

Each kind of test is a section, ``(run_dir) -> dict | None``, registered in
``sections.SECTIONS``: ``one_run`` (record-level, Steinke et al. 2023), ``exposure``
(secrets, Carlini et al. 2019) and ``user_level`` (canary clients, Andrew et al.
2023). A new test is one more entry there.
"""

from fedrnn.client.empirical.sections import SECTIONS, empirical, register_section

__all__ = ["SECTIONS", "empirical", "register_section"]
