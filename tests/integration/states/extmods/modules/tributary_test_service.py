"""Test-only service provider: sysvinit scripts on a Debian host whose PID 1 is not systemd.

Salt's systemd_service reports "offline" when systemctl exists but systemd is not running,
and service.running then passes without starting anything. The test minion selects this
module with ``providers: {service: tributary_test_service}`` so the init scripts really run.
Never shipped in the product (it lives under tests/).
"""

from __future__ import annotations

import glob
import os
import subprocess

__virtualname__ = "service"


def __virtual__():
    return __virtualname__


def _script(name: str) -> str:
    return f"/etc/init.d/{name}"


def _run(*args: str) -> bool:
    return subprocess.run(args, capture_output=True, timeout=120, check=False).returncode == 0


def offline() -> bool:
    return False


def available(name: str) -> bool:
    return os.access(_script(name), os.X_OK)


def missing(name: str) -> bool:
    return not available(name)


def get_all() -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob("/etc/init.d/*"))


def status(name: str, sig: str | None = None, **kwargs) -> bool:
    if sig:
        return _run("pgrep", "-f", sig)
    return _run(_script(name), "status")


def start(name: str, **kwargs) -> bool:
    return _run(_script(name), "start")


def stop(name: str, **kwargs) -> bool:
    return _run(_script(name), "stop")


def restart(name: str, **kwargs) -> bool:
    return _run(_script(name), "restart")


def reload(name: str, **kwargs) -> bool:
    return _run(_script(name), "reload")


def force_reload(name: str, **kwargs) -> bool:
    return _run(_script(name), "force-reload")


def enabled(name: str, **kwargs) -> bool:
    return bool(glob.glob(f"/etc/rc[2345].d/S[0-9][0-9]{name}"))


def disabled(name: str, **kwargs) -> bool:
    return not enabled(name)


def enable(name: str, **kwargs) -> bool:
    return _run("update-rc.d", name, "defaults") and _run("update-rc.d", name, "enable")


def disable(name: str, **kwargs) -> bool:
    return _run("update-rc.d", name, "disable")
