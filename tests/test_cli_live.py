"""What `sceneref generate` shows while it runs (pipeline/live.py): plain lines when stderr is
not a terminal (through the real CLI, offline), the per-scene board's state from events, and
the live board redrawn on a real pseudo-terminal."""

from __future__ import annotations

import logging
import os
import pty
import re
import select

from pipeline.cli import main
from pipeline.live import Board, LiveBoard, PlainLines, make_display
from pipeline.runner import ProgressEvent
from tests.test_cli import PROMPT, models_dir, run  # noqa: F401 (fixture)

EVENTS = [
    ProgressEvent("planning", 0, "planning the storyboard"),
    ProgressEvent("planning", 5, "storyboard has 2 scenes", kind="planned",
                  data={"scenes": [{"scene_number": 1, "duration": 5}, {"scene_number": 2, "duration": 4}]}),
    ProgressEvent("enhancing", 5, "scene 1 iteration 1: prompt score 71.0", 1, kind="iteration",
                  data={"iteration": 1, "overall": 71.0}),
    ProgressEvent("enhancing", 5, "scene 1 iteration 2: prompt score 88.5", 1, kind="iteration",
                  data={"iteration": 2, "overall": 88.5}),
    ProgressEvent("enhancing", 15, "scene 1 prompt enhanced", 1, kind="enhanced", data={"score": 88.5}),
    ProgressEvent("generating", 25, "scene 1: generating 2 variations", 1, data={"variations": 2}),
    ProgressEvent("generating", 25, "scene 1: variation 2 received", 1, kind="variation", data={"variation": 2, "ok": True}),
    ProgressEvent("generating", 25, "scene 1: variation 1 failed", 1, kind="variation", data={"variation": 1, "ok": False}),
    ProgressEvent("scoring", 25, "scene 1: scoring 1 variations", 1),
    ProgressEvent("scoring", 25, "scene 1: 1 variations scored", 1, kind="scored",
                  data={"variations": [{"variation": 1, "overall": None}, {"variation": 2, "overall": 61.04}]}),
    ProgressEvent("scene_completed", 62, "scene 1 of 2 selected", 1, kind="selected",
                  data={"variation": 2, "overall": 61.04, "below_threshold": False}),
]


def test_plain_lines_through_the_cli_show_every_choice(capsys, monkeypatch, models_dir, tmp_path):
    code, out, err = run(
        capsys, monkeypatch, models_dir, "--prompt", PROMPT, "--duration", "9", "--variations", "2",
        "--iterations", "2", "--output", str(tmp_path),
    )
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("[")]
    percents = [int(line[1:4]) for line in lines]
    assert percents == sorted(percents) and percents[-1] == 100
    text = "\n".join(lines)
    for scene in (1, 2, 3):
        assert re.search(rf"enhancing: scene {scene} iteration 1: prompt score \d+\.\d", text)
        assert f"generating: scene {scene}: variation 1 received" in text
        assert f"generating: scene {scene}: variation 2 received" in text
        assert f"scoring: scene {scene}: 2 variations scored" in text
        assert f"scene_completed: scene {scene} of 3 selected" in text
    assert "\x1b[" not in err  # no terminal: no escape codes
    assert out.startswith("generation ") and ": completed" in out.splitlines()[0]


def test_the_board_follows_the_events():
    board = Board()
    for event in EVENTS:
        board.apply(event)
    one, two = board.scenes[1], board.scenes[2]
    assert (one.duration, one.iterations, one.prompt_score) == (5, ["71", "88"], 88.5)
    assert (one.expected, one.received, one.failed) == (2, 1, 1)
    assert one.scores == {1: None, 2: 61.04} and one.selected == "#2 61.0" and one.state == "done"
    assert (two.duration, two.state, two.iterations) == (4, "waiting", [])
    assert (board.progress, board.message) == (62, "scene 1 of 2 selected")


def test_the_live_board_redraws_on_a_pseudo_terminal():
    master, slave = pty.openpty()
    os.set_blocking(master, False)
    terminal = os.fdopen(slave, "w", encoding="utf-8")
    chunks: list[bytes] = []

    def drain():
        while select.select([master], [], [], 0.05)[0]:
            try:
                chunks.append(os.read(master, 65536))
            except OSError:
                return

    display = make_display(terminal, silent=False)
    assert isinstance(display, LiveBoard)
    for event in EVENTS:
        display(event)
        drain()
    display.close()
    terminal.flush()
    drain()
    terminal.close()
    os.close(master)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert re.search(r"\x1b\[\d*A", screen)  # the cursor goes back up: redrawn in place, not appended
    assert "scene 1 of 2 selected" in screen and "#2 61.0" in screen and "71 > 88" in screen
    assert "1/2 (1 failed)" in screen


def test_silent_or_not_a_terminal(tmp_path):
    assert make_display(open(tmp_path / "log", "w"), silent=True) is None
    with open(tmp_path / "log", "w") as stream:
        plain = make_display(stream, silent=False)
        assert isinstance(plain, PlainLines)
        plain(EVENTS[2])
    assert (tmp_path / "log").read_text() == "[  5%] enhancing: scene 1 iteration 1: prompt score 71.0\n"


def test_log_records_print_above_the_live_board(monkeypatch):
    master, slave = pty.openpty()
    terminal = os.fdopen(slave, "w", encoding="utf-8")
    monkeypatch.setattr("sys.stderr", terminal)
    handler = logging.StreamHandler(terminal)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        display = make_display(terminal, silent=False)
        display(EVENTS[0])
        assert handler.stream is not terminal  # through rich's proxy while the board is live
        logging.getLogger("sceneref.runner").warning("scene 3: best quality score 6.30 is below the threshold")
        display(EVENTS[1])
        display.close()
        assert handler.stream is terminal
    finally:
        root.removeHandler(handler)
    terminal.flush()
    chunks = []
    while select.select([master], [], [], 0.05)[0]:
        chunks.append(os.read(master, 65536))
    terminal.close()
    os.close(master)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert screen.count("is below the threshold") == 1
