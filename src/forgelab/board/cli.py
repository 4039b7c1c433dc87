"""`forgelab board`: start the board. It binds 127.0.0.1 by default; a host other machines can
reach needs a token (--token or $FORGELAB_BOARD_TOKEN), which the login page asks for, as the
lab's servers need an API key there."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TOKEN_ENV = "FORGELAB_BOARD_TOKEN"
USER = "forgelab"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forgelab board", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="listen port (default 7860)")
    p.add_argument("--token", default=None, help=f"login token (default ${TOKEN_ENV}); needed off loopback; "
                                                 f"the login page's user name is '{USER}'")
    p.add_argument("--runs-dir", default=None, help="run records to show (default runs/ or $FORGELAB_RUNS_DIR)")
    p.add_argument("--reports-dir", default="reports", help="markdown reports to render (default reports/)")
    return p


def access_error(host: str, token: str) -> str | None:
    """Why the board may not listen on `host` (beyond this machine without a token: the servers'
    rule), or None."""
    from ..serve.config import is_loopback
    if not token and not is_loopback(host):
        return (f"error: host {host!r} is reachable from other machines and no token is set: "
                f"pass --token or set ${TOKEN_ENV}, or bind 127.0.0.1")
    return None


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    token = a.token if a.token is not None else os.environ.get(TOKEN_ENV, "")
    refused = access_error(a.host, token)
    if refused:
        print(refused, file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls
    from ..runs import project_path, runs_dir
    if a.runs_dir:
        os.environ["FORGELAB_RUNS_DIR"] = str(project_path(a.runs_dir))  # launches inherit it
    runs_root, reports_dir = runs_dir(), project_path(a.reports_dir)
    import gradio as gr
    from .app import CSS, build
    app = build(runs_root, reports_dir)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts to fetch
    print(f"board: http://{a.host}:{a.port}/ (runs {runs_root}, reports {reports_dir})"
          + (f", login user '{USER}'" if token else ""), flush=True)
    app.queue().launch(server_name=a.host, server_port=a.port, auth=(USER, token) if token else None,
                       allowed_paths=[str(reports_dir), str(Path(project_path("docs/img")))],
                       theme=theme, css=CSS, footer_links=[], quiet=True, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
