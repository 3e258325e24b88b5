"""Open an HTML report in headless Chromium and check what actually rendered.

``render(path)`` returns the DOM after scripts ran and every console message Chromium
logged; ``figure_status(dom)`` says, for every plotly figure ``<div>``, whether it contains a
rendered ``svg.main-svg``. ``screenshot(path, png)`` writes a PNG.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
    "--disable-extensions", "--mute-audio",
]
CONSOLE = re.compile(r":CONSOLE[(:]\d*\)?\]?\s*(.*)")


@dataclass
class Rendered:
    dom: str
    console: list[str]
    stderr: str


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        return subprocess.run(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )


def render(path: Path, *, budget_ms: int = 15000, timeout: float = 180) -> Rendered:
    """Load ``path`` and dump the DOM once scripts settled (virtual time budget)."""
    proc = _run(["--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}",
                 "--dump-dom", path.resolve().as_uri()], timeout)
    if proc.returncode != 0 or "<html" not in proc.stdout:
        raise RuntimeError(f"chromium failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    console = [m.group(1) for line in proc.stderr.splitlines() if (m := CONSOLE.search(line))]
    return Rendered(proc.stdout, console, proc.stderr)


def screenshot(path: Path, png: Path, *, width: int = 1280, height: int = 4000,
               budget_ms: int = 15000, timeout: float = 180) -> Path:
    proc = _run([f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}",
                 f"--screenshot={png.resolve()}", path.resolve().as_uri()], timeout)
    if proc.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium screenshot failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return png


class _Figures(HTMLParser):
    """Track every ``div.plotly-graph-div`` and whether an ``svg.main-svg`` lies inside it."""

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                      "source", "track", "wbr"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []  # (tag, figure id if it opens a figure)
        self.figures: dict[str, bool] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "svg" and "main-svg" in classes:
            for _, fid in reversed(self.stack):
                if fid is not None:
                    self.figures[fid] = True
                    break
        if tag in self.VOID:
            return
        fid = None
        if tag == "div" and "plotly-graph-div" in classes:
            fid = a.get("id") or f"figure-{len(self.figures)}"
            self.figures.setdefault(fid, False)
        self.stack.append((tag, fid))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID and self.stack and self.stack[-1][0] == tag:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return


def figure_status(dom: str) -> dict[str, bool]:
    """``{figure div id: rendered?}`` for every plotly figure in ``dom``."""
    p = _Figures()
    p.feed(dom)
    return p.figures
