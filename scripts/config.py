#!/usr/bin/env python3
"""Inspect configs: list every key of a config kind with its default and meaning, or print
the resolved config that a set of files and --set overrides compose to.

  python scripts/config.py kinds
  python scripts/config.py keys train
  python scripts/config.py show train --config configs/train/base.yaml --set optim.lr=1e-4
"""
import argparse
import sys

from forgelab import cli
from forgelab import config as cfg
from forgelab.config_keys import format_keys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("kinds", help="list config kinds")
    k = sub.add_parser("keys", help="list every key of a kind with default and meaning")
    k.add_argument("kind")
    s = sub.add_parser("show", help="print the resolved config")
    s.add_argument("kind")
    s.add_argument("--config", action="append", default=[])
    s.add_argument("--set", action="append", default=[], dest="overrides")
    a = p.parse_args()
    if a.cmd == "kinds":
        for name, where in cli.SCHEMAS.items():
            print(f"{name:16s} {where}")
        return 0
    schema = cli.schema(a.kind)
    if a.cmd == "keys":
        print(format_keys(a.kind))
        return 0
    from forgelab.runs import project_path
    conf = cfg.load(schema, [project_path(c) for c in a.config], a.overrides)
    sys.stdout.write(cfg.dump_yaml(conf))
    return 0


if __name__ == "__main__":
    cli.run_main(main)
