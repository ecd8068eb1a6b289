"""Tributary: IoT fleet telemetry through Salt to Elasticsearch.

Folders by tier: ``protocol`` (what gateways and relay agree on), ``gateway`` (beacons, spool,
sources, execution-module operations), ``relay`` (the top master's engine and runner),
``syndic`` (what a syndic master runs), ``util`` (SQLite and clock helpers shared by all).
"""

#: The loader modules under ``salt/`` (synced from the fileserver, separately from this
#: package) carry the version they were written for and refuse to load against another.
__version__ = "0.1.0"


def version_mismatch(module: str, expected: str) -> str | None:
    """The reason a loader module written for ``expected`` must not load, or None."""
    if expected == __version__:
        return None
    return (
        f"{module}: this module is for saltext.tributary {expected} but {__version__} is"
        " installed; sync the Salt modules and install the package from the same release"
    )


def loadable(virtualname: str, expected: str) -> str | tuple[bool, str]:
    """What a loader module's ``__virtual__`` returns once its imports worked: its name, or
    ``(False, reason)`` when it was written for another library version."""
    mismatch = version_mismatch(virtualname, expected)
    return (False, mismatch) if mismatch else virtualname
