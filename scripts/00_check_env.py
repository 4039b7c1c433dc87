#!/usr/bin/env python3
"""Stage 00: report Python, torch, CUDA, GPUs (with memory), RAM, disk and package versions,
and exit 1 with the list of what is missing when the config requires something absent.

  python scripts/00_check_env.py                                  # the default needs
  python scripts/00_check_env.py --set require_cuda=true          # a GPU run
  python scripts/00_check_env.py --set 'require=[deepspeed,vllm]'

The report goes to the run dir (runs/env/<run>/env_check.md + summary.json) and to
runs/env/latest.md. Every key: python scripts/config.py keys env
"""
import shutil

from forgelab import cli
from forgelab.envcheck import EnvCheckConfig, collect, problems, report
from forgelab.runs import Run, atomic_write_text


def main() -> int:
    args = cli.parser(__doc__, default_config="configs/env.yaml").parse_args()
    conf = cli.load_config(EnvCheckConfig, args)
    with Run("env", conf, args.run_name) as run:
        info = collect(conf)
        issues = problems(info, conf)
        text = report(info, issues)
        atomic_write_text(run.dir / conf.report_name, text)
        latest = run.dir.parent / "latest.md"
        shutil.copyfile(run.dir / conf.report_name, latest.with_name(".latest.md.tmp"))
        latest.with_name(".latest.md.tmp").replace(latest)
        run.summary.update(env=info, missing=issues)
        print(text)
        if issues:  # exit 1 and the run recorded as failed, naming what is missing
            raise SystemExit("missing: " + "; ".join(issues))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
