"""Serves a Chorus checkpoint with vLLM (its OpenAI server, unedited files) and decodes greedily.

Run by `tests/hf_interop.rs` (needs vLLM; see engines.md in the design notes for the CPU build):

    python vllm_greedy.py CHECKPOINT PROMPT_IDS NEW_TOKENS

Starts `vllm.entrypoints.openai.api_server` on a free loopback port, waits for it (up to
`CHORUS_VLLM_START_SECONDS`, default 600), asks `/v1/completions` for NEW_TOKENS greedy tokens
after PROMPT_IDS (comma-separated ids) with their log-probabilities, stops the server, and prints
`{"tokens": [...], "logprobs": [...]}`.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def main():
    checkpoint, prompt, new_tokens = sys.argv[1:4]
    prompt = [int(t) for t in prompt.split(",")]
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    # A file, not a pipe: nobody reads the server's log while it runs, and a full pipe would
    # stop it.
    log = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "256", "--max-num-seqs", "4"],
        env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + float(os.environ.get("CHORUS_VLLM_START_SECONDS", "600"))
        while True:
            if server.poll() is not None:
                log.seek(0)
                sys.exit("vLLM exited before serving:\n" + log.read()[-4000:])
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                sys.exit("vLLM did not start in time")
            time.sleep(2)
        answer = post(base + "/v1/completions", {
            "model": checkpoint, "prompt": prompt, "max_tokens": int(new_tokens),
            "min_tokens": int(new_tokens), "temperature": 0.0, "logprobs": 1,
            "ignore_eos": True, "return_tokens_as_token_ids": True,
        })
        choice = answer["choices"][0]
        tokens = [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]
        print(json.dumps({"tokens": tokens, "logprobs": choice["logprobs"]["token_logprobs"]}))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
