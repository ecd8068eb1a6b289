"""Per-gateway bandwidth budget: aggregate instead of dropping when the link is too slow.

Configured in a beacon's ``bandwidth`` mapping::

    bandwidth:
      bytes_per_s: 40        # the budget for batch events (msgpack bytes of event data)
      window_s: 60           # aggregation window when the budget is exceeded
      burst_s: 60            # the bucket holds at most bytes_per_s * burst_s
      max_window_s: 3600     # windows double up to this while an aggregate is still too big

A token bucket fills at ``bytes_per_s``. A run emits the next raw batch when the bucket holds
its size; otherwise (backlog or too little credit) it aggregates the unsent readings per sensor
and window (:func:`saltext.tributary.protocol.wire.encode_agg_batch`) and emits that batch once the
bucket has any credit, borrowing the rest (the bucket goes negative and must refill before the
next emission, so the long-run rate stays at the budget). Nothing is dropped here; the spool's
retention budget still applies while the backlog waits.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from saltext.tributary.gateway.spool import GatewaySpool
from saltext.tributary.protocol.wire import encode_agg_batch, packed_size
from saltext.tributary.util import schema
from saltext.tributary.util.schema import option


@dataclass(frozen=True)
class BandwidthOptions:
    """The ``bandwidth`` block (see above); ``bytes_per_s`` is required."""

    bytes_per_s: float | None = option(None, positive=True, doc="the budget for batch events")
    window_s: float = option(60.0, positive=True, doc="aggregation window over budget")
    burst_s: float | None = option(None, positive=True, doc="bucket size (default: window_s)")
    max_window_s: float = option(3600.0, positive=True, doc="widest aggregation window")


def parse_bandwidth(bw: Any) -> tuple[BandwidthOptions | None, list[str]]:
    """The ``bandwidth`` block, or every problem with its key path."""
    opts, errors = schema.parse(BandwidthOptions, bw, "bandwidth")
    if isinstance(bw, Mapping) and bw.get("bytes_per_s") is None:
        return None, ["bandwidth.bytes_per_s: required", *errors]
    return opts, errors


@dataclass
class Budget:
    bytes_per_s: float
    window_s: float = 60.0
    burst_s: float = 60.0
    max_window_s: float = 3600.0
    tokens: float = 0.0
    last: float | None = None
    clock: Any = field(default=time.monotonic, repr=False)

    @classmethod
    def from_config(cls, bw: Mapping[str, Any]) -> Budget:
        """A full bucket from a valid ``bandwidth`` block (ValueError naming the keys else)."""
        opts, errors = parse_bandwidth(bw)
        if opts is None or opts.bytes_per_s is None:
            raise ValueError("; ".join(errors))
        b = cls(
            bytes_per_s=opts.bytes_per_s,
            window_s=opts.window_s,
            burst_s=opts.burst_s or opts.window_s,
            max_window_s=opts.max_window_s,
        )
        b.tokens = b.bytes_per_s * b.burst_s
        return b

    def refill(self) -> None:
        now = self.clock()
        if self.last is not None:
            cap = self.bytes_per_s * self.burst_s
            self.tokens = min(cap, self.tokens + (now - self.last) * self.bytes_per_s)
        self.last = now

    def emit(
        self,
        spool: GatewaySpool,
        *,
        max_batch_bytes: int = 32_768,
        max_rows: int = 8_000,
        site: str | None = None,
    ) -> list[dict[str, Any]]:
        """At most one batch (raw if affordable, else aggregated); moves the spool cursor."""
        self.refill()
        if self.tokens <= 0:
            return []
        rows, dropped = spool.peek_unsent(max_rows)
        if not rows:
            return []
        got = spool._batch_within(rows, max_batch_bytes, site=site, dropped=dropped)
        if got is not None and got[1] <= self.tokens and got[0]["last"] == rows[-1].seq:
            batch, size = got
            spool.mark_emitted(batch, len(batch["r"]))
            self.tokens -= size
            return [batch]
        window = self.window_s
        while True:
            agg = encode_agg_batch(spool.epoch, rows, window, dropped=dropped, site=site)
            size = packed_size(agg)
            if size <= max_batch_bytes or window >= self.max_window_s:
                break
            window = min(self.max_window_s, window * 2)
        while size > max_batch_bytes and len(rows) > 1:
            rows = rows[: len(rows) // 2]
            agg = encode_agg_batch(spool.epoch, rows, window, dropped=dropped, site=site)
            size = packed_size(agg)
        spool.mark_emitted(agg, len(rows))
        self.tokens -= size
        return [agg]
