#!/usr/bin/env python3
"""Stage 10: serve a model over an OpenAI-compatible API, in the background.

  scripts/10_serve.sh transformers [MODEL]     start `transformers serve` (the embedded default)
  scripts/10_serve.sh vllm [MODEL]             start vLLM (bash scripts/setup_vllm_cpu.sh on CPU)
  scripts/10_serve.sh llamacpp [GGUF]          start llama-server (bash scripts/setup_llamacpp.sh builds it)
  scripts/10_serve.sh deepspeed [MODEL]        start DeepSpeed Inference (forgelab.serve.ds_inference)
  scripts/10_serve.sh start BACKEND [MODEL] [--config YAML] [--set KEY=VALUE] [--name NAME]
  scripts/10_serve.sh status [NAME]            list recorded servers and whether they answer
  scripts/10_serve.sh stop [NAME]              stop one server (default: every running one)

Settings come from configs/serve/<backend>.yaml (`scripts/config.py keys serve` lists them).
The server binds 127.0.0.1 unless configured otherwise; a non-loopback host needs an API key
(FORGELAB_API_KEY) or force_insecure: true. start returns once a chat request succeeds; pid,
state and log live in runs/serve/<name>/.
"""
import argparse
import sys

from forgelab import cli
from forgelab.serve import server
from forgelab.serve.config import ServeConfig

BACKENDS = ("transformers", "vllm", "llamacpp", "deepspeed")


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] in BACKENDS:
        argv = ["start", *argv]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{start,stop,status}")
    s = sub.add_parser("start", help="start a server and wait until it answers")
    s.add_argument("backend", choices=BACKENDS)
    s.add_argument("model", nargs="?", help="model dir or hub id; a .gguf file for llamacpp (default: the config's model)")
    s.add_argument("--config", action="append", metavar="YAML",
                   help="config file(s), composed in order (default: configs/serve/<backend>.yaml)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one config key, e.g. --set port=8001 (repeatable)")
    s.add_argument("--name", help="server name (runs/serve/<name>/); default: the backend")
    s.add_argument("--json", action="store_true", help="print the server state as JSON")
    st = sub.add_parser("stop", help="stop servers (all running ones when no name is given)")
    st.add_argument("names", nargs="*")
    sub.add_parser("status", help="list recorded servers").add_argument("name", nargs="?")
    args = p.parse_args(argv)

    try:
        if args.cmd == "start":
            args._default_config = f"configs/serve/{args.backend}.yaml"
            args.overrides = [f"backend={args.backend}"] + args.overrides
            if args.model:
                args.overrides.append(f"model={args.model}")
            if args.name:
                args.overrides.append(f"name={args.name}")
            conf = cli.load_config(ServeConfig, args)
            state = server.start_recorded(conf)
            print(server.state_json(state) if args.json else
                  f"{state['name']}: serving {state['request_model']} at {state['url']} "
                  f"(stop: scripts/10_serve.sh stop {state['name']})")
        elif args.cmd == "stop":
            names = args.names or [s["name"] for s in server.running_servers()]
            if not names:
                print("no running server")
            for n in names:
                print(f"{n}: {server.stop(n)}")
        else:
            print(server.format_status(server.status(args.name)))
    except server.ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run_main(main)
