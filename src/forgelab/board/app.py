"""The board: a Gradio app over the lab's files. Pages: runs, run detail, compare, reports,
live, launch, chat. Every page reads the run records, reports and servers as the scripts
wrote them; launching and chatting go through the same code the command line uses."""
from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import gradio as gr

from .. import runindex
from ..runs import display_path
from ..report.runs import ProtocolError
from . import chat, data, launcher, plots

REFRESH_S = 2.0
CSS = """
#live-status, #launch-status { font-size: 1.05em; }
.forgelab-refusal { border-left: 4px solid #c0392b; padding-left: 8px; }
"""


def file_url(path: Path) -> str:
    """The URL of a file the board serves (the folder must be in launch's allowed_paths)."""
    return "/gradio_api/file=" + urllib.parse.quote(str(path))


def _plot(fig):
    """A figure, or the plot hidden when there is nothing to draw yet."""
    return gr.update(value=fig, visible=fig is not None)


def _dropdown(choices: list[str], value=None, **kw):
    value = value if value in choices else (choices[0] if choices and value is None else None)
    return gr.update(choices=choices, value=value, **kw)


def build(runs_root: Path, reports_dir: Path) -> gr.Blocks:
    with gr.Blocks(title="ForgeLab board") as app:
        gr.Markdown("# ForgeLab board\n"
                    f"Run records from `{display_path(runs_root)}`, reports from `{display_path(reports_dir)}`.",
                    elem_id="board-header")
        with gr.Tabs(elem_id="tabs") as tabs:
            # ------------------------------------------------------------------ runs
            with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
                heads, rows, all_stages = data.runs_rows(runs_root)
                with gr.Row():
                    f_stage = gr.Dropdown(label="stage", multiselect=True, choices=all_stages,
                                          elem_id="runs-stage")
                    f_status = gr.Dropdown(label="status", multiselect=True, choices=list(runindex.STATUSES),
                                           elem_id="runs-status")
                    f_text = gr.Textbox(label="name / fingerprint / command contains", elem_id="runs-text")
                    b_refresh = gr.Button("Refresh", elem_id="runs-refresh")
                table = gr.Dataframe(value=rows, headers=heads, interactive=False, wrap=True,
                                     elem_id="runs-table")
                runs_count = gr.Markdown(f"{len(rows)} runs", elem_id="runs-count")
                gr.Markdown("Select a row to open the run.")

            # ------------------------------------------------------------------ detail
            with gr.Tab("Run detail", id="detail", elem_id="tab-detail"):
                d_key = gr.Dropdown(label="run (stage/name)", choices=data.run_keys(runs_root), elem_id="detail-run")
                d_head = gr.Markdown(elem_id="detail-header")
                d_plot = gr.Plot(label="curves", elem_id="detail-plot")
                with gr.Row():
                    d_conf = gr.Code(label="resolved config", language="yaml", elem_id="detail-config")
                    d_sum = gr.Code(label="summary", language="json", elem_id="detail-summary")
                d_log = gr.Code(label="log (tail)", elem_id="detail-log")

            # ------------------------------------------------------------------ compare
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                c_keys = gr.Dropdown(label="training runs", multiselect=True,
                                     choices=data.run_keys(runs_root, "train"), elem_id="compare-runs")
                c_mixed = gr.Checkbox(label="compare runs of different protocols anyway", value=False,
                                      elem_id="compare-mixed")
                c_go = gr.Button("Compare", variant="primary", elem_id="compare-go")
                c_msg = gr.Markdown(elem_id="compare-message")
                c_plot = gr.Plot(label="curves", elem_id="compare-plot")

            # ------------------------------------------------------------------ reports
            with gr.Tab("Reports", id="reports", elem_id="tab-reports"):
                r_pick = gr.Dropdown(label="report", choices=data.reports(reports_dir), elem_id="reports-pick")
                r_body = gr.Markdown(elem_id="report-body")

            # ------------------------------------------------------------------ live
            with gr.Tab("Live", id="live", elem_id="tab-live"):
                l_key = gr.Dropdown(label="training run", choices=data.run_keys(runs_root, "train"),
                                    allow_custom_value=True, elem_id="live-run")
                l_status = gr.Markdown(elem_id="live-status")
                l_plot = gr.Plot(label="curves (refreshing)", elem_id="live-plot")
                l_log = gr.Code(label="log (tail)", elem_id="live-log")
                l_timer = gr.Timer(REFRESH_S)

            # ------------------------------------------------------------------ launch
            with gr.Tab("Launch", id="launch", elem_id="tab-launch"):
                tc = launcher.train_choices()
                with gr.Row():
                    a_stage = gr.Dropdown(label="stage", choices=["train", *launcher.STAGES], value="train",
                                          elem_id="launch-stage")
                    a_task = gr.Dropdown(label="task", choices=tc["task"], value="cpt", elem_id="launch-task")
                    a_track = gr.Dropdown(label="track", choices=tc["track"], value="sanity", elem_id="launch-track")
                    a_backend = gr.Dropdown(label="backend", choices=tc["backend"], value="single",
                                            elem_id="launch-backend")
                with gr.Row():
                    a_conf = gr.Textbox(label="config files (stages other than train; one per line, empty: "
                                              "the stage's default)", lines=2, elem_id="launch-configs")
                    a_name = gr.Textbox(label="run name (empty: board-<time>)", elem_id="launch-name")
                a_over = gr.Textbox(label="overrides, one KEY=VALUE per line", lines=4, elem_id="launch-overrides")
                with gr.Row():
                    a_check = gr.Button("Check", elem_id="launch-check")
                    a_start = gr.Button("Start", variant="primary", elem_id="launch-start")
                    a_stop = gr.Button("Stop", variant="stop", elem_id="launch-stop")
                a_status = gr.Markdown(elem_id="launch-status")
                a_pick = gr.Dropdown(label="launch", choices=[r["id"] for r in launcher.recorded()],
                                     elem_id="launch-pick")
                a_log = gr.Code(label="output (tail)", elem_id="launch-log")
                a_timer = gr.Timer(REFRESH_S)

            # ------------------------------------------------------------------ chat
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                with gr.Row():
                    h_server = gr.Dropdown(label="server", choices=chat.server_choices(), elem_id="chat-server")
                    h_refresh = gr.Button("Refresh servers", elem_id="chat-refresh")
                    h_start = gr.Button("Start the embedded server", elem_id="chat-start")
                h_key = gr.Textbox(label="API key (servers that need one)", type="password", elem_id="chat-key")
                h_info = gr.Markdown(elem_id="chat-info")
                h_system = gr.Textbox(label="system prompt (empty: the template's default, shown above)",
                                      elem_id="chat-system")
                h_bot = gr.Chatbot(label="chat", elem_id="chat-bot", height=320)
                h_msg = gr.Textbox(label="message", elem_id="chat-message")
                with gr.Row():
                    h_send = gr.Button("Send", variant="primary", elem_id="chat-send")
                    h_clear = gr.Button("Clear", elem_id="chat-clear")
                with gr.Accordion("chat template in use", open=False, elem_id="chat-template-box"):
                    h_template = gr.Code(label="chat template", elem_id="chat-template")
                    h_prompt = gr.Code(label="the prompt the model sees", elem_id="chat-prompt")

        # ---------------------------------------------------------------------- runs: handlers
        def refresh_runs(stages_, statuses, text):
            heads_, rows_, all_stages_ = data.runs_rows(runs_root, stages_, statuses, text or "")
            # new stages become choices; the chosen ones stay chosen
            return gr.update(value=rows_, headers=heads_), f"{len(rows_)} runs", gr.update(choices=all_stages_)

        for ev in (f_stage.change, f_status.change, f_text.submit, b_refresh.click):
            ev(refresh_runs, [f_stage, f_status, f_text], [table, runs_count, f_stage])

        def open_row(evt: gr.SelectData, shown):
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            try:
                stage, name = shown.iloc[row, 0], shown.iloc[row, 1]
            except Exception:  # noqa: BLE001 - a click outside the rows
                return gr.update(), gr.update()
            key = f"{stage}/{name}"
            return _dropdown(data.run_keys(runs_root), key), gr.Tabs(selected="detail")

        table.select(open_row, [table], [d_key, tabs])

        # ---------------------------------------------------------------------- detail
        def show_detail(key):
            if not key:
                return "Pick a run.", _plot(None), "", "", ""
            try:
                d = data.detail(runs_root, key)
            except data.BoardError as e:
                return f"**{e}**", _plot(None), "", "", ""
            fig = plots.curves({key: d["metrics"]}) if d["metrics"] else None
            return data.header(d["entry"]), _plot(fig), d["config"], d["summary"], d["log"]

        d_key.change(show_detail, [d_key], [d_head, d_plot, d_conf, d_sum, d_log])

        # ---------------------------------------------------------------------- compare
        def do_compare(keys, allow):
            try:
                series, diffs = data.compare(runs_root, keys or [], allow_mixed=bool(allow))
            except ProtocolError as e:
                return (f"<div class='forgelab-refusal'><b>Refused:</b> {e}</div>\n\n"
                        "Tick *compare runs of different protocols anyway* to overlay them.", _plot(None))
            except data.BoardError as e:
                return f"**{e}**", _plot(None)
            msg = (f"{len(series)} runs, one protocol." if not diffs else
                   "**Different protocols, compared as asked:** " + "; ".join(diffs))
            return msg, _plot(plots.curves(series))

        c_go.click(do_compare, [c_keys, c_mixed], [c_msg, c_plot])

        # ---------------------------------------------------------------------- reports
        def show_report(rel):
            if not rel:
                return ""
            try:
                return data.render_report(reports_dir, rel, file_url)
            except data.BoardError as e:
                return f"**{e}**"

        r_pick.change(show_report, [r_pick], [r_body])

        # ---------------------------------------------------------------------- live
        def show_live(key):
            if not key:
                return "Pick a training run (or start one on the Launch page).", _plot(None), ""
            try:
                lv = data.live(runs_root, key)
            except data.BoardError:
                return f"**{key}**: waiting for the run to appear", _plot(None), ""
            fig = plots.curves({key: lv["metrics"]}) if lv["metrics"] else None
            return lv["status_line"], _plot(fig), lv["log"]

        l_key.change(show_live, [l_key], [l_status, l_plot, l_log])
        l_timer.tick(show_live, [l_key], [l_status, l_plot, l_log])

        # ---------------------------------------------------------------------- launch
        def spec_of(stage, task, track, backend, confs, name, over) -> launcher.Spec:
            return launcher.Spec(stage=stage, task=task, track=track, backend=backend,
                                 configs=[c.strip() for c in (confs or "").splitlines() if c.strip()],
                                 run_name=(name or "").strip(), overrides=launcher.parse_overrides(over or ""))

        def do_check(*args):
            try:
                spec = spec_of(*args)
                launcher.check(spec)
            except launcher.LaunchError as e:
                return f"<div class='forgelab-refusal'><b>Not started:</b> {e}</div>"
            return f"Config OK: `{' '.join(launcher.command(spec))}`"

        def do_start(*args):
            try:
                rec = launcher.start(spec_of(*args))
            except launcher.LaunchError as e:
                return f"<div class='forgelab-refusal'><b>Not started:</b> {e}</div>", gr.update(), gr.update()
            ids = [r["id"] for r in launcher.recorded()]
            live_key = rec["run"] if rec["run"].startswith("train/") else None
            return (f"Started `{rec['id']}` (pid {rec['pid']}): `{' '.join(rec['command'])}`",
                    _dropdown(ids, rec["id"]),
                    gr.update(value=live_key, choices=sorted(set(data.run_keys(runs_root, "train")) | {live_key}))
                    if live_key else gr.update())

        def do_stop(lid):
            if not lid:
                return "Pick a launch to stop."
            try:
                return launcher.stop(lid, wait=False)
            except launcher.LaunchError as e:
                return f"**{e}**"

        def show_launch(lid):
            if not lid:
                return ""
            try:
                rec = launcher.load(lid)
            except launcher.LaunchError as e:
                return str(e)
            return f"[{launcher.status(rec)}] {rec['run']}\n" + data.tail(Path(rec["log"]), 40)

        form = [a_stage, a_task, a_track, a_backend, a_conf, a_name, a_over]
        a_check.click(do_check, form, [a_status])
        a_start.click(do_start, form, [a_status, a_pick, l_key])
        a_stop.click(do_stop, [a_pick], [a_status])
        a_pick.change(show_launch, [a_pick], [a_log])
        a_timer.tick(show_launch, [a_pick], [a_log])

        # ---------------------------------------------------------------------- chat
        def info(choice, key):
            if not choice:
                return "No server chosen: pick a running one or start the embedded server.", "", ""
            try:
                st = chat.state_of(choice)
                t = chat.template_info(st)
            except Exception as e:  # noqa: BLE001 - shown on the page
                return f"**{e}**", "", ""
            sys_line = (f"default system prompt (from the template): *{t['default_system']}*"
                        if t["default_system"] else "the template adds no default system prompt")
            return (f"**{st['name']}** · {st['backend']} · `{st['url']}` · model `{t['model']}`\n\n{sys_line}",
                    t["template"], "")

        def refresh_servers(current):
            ch = chat.server_choices()
            return _dropdown(ch, current if current in ch else None)

        def start_server(key):
            try:
                st = chat.start_embedded(key or "")
            except Exception as e:  # noqa: BLE001 - shown on the page
                return gr.update(), f"**could not start the embedded server:** {e}"
            ch = chat.server_choices()
            pick = next((c for c in ch if c.startswith(st["name"] + " ")), None)
            return _dropdown(ch, pick), f"started **{st['name']}** at `{st['url']}`"

        def send(choice, key, system, history, msg):
            history = list(history or [])
            if not msg:
                yield history, "", gr.update()
                return
            if not choice:
                yield history + [{"role": "user", "content": msg},
                                 {"role": "assistant", "content": "[no server chosen]"}], "", gr.update()
                return
            st = chat.state_of(choice)
            convo = [{"role": m["role"], "content": _text(m["content"])} for m in history]
            messages = ([{"role": "system", "content": system}] if system else []) + convo + \
                [{"role": "user", "content": msg}]
            prompt = chat.rendered_prompt(st, messages)
            history = history + [{"role": "user", "content": msg}, {"role": "assistant", "content": ""}]
            yield history, "", prompt
            for partial in chat.stream_answer(st, messages, key or ""):
                history[-1] = {"role": "assistant", "content": partial}
                yield history, "", gr.update()

        h_server.change(info, [h_server, h_key], [h_info, h_template, h_prompt])
        h_refresh.click(refresh_servers, [h_server], [h_server])
        h_start.click(start_server, [h_key], [h_server, h_info])
        for ev in (h_send.click, h_msg.submit):
            ev(send, [h_server, h_key, h_system, h_bot, h_msg], [h_bot, h_msg, h_prompt])
        h_clear.click(lambda: ([], ""), None, [h_bot, h_prompt])

        # the page's first paint: the newest run opened, the first report shown (filled in
        # directly: a value set by load does not fire the dropdowns' change events)
        def first_paint():
            keys, reps = data.run_keys(runs_root), data.reports(reports_dir)
            key, rep = (keys[0] if keys else None), (reps[0] if reps else None)
            return (_dropdown(keys, key), *show_detail(key), _dropdown(reps, rep), show_report(rep))

        app.load(first_paint, None, [d_key, d_head, d_plot, d_conf, d_sum, d_log, r_pick, r_body])
    return app


def _text(content) -> str:
    """A chatbot message's text (Gradio may hand back structured content)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(c.get("text", "") if isinstance(c, dict) else str(c) for c in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return json.dumps(content)
