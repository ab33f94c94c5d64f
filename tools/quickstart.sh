#!/usr/bin/env bash
# One command from a fresh clone: fetch the default model (SmolLM2-135M-Instruct, Q4_1 GGUF)
# if it is missing, build llmflash, and stream a greedy continuation of a prompt.
#   tools/quickstart.sh "The capital of France is" [extra generate flags...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
prompt="${1:-The capital of France is}"
shift || true
tools/fetch-model >&2
model="$(tools/fetch-model --print-path)"
cargo build --release --quiet
exec target/release/llmflash generate -m "$model" -p "$prompt" -n 64 "$@"
