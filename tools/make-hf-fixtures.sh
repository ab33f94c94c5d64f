#!/usr/bin/env bash
# Regenerate tests/fixtures/hf/ (tiny random llama, qwen2, qwen3 and OPT checkpoints with
# transformers' logits). Run once by a developer; CI only reads the results. Needs ~6 GB for the
# venv (PyPI's torch pulls CUDA libraries even though it runs on the CPU here).
#   tools/make-hf-fixtures.sh            (venv in $HF_VENV, default /tmp/llmflash-hf-venv)
#   tools/make-hf-fixtures.sh qwen3      (only the named checkpoints; README.md is rewritten)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${HF_VENV:-/tmp/llmflash-hf-venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -r "$root/tools/requirements-hf-fixtures.txt"
cd "$root"
"$venv/bin/python" tools/make_hf_fixtures.py tests/fixtures/hf "$@"
du -sh tests/fixtures/hf/*
