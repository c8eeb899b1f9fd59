#!/usr/bin/env bash
# Builds what deploy/gpu-check.sh needs on a machine with a GPU but no Rust toolchain or
# internet, and stages it in .cache/gpu-bundle/ as two parts of under 64 MiB each
# (together with the repository's working tree), so that each fits a transfer capped at
# 64 MiB:
#
#   a/  bin.tar.xz (ref-server, policy-trainer, gpu_tools: release, --features cuda,
#       stripped) + the first piece of the SmolLM2 GGUF + MANIFEST
#   b/  the rest of the GGUF + MANIFEST
#
#   deploy/gpu-bundle.sh                 # build (CUDA 13.0 toolchain from PyPI) and stage
#   deploy/gpu-bundle.sh --no-build      # stage what target/cuda/release already holds
#   CUDA_COMPUTE_CAP=80 deploy/gpu-bundle.sh   # for an A100 (default 90: H100/H200)
#
# Why CUDA 13.0: candle's kernels travel as PTX that the driver compiles at start-up, and a
# driver refuses PTX newer than itself; CUDA 13.0's PTX runs on drivers from the R580
# branch on. Why two parts: the GGUF alone is 94 MiB. The CUDA libraries (cuBLAS is
# 500 MB) are not bundled: the GPU machine's CUDA install or PyTorch wheels provide them
# (gpu-check.sh finds them); the binaries need libcuda.so.1, libcublas(Lt).so.13,
# libcurand.so.10, libnvrtc.so.13 and libcudart.so.13 there.
#
# Then copy the repository (with .cache/gpu-bundle) to the GPU machine and run there, from
# its root:
#   deploy/gpu-check.sh                  # both parts present: every step
# or one part at a time (the stage on that machine keeps what came before):
#   deploy/gpu-check.sh --steps 3        # with part a only
#   deploy/gpu-check.sh --steps 1,2,4    # after part b has been added
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
build=1
for a in "$@"; do
  case $a in
    --no-build) build=0 ;;
    -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-bundle: unknown argument $a (see --help)" >&2; exit 2 ;;
  esac
done
out=$root/.cache/gpu-bundle
export CARGO_TARGET_DIR=${DPO_CUDA_TARGET_DIR:-$root/target/cuda}
rel=$CARGO_TARGET_DIR/release

if [[ $build == 1 ]]; then
  eval "$(DPO_CUDA_VERSION=13.0 deploy/cuda-setup.sh)"
  started=$(date +%s)
  # One invocation: an example brings dpo-common's dev-dependencies, whose features would
  # otherwise differ from the binaries' build and rebuild much of the dependency tree.
  cargo build --release --locked --features cuda -p ref-server -p policy-trainer -p dpo-common \
    --bin ref-server --bin policy-trainer --example gpu_tools
  echo "gpu-bundle: cargo build took $(($(date +%s) - started)) s" >&2
fi
bins=("$rel/ref-server" "$rel/policy-trainer" "$rel/examples/gpu_tools")
for b in "${bins[@]}"; do
  [[ -x $b ]] || { echo "gpu-bundle: $b is missing (run without --no-build)" >&2; exit 1; }
  # A binary built without the feature would fail only on the GPU machine.
  readelf -d "$b" | grep -q 'libcublas' || { echo "gpu-bundle: $b does not link cuBLAS: not a --features cuda build" >&2; exit 1; }
done

model=$(deploy/fetch-model.sh)
rm -rf "$out.tmp" && mkdir -p "$out.tmp/a" "$out.tmp/b" "$out.tmp/stage"
for b in "${bins[@]}"; do strip -o "$out.tmp/stage/$(basename "$b")" "$b"; done
tar -C "$out.tmp/stage" -cf - ref-server policy-trainer gpu_tools | xz -9 -T0 >"$out.tmp/a/bin.tar.xz"
rm -rf "$out.tmp/stage"

# What one part may hold: 64 MiB minus the working tree that is copied with it (tracked
# and untracked-but-not-ignored files), minus 1 MiB of slack for files added meanwhile.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
cap=$((64 * 1048576 - tree - 1048576))
bin_bytes=$(stat -c %s "$out.tmp/a/bin.tar.xz")
gguf_bytes=$(stat -c %s "$model")
first=$((cap - bin_bytes - 4096))
rest=$((gguf_bytes - first))
if ((first <= 0 || rest > cap - 4096)); then
  echo "gpu-bundle: binaries $bin_bytes B + GGUF $gguf_bytes B do not fit two parts of $cap B" >&2
  exit 1
fi
head -c "$first" "$model" >"$out.tmp/a/smollm2.gguf.part1"
tail -c "+$((first + 1))" "$model" >"$out.tmp/b/smollm2.gguf.part2"
manifest="gguf_name $(basename "$model")
gguf_sha256 $(sha256sum "$model" | cut -d' ' -f1)
gguf_parts 2
commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (plus uncommitted changes)')
cuda $("$root/.cache/cuda-venv-13.0/cuda/bin/nvcc" --version 2>/dev/null | grep -o 'release [0-9.]*' || echo unknown), compute_cap ${CUDA_COMPUTE_CAP:-90}
built $(date -u +%Y-%m-%dT%H:%MZ)"
echo "$manifest" >"$out.tmp/a/MANIFEST"
echo "$manifest" >"$out.tmp/b/MANIFEST"
rm -rf "$out" && mv "$out.tmp" "$out"

echo "gpu-bundle: staged in $out (working tree $((tree / 1024)) KiB travels with each part):" >&2
for p in a b; do
  echo "  $p/ $(du -b "$out/$p" | cut -f1 | awk '{printf "%.1f MiB", $1/1048576}'): $(ls "$out/$p" | tr '\n' ' ')" >&2
done
echo "  binaries need: $(readelf -d "$rel/policy-trainer" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')" >&2
