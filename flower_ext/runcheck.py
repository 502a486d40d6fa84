"""``flower-ext verify``: kept for imports; the checks live in :mod:`flower_ext.audit.verify`.

A run's trail must tell one story (rounds in order, every started round closed,
each round starting from the model the previous one produced, resumes redoing
only abandoned rounds), be signed by the server key the banks received, be
complete, agree with the banks' receipts when given, and agree with the files
people read (``metrics.json``, ``checkpoint.npz``, ``report.html``).
"""

from __future__ import annotations

from .audit.verify import CLOSING_EVENTS, VerifyResult, audit_banner_html, verify_run

__all__ = ["CLOSING_EVENTS", "VerifyResult", "audit_banner_html", "verify_run"]
