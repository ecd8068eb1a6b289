"""Commands to devices from the top master: which gateways serve the devices, and one job each.

``salt-run tributary.command site=brisbane device='boiler-*' command=setpoint payload=70``:

1. resolve: ``grains.get tributary:devices`` on the compound target
   ``G@tributary:devices:<device glob>`` (``and G@site:<site>`` when given), through the syndics;
   each answering gateway's devices are filtered with the glob (the grain lists sensors and
   command devices);
2. send: for each matching device, ``tributary.command`` on exactly the gateways that serve it
   (``G@tributary:devices:<device>`` and the site), so a gateway gets only its own devices;
3. answer: per gateway, per device, the command's outcome (``acked``, ``refused_by_device``,
   ``refused``, ``timeout``, ``test``, ``error``, or ``no_return`` when a gateway that was
   resolved did not answer).

The Salt client is passed in (``cmd(tgt, fun, arg, kwarg, tgt_type, timeout, expect) ->
{id: ret}``, returning early once every id in ``expect`` answered), so this logic is tested
without daemons; the runner gives it ``LocalClient.cmd_iter``. Behind a syndic the top master
does not know in advance which minions a grain target will reach (the syndic masters report
them once they publish), so the resolution ends ``resolve_settle`` after the last answer or
once those reported have answered, at most ``resolve_timeout`` (a gateway silent that long is
not sent the command), and each command job waits only until the gateways resolved for it
have answered (at most ``job_timeout``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from typing import Any

#: A device glob or site name usable inside a compound target (no spaces, no compound syntax).
GLOB_RE = re.compile(r"[A-Za-z0-9_.:@*?\[\]-]{1,128}")

Cmd = Callable[..., Mapping[str, Any]]


def target(device: str, site: str | None = None) -> str:
    """The compound target of the gateways serving ``device`` (a glob), in ``site``."""
    tgt = f"G@tributary:devices:{device}"
    return f"{tgt} and G@site:{site}" if site else tgt


def check_args(device: Any, command: Any, site: Any) -> str | None:
    for what, value in (("device", device), ("command", command), ("site", site)):
        if what == "site" and value is None:
            continue
        if not isinstance(value, str) or not GLOB_RE.fullmatch(value):
            return f"{what} {value!r} is not a name or glob ([A-Za-z0-9_.:@-] and * ? [ ])"
    if not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,128}", str(command)):
        return f"command {command!r} is not a name"
    return None


def resolve(grains: Mapping[str, Any], device: str) -> dict[str, list[str]]:
    """``{gateway: [its devices matching the glob]}`` from ``grains.get tributary:devices``
    answers (a gateway whose answer is not a list, or has no match, is left out)."""
    out: dict[str, list[str]] = {}
    for gw, devices in sorted(grains.items()):
        if isinstance(devices, list):
            hits = sorted({str(d) for d in devices if fnmatch.fnmatchcase(str(d), device)})
            if hits:
                out[gw] = hits
    return out


def summarise(ret: Any) -> dict[str, Any]:
    """The part of a gateway's ``tributary.command`` answer the runner shows."""
    if not isinstance(ret, Mapping):
        return {"outcome": "error", "reason": f"the gateway answered {str(ret)[:300]!r}"}
    keep = (
        "outcome",
        "reason",
        "rule",
        "answer",
        "latency_ms",
        "id",
        "correlation_id",
        "topic",
        "message",
        "audit",
    )
    return {k: ret[k] for k in keep if k in ret}


def send(
    cmd: Cmd,
    device: str,
    command: str,
    payload: Any = None,
    site: str | None = None,
    timeout: float | None = None,
    test: bool = False,
    job_timeout: float = 30.0,
    resolve_timeout: float = 10.0,
) -> dict[str, Any]:
    """Resolve the gateways serving devices matching ``device`` and send them the command (see
    the module docstring). ``result`` is True when every device acknowledged (or, with
    ``test``, every one would be sent the command)."""
    bad = check_args(device, command, site)
    if bad:
        return {"result": False, "error": bad}
    tgt = target(device, site)
    found = cmd(tgt, "grains.get", ["tributary:devices"], {}, "compound", resolve_timeout, None)
    served = resolve(found or {}, device)
    where = f" in site {site}" if site else ""
    if not served:
        return {
            "result": False,
            "target": tgt,
            "error": f"no gateway{where} serves a device matching {device!r}",
            "gateways": {},
        }
    by_device: dict[str, list[str]] = {}
    for gw, devices in served.items():
        for d in devices:
            by_device.setdefault(d, []).append(gw)
    kwarg: dict[str, Any] = {}
    if payload is not None:
        kwarg["payload"] = payload
    if timeout is not None:
        kwarg["timeout"] = timeout
    if test:
        kwarg["test"] = True
    out: dict[str, dict[str, Any]] = {gw: {} for gw in served}
    for d, gws in sorted(by_device.items()):
        rets = cmd(
            target(d, site),
            "tributary.command",
            [d, command],
            kwarg,
            "compound",
            job_timeout,
            set(gws),
        )
        rets = rets or {}
        for gw in gws:
            if gw in rets:
                out[gw][d] = summarise(rets[gw])
            else:
                out[gw][d] = {
                    "outcome": "no_return",
                    "reason": f"no answer within {job_timeout:g} s",
                }
        for gw, ret in rets.items():  # a gateway that was not resolved (grain changed since)
            if gw not in gws:
                out.setdefault(gw, {})[d] = summarise(ret)
    outcomes = [r.get("outcome") for per in out.values() for r in per.values()]
    want = "test" if test else "acked"
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[str(o)] = counts.get(str(o), 0) + 1
    return {
        "result": bool(outcomes) and all(o == want for o in outcomes),
        "target": tgt,
        "devices": sorted(by_device),
        "gateways": out,
        "outcomes": counts,
    }
