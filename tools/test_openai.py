"""`llmflash serve` spoken to by the real `openai` Python client (run by tools/test-openai).

Starts the server on a free port, then checks chat and completion (whole and streamed), that
temperature 0 gives `llmflash generate --greedy --json`'s text, models.list(), errors raised
as the client's exception types, and 8 concurrent streams each equal to its text alone.
Exits non-zero on the first mismatch.
"""

import argparse
import concurrent.futures
import json
import re
import subprocess
import sys
import threading

import openai

N = 12


def start(binary, model, extra):
    proc = subprocess.Popen(
        [binary, "serve", "-m", model, "--port", "0", *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The ready line names the address; anything before it is kept for a failure message.
    seen = []
    for line in proc.stderr:
        m = re.match(r"serving (\S+) on (http://\S+/v1) ", line)
        if m:
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, m.group(1), m.group(2)
        seen.append(line)
    proc.wait()
    sys.exit("llmflash serve exited before serving:\n" + "".join(seen))


def generate(binary, model, prompt, chat):
    args = [binary, "generate", "-m", model, "-p", prompt, "-n", str(N), "--greedy", "--json"]
    if chat:
        args.append("--chat")
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["text"]


def check(what, got, want):
    if got != want:
        sys.exit(f"MISMATCH {what}:\n  got  {got!r}\n  want {want!r}")
    print(f"ok  {what}")


def chat(client, model_id, prompt, stream):
    kw = dict(model=model_id, messages=[{"role": "user", "content": prompt}], max_tokens=N, temperature=0)
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
    text, finish, usage = "", None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish, usage


def complete(client, model_id, prompt, stream):
    kw = dict(model=model_id, prompt=prompt, max_tokens=N, temperature=0)
    if not stream:
        r = client.completions.create(**kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
    text, finish, usage = "", None, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for c in chunk.choices:
            text += c.text or ""
            finish = c.finish_reason or finish
    return text, finish, usage


def expect_error(what, kind, call):
    try:
        call()
    except kind as e:
        print(f"ok  {what}: {type(e).__name__} ({e.status_code})")
        return
    except openai.APIError as e:
        sys.exit(f"MISMATCH {what}: raised {type(e).__name__}, not {kind.__name__}: {e}")
    sys.exit(f"MISMATCH {what}: no error raised")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    proc, model_id, base = start(a.bin, a.model, ["--parallel", "4", "--ctx", "2048"])
    try:
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
        ids = [m.id for m in client.models.list()]
        check("models.list()", ids, [model_id])

        prompt = "Write a haiku about the sea."
        want = generate(a.bin, a.model, prompt, chat=True)
        whole = chat(client, model_id, prompt, stream=False)
        check("chat, temperature 0 = generate --chat --greedy", whole[0], want)
        check("chat streamed = chat whole", chat(client, model_id, prompt, stream=True), whole)

        prompt = "The capital of France is"
        want = generate(a.bin, a.model, prompt, chat=False)
        whole = complete(client, model_id, prompt, stream=False)
        check("completion, temperature 0 = generate --greedy", whole[0], want)
        check("finish_reason and usage at max_tokens", whole[1:], ("length", N))
        check("completion streamed = completion whole", complete(client, model_id, prompt, stream=True), whole)

        expect_error(
            "unknown model",
            openai.NotFoundError,
            lambda: client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}]),
        )
        expect_error(
            "empty messages",
            openai.BadRequestError,
            lambda: client.chat.completions.create(model=model_id, messages=[]),
        )
        expect_error(
            "temperature out of range",
            openai.BadRequestError,
            lambda: client.completions.create(model=model_id, prompt="x", temperature=9),
        )

        prompts = [
            "Name a colour.",
            "The first planet from the sun is",
            "Count from one to five:",
            "What is a cat?",
            "def fibonacci(n):",
            "Write one word about rain.",
            "Water boils at",
            "My favourite fruit is",
        ]

        def ask(i):
            # Even ones as chats, odd ones as completions: both share the batch.
            f = chat if i % 2 == 0 else complete
            return f(client, model_id, prompts[i], stream=True)

        alone = [ask(i) for i in range(len(prompts))]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(ask, range(len(prompts))))
        for i, (x, y) in enumerate(zip(together, alone)):
            check(f"concurrent stream {i} = alone", x, y)
    finally:
        proc.terminate()
        code = proc.wait(timeout=60)
    if code != 0:
        sys.exit(f"the server exited {code} after SIGTERM")
    print("ok  the server exited 0 on SIGTERM")


if __name__ == "__main__":
    main()
