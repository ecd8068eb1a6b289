"""What ``salt-run tributary.alerts`` shows: firing, flapping and pending alerts by site, recent
transitions, active silences."""

from __future__ import annotations

from typing import Any

from saltext.tributary.reaction.alerts import AlertBook


def alerts_view(book: AlertBook, now_ms: int, site: str | None = None, recent: int = 20) -> dict:
    by_site: dict[str, dict[str, list[dict[str, Any]]]] = {}
    counts = {"firing": 0, "pending": 0, "flapping": 0}
    for a in book.load().values():
        if site and a.get("site") != site:
            continue
        entry = by_site.setdefault(str(a.get("site")), {"firing": [], "pending": []})
        entry.setdefault(a["state"], []).append(
            {k: a.get(k) for k in ("rule", "severity", "gateway", "sensor", "metric", "value")}
            | {"for_s": round((now_ms - int(a.get("since") or now_ms)) / 1000, 1)}
        )
        counts[a["state"]] = counts.get(a["state"], 0) + 1
    history = [h for h in book.history(500) if not site or h.get("site") == site][:recent]
    return {
        "result": True,
        **counts,
        "sites": dict(sorted(by_site.items())),
        "recent": history,
        "silences": book.silences(now_ms),
    }
