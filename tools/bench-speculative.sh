#!/usr/bin/env bash
# Speculative decoding benchmarks (docs/benchmarks.md, "Speculative decoding"): `llmflash bench
# --draft none,self,ngram` on SmolLM2 (GGUF resident; flash image at 50% and 35% budgets;
# under a 64 MiB cgroup cap) and on Qwen2.5-Coder-1.5B under a 512 MiB cap, with prose and
# code prompts (Python standard library sources are real code). Needs root for the caps,
# built images (see README "Flash offloading") and python3.11's sources.
#
#   tools/bench-speculative.sh [smollm2|qwen|resident|all] > results.md
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
which="${1:-all}"
runs="${RUNS:-3}"
# A copy of the binary, so that rebuilding during a long run does not pull it away.
bin="$(mktemp -d)/llmflash"
cp target/release/llmflash "$bin"
smol_image="${SMOL_IMAGE:-models/smollm2.flash}"
qwen_image="${QWEN_IMAGE:-models/qwen1.5b.flash}"

# Prompts: prose (a State of the Union address) and code (json.encoder's JSONEncoder class).
prose="$(head -c 1200 data/sotu-calib.txt)"
code="$(python3 - <<'EOF'
import json.encoder, inspect
s = inspect.getsource(json.encoder)
i = s.index('class JSONEncoder')
p = s[i:i + 900]
print(p[:p.rfind('\n') + 1])
EOF
)"

bench() {  # bench LABEL ARGS...: one markdown table
  local label="$1"; shift
  echo "### $label"
  echo
  "$@" | sed -n '/^| backend/,/^$/p'
  echo
}

if [ "$which" = smollm2 ] || [ "$which" = all ]; then
  for p in prose code; do
    prompt="${!p}"
    bench "SmolLM2 flash image at 78 MiB (about 50% of the FFN held) and 62 MiB (about 35%), whole-process budgets, $p prompt" \
      "$bin" bench -m "$smol_image" --strategies flash --memory-budget 78MiB,62MiB \
        --draft none,self,ngram -n 48 --runs "$runs" -p "$prompt" --extra "--ignore-eos"
    bench "SmolLM2 flash image at 64 MiB under a 64 MiB cap, $p prompt" \
      tools/run-capped 64MiB -- "$bin" bench -m "$smol_image" --strategies flash \
        --memory-budget 64MiB --draft none,self,ngram -n 48 --runs "$runs" -p "$prompt" --extra "--ignore-eos"
  done
fi
if [ "$which" = resident ] || [ "$which" = all ]; then
  for p in prose code; do
    prompt="${!p}"
    bench "SmolLM2 GGUF, resident, $p prompt" \
      "$bin" bench -m models/SmolLM2-135M-Instruct.Q4_1.gguf --strategies resident \
        --draft none,ngram -n 64 --runs "$runs" -p "$prompt" --extra "--ignore-eos"
  done
fi
if [ "$which" = qwen ] || [ "$which" = all ]; then
  bench "Qwen2.5-Coder-1.5B flash image at 480 MiB under a 512 MiB cap, code prompt" \
    tools/run-capped 512MiB -- "$bin" bench -m "$qwen_image" --strategies flash \
      --memory-budget 480MiB --draft none,self,ngram -n 32 --runs "$runs" -p "$code" \
      --extra "--ignore-eos --draft-neurons ${QWEN_DRAFT_NEURONS:-0.1}"
fi
