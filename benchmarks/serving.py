"""Serving under load: keras_tune.serve beside llama.cpp's server and keras-hub's own `generate`.

For 1, 4 and 16 concurrent clients, each client streams one completion (its own
prompt, greedy, `max_tokens` new tokens) and the table gives the tokens
generated a second over the whole run and the time to the first token (median
and 95th percentile over the clients). The three sides serve the same model at
the same precision (float32):

- `keras_tune.serve`: `python -m keras_tune.serve --preset ...` (continuous
  batching over `--slots`), driven through HTTP with the openai client.
- `llama.cpp server`: `python -m llama_cpp.server` (llama-cpp-python's
  OpenAI-compatible server) on keras_tune's own GGUF export of the model
  (`python -m keras_tune.export --gguf ... --gguf-dtype f32`), with as many
  threads as the machine has cores (`--llama-threads`); same prompts, same requests. It answers
  one request at a time (`--interrupt_requests False`; by default a new request
  cuts the one in progress short); llama.cpp's own C++ `llama-server` batches
  with `--parallel N`, but is not what `pip install llama-cpp-python` gives.
- `keras-hub generate`: the plain recipe, no server: the clients' prompts as
  one batch through keras-hub's `CausalLM.generate` (static batching); its
  "first token" is when the whole batch is done, since it does not stream.

Every side runs in its own process, one after the other; a side that cannot
run (llama-cpp-python not installed) is a row saying why.

Usage (under the benchmark lock; ~10 min on 2 cores for the 270M):

```
flock /tmp/keras_tune_benchmark.lock python benchmarks/serving.py
python benchmarks/serving.py --preset gemma3_tiny --clients 1,2 --max-tokens 8 --skip-llama   # a quick check
```
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "def fibonacci(n):\n",
    "import numpy as np\n\n\ndef moving_average(values, window):\n",
    "The history of the city begins",
    "class Stack:\n    def __init__(self):\n",
    "In mathematics, a prime number is",
    "def parse_args():\n    parser = argparse.ArgumentParser(",
    "The river rises in the hills and",
    "for i in range(10):\n",
]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's server runs
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_ready(url, process, timeout_s):
    import httpx2 as httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


def _stream_one(client, model, prompt, max_tokens, out):
    started = time.perf_counter()
    first, pieces, usage = None, 0, None
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if getattr(chunk, "usage", None):
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.text:
                first = first or time.perf_counter()
                pieces += 1
    out.append({"started": started, "first": first or time.perf_counter(), "ended": time.perf_counter(),
                "tokens": usage if usage is not None else pieces})


def load(url, model, clients, max_tokens):
    """`clients` concurrent streamed completions; returns the run's figures."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    _stream_one(client, model, PROMPTS[0], 4, [])  # a warm request: compiles and caches are not what is measured
    results = []
    threads = [threading.Thread(target=_stream_one, args=(client, model, PROMPTS[i % len(PROMPTS)], max_tokens, results))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return _figures(results, clients)


def _figures(results, clients):
    if len(results) != clients:
        return {"error": f"{clients - len(results)} of {clients} clients failed"}
    ttft = sorted(r["first"] - r["started"] for r in results)
    wall = max(r["ended"] for r in results) - min(r["started"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p95_s": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]}


def _server_side(name, command, url, model, args, log_path):
    rows = []
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_env())
    try:
        if not _wait_ready(url, process, args.start_timeout):
            return [{"side": name, "error": f"did not start (see {log_path})"}]
        for clients in args.clients:
            rows.append(dict(load(url, model, clients, args.max_tokens), side=name, clients=clients))
    finally:
        process.terminate()
        try:
            process.wait(args.drain_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return rows


def keras_tune_side(args, folder):
    port = _free_port()
    command = [sys.executable, "-m", "keras_tune.serve", "--preset", args.preset, "--port", str(port),
               "--slots", str(max(args.clients)), "--context", str(args.context), "--max-queue", "256"]
    return _server_side("keras_tune.serve", command, f"http://127.0.0.1:{port}", args.preset, args,
                        folder / "keras_tune.log")


def llama_side(args, folder):
    name = "llama.cpp server (llama-cpp-python)"
    if importlib.util.find_spec("llama_cpp") is None:
        return [{"side": name, "error": "llama-cpp-python is not installed; pip install 'llama-cpp-python[server]'"}]
    gguf = folder / "model-f32.gguf"
    export = subprocess.run([sys.executable, "-m", "keras_tune.export", "--preset", args.preset, "--gguf", str(gguf),
                             "--gguf-dtype", "f32"], cwd=REPO, env=_env(), capture_output=True, text=True)
    if export.returncode:
        return [{"side": name, "error": f"GGUF export failed: {(export.stderr or export.stdout).strip().splitlines()[-1]}"}]
    port = _free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", str(args.context), "--n_threads", str(args.llama_threads), "--model_alias", args.preset,
               "--interrupt_requests", "False"]  # its default: a new request cuts the one being answered short
    return _server_side(name, command, f"http://127.0.0.1:{port}", args.preset, args, folder / "llama_cpp.log")


def keras_hub_side(args, folder):
    """The plain recipe in a child process: the prompts as one `generate` batch, per client count."""
    out = folder / "keras_hub.json"
    job = {"preset": args.preset, "clients": args.clients, "max_tokens": args.max_tokens, "out": str(out)}
    with open(folder / "keras_hub.log", "w") as log:
        code = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], cwd=REPO, env=_env(),
                              stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        return [{"side": "keras-hub generate (static batch)", "error": f"exit {code} (see {folder / 'keras_hub.log'})"}]
    return json.loads(out.read_text())


def _child(job):
    """Runs in a fresh process: keras-hub's `generate` over the clients' prompts, one static batch a count."""
    import numpy as np

    import keras_tune

    config = keras_tune.load_config(job["preset"])
    causal_lm = keras_tune.load_causal_lm(config)
    causal_lm.compile(sampler="greedy")
    preprocessor = causal_lm.preprocessor
    stop = [int(preprocessor.tokenizer.end_token_id)]
    rows = []
    for clients in job["clients"]:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(clients)]
        longest = max(1 + int(np.asarray(preprocessor.tokenizer(p)).size) for p in prompts)
        inputs = preprocessor.generate_preprocess(prompts, sequence_length=longest + job["max_tokens"])
        inputs = {key: np.asarray(value) for key, value in inputs.items() if value is not None}
        generate = causal_lm.make_generate_function()  # what `generate` runs (its output step fails on None images)
        generate(inputs, stop_token_ids=stop)  # compiles: not measured
        started = time.perf_counter()
        outputs = generate(inputs, stop_token_ids=stop)
        outputs["padding_mask"].block_until_ready()
        wall = time.perf_counter() - started
        # A shorter prompt in the batch runs on to the longest one's length: only `max_tokens` of its tokens count.
        generated = np.asarray(outputs["padding_mask"]).sum(axis=1) - inputs["padding_mask"].sum(axis=1)
        tokens = int(np.minimum(generated, job["max_tokens"]).sum())
        rows.append({"side": "keras-hub generate (static batch)", "clients": clients, "tokens": tokens, "wall_s": wall,
                     "tokens_per_s": tokens / wall, "ttft_p50_s": wall, "ttft_p95_s": wall})
    Path(job["out"]).write_text(json.dumps(rows))


def table(rows):
    """The side-by-side table."""
    lines = [f"{'side':<38} {'clients':>7} {'tokens':>7} {'wall s':>8} {'tokens/s':>9} {'TTFT p50 s':>11} {'TTFT p95 s':>11}"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['side']:<38} {row.get('clients', '-'):>7}  {row['error']}")
            continue
        lines.append(f"{row['side']:<38} {row['clients']:>7} {row['tokens']:>7} {row['wall_s']:>8.2f} "
                     f"{row['tokens_per_s']:>9.2f} {row['ttft_p50_s']:>11.3f} {row['ttft_p95_s']:>11.3f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gemma3_270m_offline")
    parser.add_argument("--clients", default="1,4,16", type=lambda text: [int(c) for c in text.split(",")])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--llama-threads", type=int, default=os.cpu_count(),
                        help="llama.cpp's threads (default: every core; on a busy machine 1 may do better)")
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--drain-timeout", type=float, default=60)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(json.loads(args.child))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "none (an exported working tree)"
    print(f"serving benchmark: {args.preset}, {args.max_tokens} new tokens a client, context {args.context}, "
          f"llama.cpp threads {args.llama_threads}, "
          f"commit {commit}, {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPU cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="keras_tune_serving_") as name:
        folder = Path(name)
        rows = keras_tune_side(args, folder)
        print(table(rows), flush=True)
        if not args.skip_llama:
            rows += llama_side(args, folder)
        rows += keras_hub_side(args, folder)
        for log in sorted(folder.glob("*.log")):
            if any("error" in r for r in rows):
                print(f"--- {log.name} (last lines)\n" + "\n".join(log.read_text().splitlines()[-5:]))
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
