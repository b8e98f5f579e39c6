"""Corpora larger than memory: a run's peak RSS on a 50M-token corpus against a 1M-token one.

Two synthetic Python corpora are written once as codeparrot-style JSONL
(`{"content": ...}` a line), sized in tokens of the tiny Gemma 3 tokenizer the
runs use: 1M and 50M tokens (`--large-tokens`). Each run below is its own child
process, whose peak RSS is `wait4`'s `ru_maxrss`:

- keras_tune with token shards (`--shards on`): the first run on a corpus
  tokenizes it into shards (the tokenizing throughput comes from the shards'
  record), the same command again reuses them;
- keras_tune in memory (`--shards off`): the corpus read and tokenized into
  memory, as below 64 MB of files;
- the plain keras-hub recipe: every text in a Python list, `tf.data` slices of
  it through `Gemma3CausalLMPreprocessor`, `CausalLM.fit`.

Every run trains `gemma3_tiny` for `--steps` steps of batch 8 x 256 tokens, so
the model's share of the memory is the same in each; what differs is the
corpus's. Last, a tokenizer trained on the offline code corpus (the installed
Python sources) is compared with Gemma 3's on held-out files, in tokens a byte.

Usage:

```
flock /tmp/keras_tune_benchmark.lock python benchmarks/corpus.py
python benchmarks/corpus.py --large-tokens 5000000 --steps 5   # the script itself, in minutes
```
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import measure_command, table  # noqa: E402

SEQ_LEN, BATCH = 256, 8
_NAMES = ("df", "data", "frame", "model", "values", "result", "x", "y", "labels", "scores", "rows", "items",
          "total", "count", "features", "target", "preds", "loss", "ax", "fig", "path", "name", "config", "index")
_CALLS = ("pd.read_csv", "np.random.randn", "np.mean", "plt.plot", "plt.scatter", "df.groupby", "model.fit",
          "model.predict", "train_test_split", "np.arange", "sorted", "len", "sum", "max", "min", "print")


def synthetic_file(rng):
    """One Python file of data-science-like code: imports, a few functions, a main block."""
    lines = ["import numpy as np", "import pandas as pd", "import matplotlib.pyplot as plt", ""]
    for _ in range(int(rng.integers(3, 9))):
        name = f"{rng.choice(_NAMES)}_{rng.choice(_NAMES)}_{int(rng.integers(1000))}"
        args = ", ".join(rng.choice(_NAMES, size=int(rng.integers(1, 4)), replace=False))
        lines += [f"def {name}({args}):", f'    """Computes the {rng.choice(_NAMES)} of {args}."""']
        for _ in range(int(rng.integers(3, 12))):
            target, call, arg = rng.choice(_NAMES), rng.choice(_CALLS), rng.choice(_NAMES)
            lines.append(f"    {target} = {call}({arg}, {int(rng.integers(1, 500))})")
            if rng.random() < 0.3:
                lines += [f"    if {target} > {rng.random():.3f}:", f"        {arg} += {int(rng.integers(1, 50))}"]
        lines += [f"    return {rng.choice(_NAMES)}", ""]
    lines += ['if __name__ == "__main__":', f"    {rng.choice(_NAMES)} = {rng.choice(_CALLS)}('data.csv')", ""]
    return "\n".join(lines)


def tokens_per_byte_of_tiny(rng):
    """Tokens a byte the tiny Gemma 3 tokenizer makes on the synthetic code (from 200 files)."""
    import sentencepiece as spm

    from keras_tune.models.tiny import train_tiny_sentencepiece

    processor = spm.SentencePieceProcessor(model_proto=train_tiny_sentencepiece())
    texts = [synthetic_file(rng) for _ in range(200)]
    return sum(len(processor.encode(text)) + 2 for text in texts) / sum(len(t.encode()) for t in texts)


def write_corpus(directory, tokens, per_byte, seed):
    """Writes about `tokens` tokens of synthetic code as JSONL files of ~16 MB; returns the bytes of text."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    target, written, shard = tokens / per_byte, 0, 0
    while written < target:
        with open(directory / f"part-{shard:04d}.jsonl", "w") as file:
            size = 0
            while size < 16 << 20 and written < target:
                text = synthetic_file(rng)
                file.write(json.dumps({"content": text}) + "\n")
                size += len(text)
                written += len(text.encode())
        shard += 1
    return written


def plain_recipe(data_dir, steps):
    """The keras-hub recipe: every text in memory, tokenized by the preprocessor as tf.data runs."""
    import keras
    import keras_hub
    import tensorflow as tf

    import keras_tune
    from keras_tune.models.loader import load_causal_lm

    texts = []
    for path in sorted(Path(data_dir).glob("*.jsonl")):
        with open(path) as file:
            texts += [json.loads(line)["content"] for line in file]
    config = keras_tune.load_config("gemma3_tiny")
    tokenizer = load_causal_lm(config).preprocessor.tokenizer  # the same tiny tokenizer keras_tune's runs use
    preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(tokenizer, sequence_length=SEQ_LEN)
    backbone = keras_hub.models.Gemma3Backbone(**dict(config.model.arch))
    causal_lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)
    causal_lm.compile(optimizer=keras.optimizers.AdamW(1e-4),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      weighted_metrics=[])
    # keras-hub's Gemma 3 preprocessor takes prompts and responses: a document is a response with an
    # empty prompt (loss on every token). `fit` maps the task's preprocessor over the batches.
    dataset = tf.data.Dataset.from_tensor_slices({"prompts": [""] * len(texts), "responses": texts})
    causal_lm.fit(dataset.shuffle(10_000).batch(BATCH, drop_remainder=True), steps_per_epoch=steps, epochs=1,
                  verbose=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-tokens", type=int, default=1_000_000)
    parser.add_argument("--large-tokens", type=int, default=50_000_000)
    parser.add_argument("--steps", type=int, default=20, help="training steps of each run")
    parser.add_argument("--work", default="/tmp/keras_tune_corpus_benchmark", help="corpora, caches and logs")
    parser.add_argument("--skip-large-in-memory", action="store_true",
                        help="leave out the in-memory and keras-hub runs on the large corpus (the slow ones)")
    parser.add_argument("--skip-tokenizer", action="store_true", help="leave out the trained-tokenizer row")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        plain_recipe(args.child[0], int(args.child[1]))
        return

    work = Path(args.work)
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               KERAS_TUNE_CACHE=str(work / "cache"))
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    per_byte = tokens_per_byte_of_tiny(np.random.default_rng(1))
    corpora = {}
    small, large = (f"{tokens / 1e6:g}M" for tokens in (args.small_tokens, args.large_tokens))
    for name, tokens in ((small, args.small_tokens), (large, args.large_tokens)):
        directory = work / f"corpus-{tokens}"
        if not (directory / "done").is_file():
            shutil.rmtree(directory, ignore_errors=True)
            print(f"writing the {name} corpus ({tokens:,} tokens) to {directory} ...", flush=True)
            size = write_corpus(directory, tokens, per_byte, seed=tokens)
            (directory / "done").write_text(str(size))
        corpora[name] = (directory, int((directory / "done").read_text()))
    shutil.rmtree(work / "cache" / "shards", ignore_errors=True)  # the first shards run tokenizes

    rows = []

    def run(corpus_name, label, command):
        directory, size = corpora[corpus_name]
        tag = f"{corpus_name}-{label.replace(' ', '_')}"
        code, peak, wall = measure_command(command, work / f"{tag}.log", env, timeout=3600)
        log = (work / f"{tag}.log").read_text(errors="replace")
        row = {"corpus": corpus_name, "text_mb": size / 1e6, "run": label, "peak_rss_gib": peak / 2**30,
               "wall_s": wall, "exit": code}
        written = [line for line in log.splitlines() if "token shards written" in line]
        if written:
            numbers = written[-1].rsplit("(", 1)[1]  # "(N tokens in S s, R MB/s of text)"
            row["tokens"] = int(numbers.split(" tokens")[0].replace(",", ""))
            row["tokenize_s"] = float(numbers.split(" in ")[1].split(" s")[0])
            row["tokens_per_s"] = row["tokens"] / row["tokenize_s"]
        row["shards"] = "written" if written else ("reused" if "token shards reused" in log else "-")
        if code:
            row["error"] = log.strip().splitlines()[-1][:160] if log.strip() else f"exit {code}"
        rows.append(row)
        print(json.dumps(row), flush=True)

    def fit(corpus_name, shards):
        out = work / f"run-{corpus_name}-{shards}"
        shutil.rmtree(out, ignore_errors=True)
        return [sys.executable, "-m", "keras_tune.fit", "--preset", "gemma3_tiny", "--data", "code",
                "--data-path", str(corpora[corpus_name][0]), "--shards", shards, "--steps", str(args.steps),
                "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH), "--eval-steps", "2", "--output-dir", str(out)]

    for corpus_name in (small, large):
        run(corpus_name, "keras_tune shards", fit(corpus_name, "on"))
        run(corpus_name, "keras_tune shards again", fit(corpus_name, "on"))
    for corpus_name in (small,) if args.skip_large_in_memory else (small, large):
        run(corpus_name, "keras_tune in memory", fit(corpus_name, "off"))
        run(corpus_name, "keras-hub recipe", [sys.executable, __file__, "--child", str(corpora[corpus_name][0]),
                                              str(args.steps)])

    print(f"\n## A run on a {args.large_tokens:,}-token corpus against a {args.small_tokens:,}-token one "
          f"(gemma3_tiny, {args.steps} steps of {BATCH} x {SEQ_LEN})\n")
    print(table(rows, [("corpus", "corpus"), ("text MB", "text_mb"), ("run", "run"), ("shards", "shards"),
                       ("tokens", "tokens"), ("tokenize s", "tokenize_s"), ("tokens/s", "tokens_per_s"),
                       ("peak RSS GiB", "peak_rss_gib"), ("wall s", "wall_s"), ("error", "error")]))
    peaks = {(row["corpus"], row["run"]): row["peak_rss_gib"] for row in rows if not row.get("error")}
    small_peak, large_peak = peaks.get((small, "keras_tune shards")), peaks.get((large, "keras_tune shards"))
    figures = {"rows": rows, "tokens_per_byte_tiny": per_byte}
    if small_peak and large_peak:
        figures["large_over_small_peak"] = large_peak / small_peak
        print(f"\n- peak RSS, {large}-token corpus over {small}-token corpus, token shards: "
              f"{large_peak / small_peak:.3f}")

    if not args.skip_tokenizer:
        model = work / "code.model"
        model.unlink(missing_ok=True)
        command = [sys.executable, "-m", "keras_tune.tokenizer", "train", "--data", "code", "--max-examples", "3000",
                   "--vocab-size", "16384", "--output", str(model)]
        code, peak, wall = measure_command(command, work / "tokenizer.log", env)
        last = (work / "tokenizer.log").read_text(errors="replace").strip().splitlines()
        figures["tokenizer"] = {"command": " ".join(command[1:]), "exit": code, "peak_rss_gib": peak / 2**30,
                                "wall_s": wall, "output": last[-2:]}
        print(f"\n- `{' '.join(command[1:])}` ({wall:.0f} s, peak RSS {peak / 2**30:.2f} GiB): " + " / ".join(last[-2:]))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
