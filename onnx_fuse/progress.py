"""Progress on a terminal: one status line that says which phase the command is in (load, match,
verify, check, save) and how far it got, for models large enough to take a while.

The steps report through `phase(...)` and `model_size(...)`, which do nothing unless a command
installed a display with `shown(...)`: the Python API and a command whose stderr is not a terminal
stay silent. The display is per context (a ContextVar), so nothing leaks between concurrent
callers, and it is throttled so that reporting costs nothing measurable.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time

# Models with at most this many nodes finish before a progress line would help.
MIN_NODES = 300
PHASES = ("load", "match", "verify", "check", "save")
_INTERVAL = 0.1  # seconds between two redraws of the same phase

_display: contextvars.ContextVar[_Display | None] = contextvars.ContextVar("onnx_fuse_progress",
                                                                           default=None)


def phase(name: str, detail: str = "") -> None:
    """The command entered (or advanced within) phase `name`; `detail` says how far."""
    display = _display.get()
    if display is not None:
        display.show(name, detail)


def model_size(nodes: int) -> None:
    """The model being processed has `nodes` nodes: from here on the line is shown if that is
    more than MIN_NODES."""
    display = _display.get()
    if display is not None:
        display.enabled = nodes > MIN_NODES
        display.show(display.current, f"{nodes} nodes")


@contextlib.contextmanager
def shown(fd: int | None, quiet: bool = False):
    """Show progress on file descriptor `fd` while the block runs, if it is a terminal and not
    `quiet`; the line is erased at the end, so what the command prints after stays clean."""
    if quiet or fd is None or not _isatty(fd):
        yield
        return
    display = _Display(fd)
    token = _display.set(display)
    try:
        yield
    finally:
        _display.reset(token)
        display.clear()


class _Display:
    def __init__(self, fd: int):
        self.fd = fd
        self.enabled = False  # until the model's size is known
        self.current = "load"
        self.drawn = ""
        self.last_draw = 0.0

    def show(self, name: str, detail: str) -> None:
        now = time.monotonic()
        changed = name != self.current
        self.current = name
        if not self.enabled or (not changed and now - self.last_draw < _INTERVAL):
            return
        step = PHASES.index(name) + 1 if name in PHASES else 0
        width = _width(self.fd)
        line = (f"onnx-fuse: [{step}/{len(PHASES)}] {name}" + (f": {detail}" if detail else ""))[:width]
        self._write("\r" + line.ljust(min(len(self.drawn), width)))  # blanks over a longer line
        self.drawn, self.last_draw = line, now

    def clear(self) -> None:
        if self.drawn:
            self._write("\r" + " " * len(self.drawn) + "\r")
            self.drawn = ""

    def _write(self, text: str) -> None:
        try:
            os.write(self.fd, text.encode("utf-8", "replace"))
        except OSError:
            self.enabled = False  # the terminal went away: the work goes on without it


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _width(fd: int) -> int:
    """Characters the line may take (one less than the terminal's columns, so it never wraps)."""
    try:
        columns = os.get_terminal_size(fd).columns
    except OSError:
        columns = 0
    return max(20, columns - 1) if columns else 79  # 0: a terminal that does not say
