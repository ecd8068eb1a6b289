"""Errors that carry a reason: a short, countable slug (``not_numeric``, ``bad_signature``)
that counters, dead letters and logs use as is, and a human detail."""

from __future__ import annotations


class ReasonError(ValueError):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
