"""The listing of a config kind's keys (type, default, meaning), shared by
`scripts/config.py keys KIND` and the help of `forgelab <verb>`."""
from __future__ import annotations

from . import cli
from . import config as cfg


def format_keys(kind: str) -> str:
    """Every key of a config kind (forgelab.cli.SCHEMAS), grouped by section."""
    rows = cfg.describe(cli.schema(kind))
    w = max(len(r[0]) for r in rows)
    lines = []
    for key, tp, default, meaning in rows:
        if tp == "section":
            lines += ["", f"{key}:  {meaning}"]
        else:
            lines.append(f"  {key:{w}s}  {tp:14s} default={default}  {meaning}")
    return "\n".join(lines)
