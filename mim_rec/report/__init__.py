"""The ``mim experiment`` report: the paper's tables, figures and claims from one results dict.

:func:`write_report` renders REPORT.md and the PNG figures (:mod:`.experiment`, :mod:`.plots`);
:func:`paper_claims` checks the paper's claims against the same numbers (:mod:`.claims`); the
seed aggregation both share is in :mod:`.stats`.
"""

from mim_rec.report.claims import paper_claims
from mim_rec.report.experiment import write_report

__all__ = ["paper_claims", "write_report"]
