"""What `sceneref generate` shows while it runs (live progress), from the runner's progress events.

On a terminal, a live board redrawn in place (rich): one row per scene with its enhancement
iterations and prompt scores, the variations received, their scores and the selection, under
the current step. Elsewhere (a pipe, a log file, CI) one plain line per event, which stays
readable in a file and greppable. `--json` and `--quiet` show nothing: stdout then holds only
the result.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import TextIO

from pipeline.runner import ProgressEvent


class PlainLines:
    """One line per event: `[ 42%] stage: message`."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def __call__(self, event: ProgressEvent) -> None:
        print(f"[{event.progress:3d}%] {event.stage}: {event.message}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


@dataclass
class SceneRow:
    number: int
    duration: int | None = None
    iterations: list[str] = field(default_factory=list)
    prompt_score: float | None = None
    expected: int | None = None
    received: int = 0
    failed: int = 0
    scores: dict[int, float | None] = field(default_factory=dict)
    selected: str = ""
    state: str = "waiting"


class Board:
    """The per-scene state the live display draws, updated from events (no terminal here, so
    it is tested on its own)."""

    def __init__(self) -> None:
        self.scenes: dict[int, SceneRow] = {}
        self.progress = 0
        self.message = "starting"

    def row(self, number: int) -> SceneRow:
        return self.scenes.setdefault(number, SceneRow(number))

    def apply(self, event: ProgressEvent) -> None:
        self.progress, self.message = event.progress, event.message
        data = event.data or {}
        if event.kind == "planned":
            for scene in data.get("scenes", []):
                self.row(scene["scene_number"]).duration = scene.get("duration")
        if event.scene is None:
            return
        row = self.row(event.scene)
        if event.kind == "iteration":
            overall = data.get("overall")
            row.iterations.append("x" if data.get("error") else (f"{overall:.0f}" if overall is not None else "?"))
            row.state = "enhancing"
        elif event.kind == "enhanced":
            row.prompt_score, row.state = data.get("score"), "enhanced"
        elif event.kind == "generating":
            row.expected, row.state = data.get("variations"), "generating"
        elif event.kind == "variation":
            if data.get("ok"):
                row.received += 1
            else:
                row.failed += 1
        elif event.kind == "scoring":
            row.state = "scoring"
        elif event.kind == "scored":
            row.scores = {v["variation"]: v.get("overall") for v in data.get("variations", [])}
        elif event.kind == "selected":
            if data.get("user_provided"):
                row.selected = "your image"
            else:
                overall = data.get("overall")
                below = " (below threshold)" if data.get("below_threshold") else ""
                row.selected = f"#{data.get('variation')} {overall:.1f}{below}" if overall is not None else "-"
            row.state = "done"


class LiveBoard:
    """The board, redrawn in place on a terminal.

    Log records (a quality warning, a retry) written straight to the terminal would land inside
    the board and leave stale copies of it on screen: while it is live, logging handlers that
    write to this stream write through rich's stderr proxy instead, which prints above it."""

    def __init__(self, stream: TextIO):
        from rich.console import Console
        from rich.live import Live

        self.board = Board()
        self.console = Console(file=stream, highlight=False)
        self.live = Live(self._render(), console=self.console, auto_refresh=False, transient=False)
        self.handlers = [
            h for h in logging.getLogger().handlers
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is stream
        ]
        self.live.start()
        if sys.stderr is not stream:  # rich redirected it: the proxy prints above the board
            for handler in self.handlers:
                handler.setStream(sys.stderr)

    def __call__(self, event: ProgressEvent) -> None:
        self.board.apply(event)
        self.live.update(self._render(), refresh=True)

    def close(self) -> None:
        self.live.stop()
        for handler in self.handlers:
            handler.setStream(self.console.file)

    def _render(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(expand=False, header_style="bold")
        for title in ("scene", "prompt iterations", "score", "variations", "variation scores", "selected"):
            table.add_column(title)
        for n in sorted(self.board.scenes):
            row = self.board.scenes[n]
            variations = f"{row.received}/{row.expected}" if row.expected else "-"
            if row.failed:
                variations += f" ({row.failed} failed)"
            scores = "  ".join(f"#{k} {v:.1f}" if v is not None else f"#{k} -" for k, v in sorted(row.scores.items()))
            table.add_row(
                f"{n}" + (f" ({row.duration} s)" if row.duration else ""),
                " > ".join(row.iterations) or row.state,
                f"{row.prompt_score:.1f}" if row.prompt_score is not None else "",
                variations,
                scores,
                row.selected,
            )
        head = Text(f"[{self.board.progress:3d}%] {self.board.message}")
        return Group(head, table)


def make_display(stream: TextIO, *, silent: bool):
    """None when nothing is to be shown; the live board on a terminal; plain lines elsewhere."""
    if silent:
        return None
    isatty = getattr(stream, "isatty", None)
    return LiveBoard(stream) if isatty is not None and isatty() else PlainLines(stream)
