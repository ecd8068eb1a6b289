"""Tributary: IoT fleet telemetry through Salt to Elasticsearch.

One folder per part of the architecture (README "Development" has what lives where):
``util`` (SQLite, config schema and clock helpers shared by all), ``protocol`` (what gateways
and relay agree on), ``gateway`` (runs in the minion), ``relay`` (the top master's engine and
its runner's read model), ``syndic`` (what a syndic master runs), ``analysis``, ``reaction``,
``reactor``, ``report`` and ``control`` (the top master's anomaly detection and health, alert
rules, Salt reactor actions, fleet report and device commands), and ``consumers`` (analysis
and rules fed from the relay's tap).
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
