"""The empirical privacy audit (``fedrnn audit RUN --empirical``): what the trained model
shows of the canaries an audited simulation planted (``shared.data.canaries``).

Each kind of test is a section, ``(run_dir) -> dict | None``, registered in
``sections.SECTIONS``: ``one_run`` (record-level, Steinke et al. 2023) and ``exposure``
(secrets, Carlini et al. 2019). A new test is one more entry there.
"""

from fedrnn.client.empirical.sections import SECTIONS, empirical, register_section

__all__ = ["SECTIONS", "empirical", "register_section"]
