"""Data pipeline benchmark: the seeds' recipe against `keras_tune.data` on MTNT-like pairs.

Two measurements, both on the same deterministic MTNT-like translation pairs
(`benchmarks.common.mtnt_like_pairs`: long-tailed lengths, prompt
"Translate this into French:\\n{source}\\n" + target):

1. **Tokenizer throughput.** The seeds wrap SentencePiece in a per-example
   `tf.numpy_function` inside `tf.data.map` (one Python call an example, under
   the GIL); `keras_tune.data` batches examples and runs the keras-hub tokenizer
   as a TF graph op (tensorflow-text) in a parallel map. Same text, same model.
2. **Batches.** From text to an epoch of `(x, y, sample_weight)` batches through
   `keras_tune.data.pipeline.make_bundle` (the same path `make_datasets` takes
   after `tfds.load`): `pad` is the seeds' recipe (every example padded to
   `seq_len`), `bucket` one example a row in a few lengths, and `auto`, which
   for prompt/target data packs whole pairs into rows (document-masked, none
   split across rows). Figures per full epoch: padding fraction, useful-token
   fraction (non-padding positions), loss-token fraction (target positions),
   and tokens/s of the whole pipeline (real tokens delivered per second,
   tokenizing included). The check: auto's useful-token fraction is at least
   1.5x the seeds'.

The tokenizer is the real Gemma 3 one (rebuilt offline from the registry GGUF)
when the package is installed, else the tiny test tokenizer (`--tokenizer`).

Usage:

```
python benchmarks/data_pipeline.py            # ~30-50 s on 2 cores
python benchmarks/data_pipeline.py --quick    # smoke test, seconds
python benchmarks/data_pipeline.py --json out.json
```

From Python (`benchmarks/run.py`): `from benchmarks.data_pipeline import run; figures = run(quick=True)`.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

REQUIRED_RATIO = 1.5


def load_tokenizer(kind="auto"):
    """Returns (tokenizer, name): the real Gemma 3 tokenizer if available (or asked), else the tiny one."""
    if kind in ("auto", "real"):
        try:
            from keras_tune.models.gguf.registry import registry_gguf_path
            from keras_tune.models.gguf.vocabulary import gguf_tokenizer

            return gguf_tokenizer(registry_gguf_path()), "gemma3 (262k, from the registry GGUF)"
        except Exception:
            if kind == "real":
                raise
    from keras_tune.models.tiny import tiny_tokenizer

    return tiny_tokenizer("gemma3"), "tiny (1k pieces)"


def data_config(batching, seq_len, batch_size):
    import ml_collections

    return ml_collections.ConfigDict(dict(
        seq_len=seq_len, batch_size=batch_size, batching=batching, shuffle_buffer=10000,
        key_tokens=(), key_token_alpha=0.0, cross_document_attention=False,
    ))


def seeds_tokenize(texts, proto):
    """The seeds' wrapper: SentencePiece in a per-example `tf.numpy_function`; returns tokens made."""
    import numpy as np
    import sentencepiece as spm
    import tensorflow as tf

    processor = spm.SentencePieceProcessor(model_proto=proto)

    def encode(text):
        return np.asarray(processor.encode(text.decode("utf-8")), np.int32)

    dataset = tf.data.Dataset.from_tensor_slices(texts).map(
        lambda t: tf.numpy_function(encode, [t], tf.int32), num_parallel_calls=tf.data.AUTOTUNE
    ).prefetch(tf.data.AUTOTUNE)
    return sum(len(ids) for ids in dataset.as_numpy_iterator())


def module_tokenize(texts, tokenizer):
    """`keras_tune.data`'s way: batched graph-op tokenization in tf.data; returns tokens made."""
    from keras_tune.data.tokens import examples_dataset, tokenize

    return int(len(tokenize(examples_dataset([([t], [1.0]) for t in texts]), tokenizer).ids))


def measure_tokenizers(texts, tokenizer, repeats):
    out = {}
    for name, fn in (("seeds_numpy_function", lambda: seeds_tokenize(texts, tokenizer.proto)),
                     ("keras_tune_graph_op", lambda: module_tokenize(texts, tokenizer))):
        best, tokens = float("inf"), 0  # best of `repeats`: the first pays one-time costs
        for _ in range(repeats):
            start = time.perf_counter()
            tokens = fn()
            best = min(best, time.perf_counter() - start)
        out[name] = {"tokens": tokens, "seconds": best, "tokens_per_s": tokens / best}
    return out


def measure_batching(pairs, tokenizer, batching, seq_len, batch_size):
    """Builds the datasets from text and runs one epoch; returns the figures of that epoch."""
    import tensorflow as tf

    from keras_tune.data.mtnt import pair_examples
    from keras_tune.data.pipeline import Source, make_bundle

    features = tf.data.Dataset.from_tensor_slices({"src": [s for s, _ in pairs], "dst": [d for _, d in pairs]})
    source = Source(recipe="mtnt-like", kind="prompt", train=pair_examples(features, common.PROMPT_TEMPLATE),
                    train_source=f"{len(pairs)} synthetic MTNT-like pairs")
    start = time.perf_counter()
    bundle = make_bundle(source, tokenizer, data_config(batching, seq_len, batch_size), seed=0, log=None)
    built = time.perf_counter() - start
    positions = padding = loss = batches = 0
    shapes = set()
    for x, _, weight in bundle.train.as_numpy_iterator():
        positions += x["padding_mask"].size
        padding += int((x["padding_mask"] == 0).sum())  # a bool mask or segment ids
        loss += int((weight > 0).sum())
        batches += 1
        shapes.add(x["token_ids"].shape[1])
    seconds = time.perf_counter() - start
    useful = positions - padding
    return {
        "batching": bundle.report.batching,
        "bucket_lengths": list(bundle.report.bucket_lengths),
        "batches": batches,
        "positions": positions,
        "pad_fraction": padding / positions,
        "useful_fraction": useful / positions,
        "loss_fraction": loss / positions,
        "truncated": bundle.report.train.truncated,
        "dropped": sum(bundle.report.train.dropped.values()),
        "left_out_per_epoch": bundle.report.train.left_out_per_epoch,
        "build_seconds": built,
        "epoch_seconds": seconds,
        "tokens_per_s": useful / seconds,
        "compiled_shapes": len(shapes),
    }


def run(quick=False, tokenizer="auto", seq_len=0, batch_size=8, examples=0):
    """Measures everything; returns the figures as a JSON-ready dict.

    Args:
        quick: a small smoke-test size (2,000 pairs, one repeat).
        tokenizer: "auto", "real" or "tiny".
        seq_len: the seeds' fixed length and the module's longest bucket (0 = 128
            for the real tokenizer, 256 for the tiny one, whose 1k pieces make
            about twice as many tokens of the same text).
        batch_size: rows a batch.
        examples: pairs to use (0 = 2,000 quick, 10,000 full).
    """
    tok, tok_name = load_tokenizer(tokenizer)
    seq_len = seq_len or (256 if tok.vocabulary_size() < 10000 else 128)
    count = examples or (2000 if quick else 10000)
    pairs = common.mtnt_like_pairs(count, seed=0)
    texts = [common.PROMPT_TEMPLATE.format(source=s) + d for s, d in pairs]
    figures = {
        "tokenizer": tok_name,
        "examples": count,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "tokenize": measure_tokenizers(texts, tok, repeats=1 if quick else 2),
        "batching": {},
    }
    for name, batching in (("seeds_pad", "pad"), ("keras_tune_bucket", "bucket"), ("keras_tune_auto", "auto")):
        figures["batching"][name] = measure_batching(pairs, tok, batching, seq_len, batch_size)
    seeds, ours = figures["batching"]["seeds_pad"], figures["batching"]["keras_tune_auto"]
    figures["useful_ratio"] = ours["useful_fraction"] / seeds["useful_fraction"]
    figures["tokenize_speedup"] = (figures["tokenize"]["keras_tune_graph_op"]["tokens_per_s"]
                                   / figures["tokenize"]["seeds_numpy_function"]["tokens_per_s"])
    figures["passes"] = figures["useful_ratio"] >= REQUIRED_RATIO
    return figures


def report(figures):
    """The figures as Markdown tables."""
    lines = [
        f"MTNT-like pairs: {figures['examples']}, tokenizer {figures['tokenizer']}, "
        f"seq_len {figures['seq_len']}, batch {figures['batch_size']}",
        "",
        common.table(
            [dict(name=k, **v) for k, v in figures["tokenize"].items()],
            [("tokenizing", "name"), ("tokens", "tokens"), ("seconds", "seconds"), ("tokens/s", "tokens_per_s")],
        ),
        f"graph-op tokenizing is {figures['tokenize_speedup']:.1f}x the seeds' numpy_function",
        "",
        common.table(
            [dict(name=k, **v) for k, v in figures["batching"].items()],
            [
                ("recipe", "name"),
                ("lengths", lambda r: "/".join(map(str, r["bucket_lengths"]))),
                ("batches", "batches"),
                ("padding", lambda r: f"{r['pad_fraction']:.1%}"),
                ("useful tokens", lambda r: f"{r['useful_fraction']:.1%}"),
                ("loss tokens", lambda r: f"{r['loss_fraction']:.1%}"),
                ("truncated", "truncated"),
                ("pipeline tokens/s", "tokens_per_s"),
                ("seconds", "epoch_seconds"),
            ],
        ),
        f"useful-token fraction, keras_tune auto / seeds' pad: {figures['useful_ratio']:.2f}x "
        f"(required >= {REQUIRED_RATIO}x: {'PASS' if figures['passes'] else 'FAIL'})",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke-test size")
    parser.add_argument("--json", default="", help="write the figures to this JSON file")
    parser.add_argument("--tokenizer", default="auto", choices=("auto", "real", "tiny"))
    parser.add_argument("--seq-len", type=int, default=0, help="0 = 128 (real tokenizer) or 256 (tiny)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=0, help="pairs (0 = 2,000 quick, 10,000 full)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    figures = run(args.quick, args.tokenizer, args.seq_len, args.batch_size, args.examples)
    figures["wall_seconds"] = time.perf_counter() - started
    print(report(figures))
    print(f"total {figures['wall_seconds']:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if figures["passes"] else 1


if __name__ == "__main__":
    sys.exit(main())
