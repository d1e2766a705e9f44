"""Names of the quantile layers and columns every posterior and effect query writes (``q05``, ``q97.5``)."""

from __future__ import annotations


def quantile_label(q: float) -> str:
    """``q05`` for 0.05, ``q97.5`` for 0.975: whole percents with two digits, others as they are."""
    percent = 100.0 * q
    return f"q{round(percent):02d}" if abs(percent - round(percent)) < 1e-9 else f"q{percent:g}"
