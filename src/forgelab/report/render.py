"""Markdown tables, number formats, PNG plots (matplotlib, headless) and the atomic writing of
a report (`Report`): <dir>/<name>.md, its JSON twin <dir>/<name>.json, plots under <dir>/img/
(or beside the markdown). <dir> is reports/ for the lab's reports; a stage may also write its
report into its run directory."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Callable

from ..runs import atomic_write_text, now_iso, project_path, write_json

GiB = 2**30


def num(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != 0 and abs(v) < 10 ** -digits:
            return f"{v:.2e}"
        return f"{v:,.{digits}f}"
    return str(v)


def gib(v: Any) -> str:
    return "–" if v is None else f"{v / GiB:.2f}"


def pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


class Report:
    """Collects markdown, JSON data and plots; `write` publishes them atomically.

    The one way every stage writes a report: <out_dir>/<name>.md, its JSON twin
    <out_dir>/<name>.json and PNG plots under <out_dir>/<img_dir>/ ("" = next to the markdown),
    named <img_prefix>_<stem>.png (img_prefix defaults to the report's name). Without a title
    the markdown starts empty and the caller writes its own heading; `data` replaces the
    default JSON body ({"report", "title"}) when a stage has its own layout.
    """

    def __init__(self, name: str, title: str | None, out_dir: str | Path = "reports", *,
                 img_dir: str = "img", img_prefix: str | None = None, data: dict | None = None):
        self.name = name
        self.out_dir = project_path(out_dir)
        self.img_rel = img_dir.strip("/")
        self.img_dir = self.out_dir / self.img_rel if self.img_rel else self.out_dir
        self.img_prefix = name if img_prefix is None else img_prefix
        self.lines: list[str] = [f"# {title}", ""] if title is not None else []
        self.data: dict = data if data is not None else {"report": name, "title": title}
        self.images: list[str] = []

    @classmethod
    def at(cls, md_path: str | Path, title: str | None = None, **kw) -> "Report":
        """A report written to md_path (its suffix becomes .md; the JSON twin sits beside it)."""
        p = project_path(md_path).with_suffix("")
        return cls(p.name, title, p.parent, **kw)

    @property
    def md_path(self) -> Path:
        return self.out_dir / f"{self.name}.md"

    @property
    def json_path(self) -> Path:
        return self.out_dir / f"{self.name}.json"

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    @staticmethod
    def render(draw: Callable, size=(7.0, 3.6), axes: bool = True) -> bytes | None:
        """PNG bytes of a matplotlib figure (headless): draw(ax) on one axes, or draw(fig) when
        axes=False (several panels, twin axes, figure legends). None when draw returns False."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        if axes:
            fig, ax = plt.subplots(figsize=size, dpi=110)
        else:
            fig, ax = plt.figure(figsize=size, dpi=110), None
        try:
            drew = draw(ax if axes else fig)
            if drew is False:
                return None
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
        finally:
            plt.close(fig)
        return buf.getvalue()

    def add_image(self, stem: str, png: bytes, caption: str, link: bool = True) -> str:
        """Write PNG bytes to <img_dir>/<img_prefix>_<stem>.png (atomically); with link, the
        markdown shows it here. Returns its path relative to the markdown."""
        name = f"{self.img_prefix}_{stem}.png"
        path = self.img_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.tmp{os.getpid()}")
        tmp.write_bytes(png)
        os.replace(tmp, path)
        rel = f"{self.img_rel}/{name}" if self.img_rel else name
        self.images.append(rel)
        if link:
            self.add(f"![{caption}]({rel})", "")
        return rel

    def plot(self, stem: str, draw: Callable, caption: str, size=(7.0, 3.6), axes: bool = True,
             link: bool = True) -> str | None:
        """Draw with matplotlib into <img_dir>/<img_prefix>_<stem>.png and link it."""
        png = self.render(draw, size, axes)
        return None if png is None else self.add_image(stem, png, caption, link)

    def write(self, command: str | None = None) -> tuple[Path, Path]:
        """Publish the markdown and its JSON twin. With the command that built it (reports
        rebuilt from run directories), the JSON records it, the time and the images, and the
        markdown ends with a line saying so; without, both are written as collected."""
        if command is not None:
            self.data["generated_at"] = now_iso()
            self.data["command"] = command
            self.data["images"] = self.images
            self.add("---", f"Generated {self.data['generated_at']} by `{command}` from the run files listed above "
                            "(rebuild any time: the report reads only run directories).", "")
        md, js = self.md_path, self.json_path
        atomic_write_text(md, "\n".join(self.lines))
        write_json(js, self.data)
        return md, js


def run_sources(runs, rel_to: Path) -> list[str]:
    """A 'Runs' section: each run's dir, its config.yaml and the command that launched it."""
    rows = []
    for r in runs:
        conf = r.dir / "config.yaml"
        rel = os.path.relpath(conf, rel_to) if conf.is_file() else None
        rows.append([r.name, r.get("backend"), r.world_size, r.get("track"), f"`{r.launch}`",
                     f"[config.yaml]({rel})" if rel else "–"])
    return [table(["run", "backend", "ranks", "track", "command", "resolved config"], rows), ""]
