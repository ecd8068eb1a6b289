"""The demo's progress printer (``tests/support/demo.py``): one line rewritten in place on a
terminal, plain lines otherwise. No daemons."""

from __future__ import annotations

import io

from tests.support.demo import Progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_terminal_rewrites_one_line_and_clears_it_for_a_lasting_line():
    out = _Stream(tty=True)
    p = Progress(out, width=80)
    assert p.tty
    p.update("  1s  published 10")
    p.update("  2s  published 200000")
    p.update("  3s  short")
    p.line("done")
    text = out.getvalue()
    assert "\n" not in text[: text.index("done")]  # progress never left its line
    frames = text[: text.index("done")].split("\r")
    assert frames[1:4] == [
        "  1s  published 10",
        "  2s  published 200000",
        # padded over the longer line before it, so none of it stays on screen
        "  3s  short".ljust(len("  2s  published 200000")),
    ]
    assert text.endswith("\r" + " " * len("  3s  short") + "\rdone\n")


def test_terminal_line_is_cut_to_the_width():
    out = _Stream(tty=True)
    Progress(out, width=20).update("x" * 50)
    assert out.getvalue() == "\r" + "x" * 19


def test_not_a_terminal_prints_plain_lines_and_throttles_only_when_asked():
    out = _Stream(tty=False)
    clock = _Clock()
    p = Progress(out, clock=clock)
    assert not p.tty
    p.update("  [   0s] starting Elasticsearch ...")
    p.update("  0s  published 0", every=10)  # the first throttled line is printed
    clock.now = 3
    p.update("  3s  published 300", every=10)  # within 10 s of it: skipped
    p.update("  [   3s] a step")  # no every: always printed
    clock.now = 12
    p.update("  12s  published 1200", every=10)
    p.line("done")
    assert "\r" not in out.getvalue()
    assert out.getvalue().splitlines() == [
        "[   0s] starting Elasticsearch ...",
        "0s  published 0",
        "[   3s] a step",
        "12s  published 1200",
        "done",
    ]


def test_tty_follows_the_stream_unless_told():
    assert Progress(_Stream(tty=True)).tty
    assert not Progress(_Stream(tty=False)).tty
    assert not Progress(_Stream(tty=True), tty=False).tty
