"""Wall-clock helpers shared by both tiers."""

from __future__ import annotations

import time


def now_ms() -> int:
    return int(time.time() * 1000)
