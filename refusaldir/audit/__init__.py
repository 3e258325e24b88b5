"""The one-command refusal audit: extract, select, evaluate, guard and concentration on one
model, written as a self-contained ``report.html`` and the ``report.json`` behind it.

Example:
    >>> from refusaldir.audit import AuditConfig
    >>> AuditConfig(limit=16).kl_threshold
    0.1
    >>> rep = audit(load_model("demo"), "runs/demo/audit", limit=16)  # doctest: +SKIP
    >>> print(rep.headline())  # doctest: +SKIP
"""

from refusaldir.audit.concentration import concentration_curve
from refusaldir.audit.config import REPORT_HTML, REPORT_JSON, AuditConfig
from refusaldir.audit.figures import make_figures
from refusaldir.audit.html import render_html
from refusaldir.audit.pipeline import AuditReport, audit

__all__ = [
    "REPORT_HTML", "REPORT_JSON", "AuditConfig", "AuditReport", "audit", "concentration_curve",
    "make_figures", "render_html",
]
