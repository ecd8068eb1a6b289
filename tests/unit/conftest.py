"""Unit-test fixtures shared by the relay and heartbeat tests: real RSA key pairs for two
gateways and a syndic, and a master pki_dir that has accepted the syndic's key."""

from __future__ import annotations

import pytest

from tests.unit.protocol.test_signing import _keypair


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    base = tmp_path_factory.mktemp("pki")
    return {name: _keypair(base, name) for name in ("gw-a", "gw-b", "syndic-1", "syndic-2")}


@pytest.fixture
def master_pki(tmp_path, keys):
    pki = tmp_path / "master-pki"
    (pki / "minions").mkdir(parents=True)
    for syndic in ("syndic-1", "syndic-2"):  # syndic-2: accepted, but not a trusted syndic
        (pki / "minions" / syndic).write_text(keys[syndic][1])
    return str(pki)
