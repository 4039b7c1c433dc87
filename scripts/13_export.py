#!/usr/bin/env python3
"""Stage 13: export the trained model (default: the SFT-merged SmolLM2) to its deliverables
(GGUF Q8_0 with an Ollama Modelfile, the INT4/INT8/FP16 mixed format, ...), gate each one against
the model as trained (base + adapter) under every server that can run it (in-process,
`transformers serve`, vLLM, llama.cpp), and publish under model/export/<name>/ only what is
within tolerance. Report: reports/export_gate.md (+ .json). Exit 1 when a deliverable is refused
(on_refusal: fail).

  python scripts/13_export.py
  python scripts/13_export.py --set deliverables='[{name: q4_k_m, format: gguf, qtype: Q4_K_M}]'
  python scripts/13_export.py --config configs/export_full.yaml      # every format
Every key: python scripts/config.py keys export
"""
from forgelab import cli
from forgelab.export.config import ExportConfig
from forgelab.runs import Run


def main() -> int:
    p = cli.parser(__doc__, default_config="configs/export.yaml")
    args = p.parse_args()
    conf = cli.load_config(ExportConfig, args)
    cli.interrupt_on_sigterm()  # servers the gate started are stopped, staging is removed
    from forgelab.export.stage import run_export
    with Run("export", conf, args.run_name) as run:
        s = run_export(conf, run)
        run.summary.update(s)
        for e in s["deliverables"]:
            state = f"published at {e['published']}" if e["passed"] else f"REFUSED ({e['diverged_at']})"
            print(f"{e['name']:>12}: {state}")
        print(f"report: {s['report']}")
        if s["any_refused"] and conf.on_refusal == "fail":
            run.summary["passed"] = False
            return 1
    return 0


if __name__ == "__main__":
    cli.run_main(main)
