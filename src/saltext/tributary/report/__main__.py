"""``python -m saltext.tributary.report OUT``: render a pickled
:class:`~saltext.tributary.report.model.Report` read from stdin to ``OUT`` (and the PNGs
beside it) and print :func:`~saltext.tributary.report.write`'s answer as JSON.

The runner renders this way, in a Python process of its own (see
:func:`~saltext.tributary.report.write_isolated`)."""

from __future__ import annotations

import json
import pickle
import sys

from saltext.tributary.report import model, write


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m saltext.tributary.report OUT < report.pickle", file=sys.stderr)
        return 2
    report = pickle.load(sys.stdin.buffer)
    if not isinstance(report, model.Report):
        print("stdin: not a pickled Report", file=sys.stderr)
        return 2
    print(json.dumps(write(report, argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
