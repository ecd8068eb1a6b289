"""Root of the test suite: what every tier needs. The daemons and their fixtures live in
``tests/integration/conftest.py``, so unit and functional runs never import them."""

from __future__ import annotations

import logging
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent

os.environ.setdefault("TRIBUTARY_REPO", str(REPO))


def pytest_unconfigure(config):
    """Drop Salt's deferred console handler: it buffers every record forwarded by the daemons
    and dumps them at exit onto pytest's already-closed capture stream."""
    try:
        from salt._logging.handlers import DeferredStreamHandler
    except ImportError:
        return
    for handler in list(logging.root.handlers):
        if isinstance(handler, DeferredStreamHandler):
            logging.root.removeHandler(handler)
            handler._DeferredStreamHandler__messages.clear()  # type: ignore[attr-defined]
