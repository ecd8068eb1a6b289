"""Package-mode Mosquitto with a TLS listener, bridged over TLS with credentials to an upstream
broker that refuses anonymous clients; the bridge's first address is dead (failover)."""

from __future__ import annotations

import pathlib
import shutil
import signal
import subprocess
import tempfile

import pytest

from tests.integration.states.conftest import Sub, apply, assert_all_ok, pub, wait_for
from tests.support.es import free_port
from tests.support.tlspki import make_pki

UP_USERS = {"gw-tls": "bridge-secret", "watcher": "watch-secret"}


@pytest.fixture(scope="module")
def pki():
    d = pathlib.Path(tempfile.mkdtemp(prefix="trib-pki-"))
    d.chmod(0o755)
    yield make_pki(d) | {"dir": str(d)}
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_upstream(pki):
    """An upstream broker with only a TLS listener and password authentication."""
    d = pathlib.Path(pki["dir"])
    port = free_port()
    passwd = d / "up-passwd"
    passwd.write_text("".join(f"{u}:{p}\n" for u, p in UP_USERS.items()))
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True)
    conf = d / "up.conf"
    conf.write_text(
        "\n".join(
            [
                "per_listener_settings false",
                "allow_anonymous false",
                f"password_file {passwd}",
                "user root",
                f"listener {port} 127.0.0.1",
                f"cafile {pki['ca']}",
                f"certfile {pki['cert']}",
                f"keyfile {pki['key']}",
                "",
            ]
        )
    )
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    yield port
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)


@pytest.fixture(scope="module", autouse=True)
def cleanup(states_minion, pillar_root):
    yield
    assert_all_ok(apply(states_minion, "mosquitto.clean"))


def up_state(port: int, ca: str) -> str:
    out = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "--cafile", ca,
         "-u", "watcher", "-P", UP_USERS["watcher"],
         "-t", "$SYS/broker/connection/gw-tls/state", "-C", "1", "-W", "2"],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    return out.stdout.strip()


def test_tls_listener_and_tls_bridge_with_credentials_and_failover(
    states_minion, pillar, pki, tls_upstream
):
    plain, tls_port, dead = free_port(), free_port(), free_port()
    pillar.set(
        {
            "mosquitto": {
                "init_delay": 1,
                "allow_anonymous": True,
                "listeners": [
                    {"port": plain, "address": "127.0.0.1"},
                    {
                        "port": tls_port,
                        "address": "127.0.0.1",
                        "tls": {"certfile": pki["cert"], "keyfile": pki["key"]},
                    },
                ],
                "bridges": {
                    "upstream": {
                        "addresses": [f"127.0.0.1:{dead}", f"127.0.0.1:{tls_upstream}"],
                        "remote_clientid": "gw-tls",
                        "remote_username": "gw-tls",
                        "remote_password": UP_USERS["gw-tls"],
                        "restart_timeout": [1, 2],
                        "tls": {"cafile": pki["ca"]},
                        "topics": [{"topic": "sensors/#", "remote_prefix": "tls/"}],
                    }
                },
            }
        }
    )
    assert_all_ok(apply(states_minion, "mosquitto"))
    wait_for(lambda: up_state(tls_upstream, pki["ca"]) == "1", 60, "the TLS bridge")

    # the TLS listener serves TLS clients (and not plain ones)
    tls_pub = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(tls_port), "--cafile", pki["ca"],
         "-t", "sensors/tls/t", "-m", "via-tls", "-q", "1"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert tls_pub.returncode == 0, tls_pub.stderr
    assert pub(tls_port, "sensors/plain/t", "x").returncode != 0

    up = Sub(
        tls_upstream,
        ["tls/sensors/#"],
        user="watcher",
        password=UP_USERS["watcher"],
        cafile=pki["ca"],
    ).wait_subscribed()
    try:
        assert pub(plain, "sensors/t1/temperature", "22").returncode == 0
        assert up.wait(1) == [("tls/sensors/t1/temperature", "22")]
    finally:
        up.stop()
