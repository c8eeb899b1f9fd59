#!/usr/bin/env bash
# Sets up a CUDA 13.4 toolchain from PyPI (no system CUDA, no GPU needed) for building the
# `cuda` feature: nvcc and the CUDA headers for candle-kernels' PTX build, plus the runtime
# libraries (cuBLAS, cuRAND, NVRTC, cudart) that the binaries load on the GPU machine.
# Everything goes into .cache/cuda-venv; a merged tree with the usual layout (bin/, include/,
# lib64/, nvvm/) is made at .cache/cuda-venv/cuda.
#
#   deploy/cuda-setup.sh                 # install (once) and print the env exports
#   eval "$(deploy/cuda-setup.sh)"       # ... and apply them to this shell
#   deploy/cuda-setup.sh --build         # also: cargo build --release --features cuda
#   CUDA_COMPUTE_CAP=80 deploy/cuda-setup.sh   # A100 (default 90: H100/H200)
#   DPO_CUDA_VERSION=13.0 deploy/cuda-setup.sh # for a driver of the R580 branch (CUDA 13.0)
#
# Which version: the kernels candle embeds are PTX, which the driver compiles when the
# program starts, and a driver refuses PTX newer than itself (13.4's nvcc writes PTX ISA
# 9.4; an R580 driver, CUDA 13.0, reads up to 9.0). Build with the toolkit of the oldest
# driver the binaries must run on: deploy/gpu-bundle.sh uses 13.0 for that reason.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=${DPO_CUDA_VERSION:-13.4}
case $version in
  13.4) default_venv=$root/.cache/cuda-venv ;;
  13.0) default_venv=$root/.cache/cuda-venv-13.0 ;;
  *) echo "cuda-setup: DPO_CUDA_VERSION must be 13.4 or 13.0, not $version" >&2; exit 2 ;;
esac
venv=${DPO_CUDA_VENV:-$default_venv}
cap=${CUDA_COMPUTE_CAP:-90}
build=0
for a in "$@"; do
  case $a in
    --build) build=1 ;;
    *) echo "cuda-setup: unknown argument $a (expected --build)" >&2; exit 2 ;;
  esac
done

# CUDA 13.4 throughout. Why these: the CUDA 12 `nvidia-cuda-nvcc-cu12` wheel ships no nvcc
# driver; 13.4 is the newest release cudarc 0.19 (candle 0.11) knows (`cuda-13040`); nvvm
# must not be newer than ptxas (13.5's nvvm emits PTX 9.5, which 13.4's ptxas refuses); and
# cccl provides <nv/target>, which cuda_fp16.h includes. With exactly this set,
# `cargo check -p dpo-common --features cuda` (candle-kernels' PTX built by nvcc) passes on a
# machine without a GPU.
# 13.0: the same set at the R580 driver's version (cuBLAS and cuRAND number their own
# releases: 13.0.x and 10.4.0 are the ones of CUDA 13.0).
if [[ $version == 13.4 ]]; then
  pkgs=(nvidia-cuda-nvcc==13.4.92 nvidia-cuda-crt==13.4.92 nvidia-nvvm==13.4.92
        nvidia-cuda-runtime==13.4.92 "nvidia-cuda-cccl<13.5" nvidia-cuda-nvrtc==13.4.92
        "nvidia-cublas<13.5" nvidia-curand)
else
  pkgs=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
        nvidia-cuda-runtime==13.0.96 "nvidia-cuda-cccl<13.1" nvidia-cuda-nvrtc==13.0.88
        "nvidia-cublas<13.1" "nvidia-curand<10.4.1")
fi
if [[ ! -x $venv/cuda/bin/nvcc ]]; then
  echo "cuda-setup: installing ${pkgs[*]} into $venv (about 1 GB, once)" >&2
  rm -rf "$venv"   # a half-made or older (CUDA 12) venv would mix headers
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet "${pkgs[@]}" >&2
  site=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  cuda=$venv/cuda
  rm -rf "$cuda"; mkdir -p "$cuda/bin" "$cuda/include" "$cuda/lib64"
  # The wheels install one directory per component under site-packages/nvidia/.
  for comp in "$site"/nvidia/*/; do
    [[ -d $comp/bin ]] && for f in "$comp"/bin/*; do ln -sf "$f" "$cuda/bin/"; done
    [[ -d $comp/include ]] && cp -rs "$comp"/include/. "$cuda/include/" 2>/dev/null || true
    [[ -d $comp/lib ]] && for f in "$comp"/lib/*; do ln -sf "$f" "$cuda/lib64/"; done
    [[ -d $comp/nvvm ]] && ln -sfn "$comp/nvvm" "$cuda/nvvm"
  done
  # Unversioned names for the linker (the wheels ship only libX.so.13).
  for f in "$cuda"/lib64/*.so.*; do
    base=${f%%.so.*}.so; [[ -e $base ]] || ln -s "$(basename "$f")" "$base"
  done
  [[ -x $cuda/bin/nvcc ]] || { echo "cuda-setup: nvcc missing after install" >&2; exit 1; }
fi

cuda=$venv/cuda
# Linking (cudarc links libcuda, the driver's library) needs a libcuda.so, which no wheel
# ships: the toolkit's answer is a stub in lib64/stubs, and this is one. Every driver API
# function cudarc declares, each returning an error; the soname is the driver's, so the
# binaries load the real libcuda.so.1 on a GPU machine. Never put stubs/ on LD_LIBRARY_PATH.
stub=$cuda/lib64/stubs/libcuda.so
if [[ ! -s $stub ]]; then
  sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -n 1)
  if [[ -n $sys ]]; then
    mkdir -p "$cuda/lib64/stubs"
    grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$sys" | awk '{print "int " $4 "(void) { return 999; }"}' \
      | sort -u >"$cuda/lib64/stubs/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$cuda/lib64/stubs/libcuda_stub.c" >&2
  else
    echo "cuda-setup: cudarc's sources are not in the cargo registry yet (run cargo fetch); no libcuda stub, so linking --features cuda will fail" >&2
  fi
fi
exports="export CUDA_ROOT=$cuda CUDA_PATH=$cuda CUDA_HOME=$cuda CUDA_TOOLKIT_ROOT_DIR=$cuda
export PATH=$cuda/bin:\$PATH
export LD_LIBRARY_PATH=$cuda/lib64:\${LD_LIBRARY_PATH:-}
export CUDA_COMPUTE_CAP=$cap"
echo "$exports"
"$cuda/bin/nvcc" --version >&2

if [[ $build == 1 ]]; then
  eval "$exports"
  cd "$root"
  cargo build --release --features cuda -p ref-server -p policy-trainer >&2
fi
