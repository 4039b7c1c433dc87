"""Markdown tables, number formats, PNG plots (matplotlib, headless) and the atomic writing of
a report: reports/<name>.md, its JSON twin reports/<name>.json, plots under reports/img/."""
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
    """Collects markdown, JSON data and plots; `write` publishes them atomically."""

    def __init__(self, name: str, title: str, out_dir: str | Path = "reports"):
        self.name = name
        self.out_dir = project_path(out_dir)
        self.img_dir = self.out_dir / "img"
        self.lines: list[str] = [f"# {title}", ""]
        self.data: dict = {"report": name, "title": title}
        self.images: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def plot(self, stem: str, draw: Callable, caption: str, size=(7.0, 3.6)) -> str | None:
        """Draw with matplotlib into reports/img/<report>_<stem>.png and link it."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=size, dpi=110)
        try:
            drew = draw(ax)
            if drew is False:
                return None
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
        finally:
            plt.close(fig)
        name = f"{self.name}_{stem}.png"
        path = self.img_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.tmp{os.getpid()}")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
        self.images.append(f"img/{name}")
        self.add(f"![{caption}](img/{name})", "")
        return f"img/{name}"

    def write(self, command: str) -> tuple[Path, Path]:
        self.data["generated_at"] = now_iso()
        self.data["command"] = command
        self.data["images"] = self.images
        self.add("---", f"Generated {self.data['generated_at']} by `{command}` from the run files listed above "
                        "(rebuild any time: the report reads only run directories).", "")
        md = self.out_dir / f"{self.name}.md"
        js = self.out_dir / f"{self.name}.json"
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
