"""salt-factories' ``pytest`` engine for the benches: start and auth events only.

salt-factories adds its ``pytest`` engine to every daemon it configures; the engine forwards
*every* event on the daemon's bus over TCP to the starting process's ``EventListener``, which
decodes and stores them. salt-factories needs only the start events from it (a master's
``salt/master/<id>/start``, a syndic's ``salt/syndic/<id>/start`` seen on its top master) to
confirm a daemon started, and ``salt/auth`` to accept a pending key (a syndic's on its top
master). Under a fleet's load that forwarding is work no real deployment
does: a re-encode and a TCP send per event in every master, and the decoding of all of them in
the bench process (the generator's CPU). This engine, put first in ``engines_dirs`` by
``bench/fleet.py`` in place of salt-factories' own, is the same engine forwarding only
those; it still subscribes to the bus (one more listener unpacking each event).
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

from saltfactories.utils.saltext.engines import pytest_engine as _base

__virtualname__ = "pytest"
#: what salt-factories acts on: start events, and ``salt/auth`` (it accepts pending keys then)
START = re.compile(r"^(salt/(master|syndic|minion)/[^/]+/start|salt/auth)$")


class StartsOnly(deque):
    """The engine's forward queue, keeping start and auth events and the stop sentinel."""

    def append(self, item: Any) -> None:
        if item is None or START.match(str(item.get("tag", ""))):
            super().append(item)


def __virtual__() -> bool | tuple[bool, str]:
    role = __opts__.get("__role")
    if not role or "returner_address" not in __opts__.get(f"pytest-{role}", {}):
        return False, "not a salt-factories daemon"
    return True


def start() -> None:
    """Forward the start events to the salt-factories event listener."""
    engine = _base.PyTestEventForwardEngine(opts=__opts__)
    engine.queue = StartsOnly(maxlen=1000)
    engine.start()
