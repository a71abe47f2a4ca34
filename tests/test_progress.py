"""Progress bars and log lines share the terminal without tearing each other."""
from __future__ import annotations

import logging
import sys

from mtrank.pipeline.progress import Progress


def _run(enabled: bool, capsys) -> list[str]:
    handler = logging.StreamHandler(sys.stderr)   # what the CLI's logging.basicConfig installs
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        bar = Progress("train epoch 1/1", total=100, unit="samples", enabled=enabled)
        bar.update(10, ctr="0.5012")
        logging.getLogger("mtrank").info("checkpoint written")
        bar.update(90, ctr="0.4987")
        bar.close()
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    return capsys.readouterr().err.replace("\r", "\n").split("\n")


def test_a_log_line_printed_while_the_bar_runs_is_a_line_of_its_own(capsys):
    lines = _run(True, capsys)
    assert "checkpoint written" in lines, lines                       # whole, not glued to the bar
    assert any("ctr=0.5012" in ln and "samples" in ln for ln in lines)  # the bar itself was drawn
    assert lines.count("checkpoint written") == 1


def test_without_a_terminal_there_is_no_bar_only_log_lines(capsys):
    lines = _run(False, capsys)
    assert "checkpoint written" in lines
    assert not any("%|" in ln for ln in lines)
    assert any(ln.startswith("train epoch 1/1: 100/100 samples") for ln in lines), lines
