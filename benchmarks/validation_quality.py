"""Validation loss and perplexity of the real Gemma 3 270M: sparse vs full loss, float vs int8/int4 base.

No training: each row builds `gemma3_270m_offline` the way `fit` does
(`build_model`, `setup_data`, `compile_model`) and evaluates the same
validation batches, so the rows differ only in the loss path or the base's
quantization. The sparse and full rows must agree to float32 rounding (issue:
"the real 270M's validation loss unchanged to 1e-4"); the quantized rows say
what `--quantize` costs in quality before any LoRA training.

Data: the standard library's Python source in 1,500-character chunks (the same
corpus as `benchmarks/loss_path.py`), batch 2 x 128, `pad` batching, the last
quarter of the examples as validation.

Usage: `python benchmarks/validation_quality.py [--examples 64]` (about 5 minutes on 2 CPU cores).
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS = [
    ("float32 base, sparse loss (default)", {"train.loss": "sparse"}),
    ("float32 base, full logits (keras-hub's path)", {"train.loss": "full"}),
    ("int8 base, sparse loss", {"train.loss": "sparse", "train.quantize": "int8"}),
    ("int4 base, sparse loss", {"train.loss": "sparse", "train.quantize": "int4"}),
]


def evaluate_row(data_path, examples, overrides, devices=None):
    """`(loss, perplexity, accuracy, tokens)` of one row over the validation split.

    Args:
        data_path: the code corpus JSONL.
        examples: examples read (a quarter validate).
        overrides: the row's config overrides.
        devices: devices of the 1x1 mesh (default: all, which must be one).
    """
    import numpy as np

    import keras_tune
    from keras_tune import training
    from keras_tune.models.loader import build_model

    config = keras_tune.load_config("gemma3_270m_offline", overrides={
        "distribution.mesh": "1x1", "data.name": "text", "data.path": data_path, "data.seq_len": 128,
        "data.batch_size": 2, "data.batching": "pad", "data.validation_fraction": 0.25,
        "data.max_examples": examples, "train.steps": 1, "train.sample_prompts": (), **overrides,
    })
    state = training.RunState(config=config, causal_lm=build_model(config, lora=True, devices=devices).causal_lm)
    training.setup_data(state)
    training.compile_model(state)
    with training.detached_preprocessor(state.trainer):
        result = state.trainer.evaluate(state.data.validation, verbose=0, return_dict=True)
    tokens = sum(float(np.sum(w > 0)) for _, _, w in state.data.validation.as_numpy_iterator())
    return result["loss"], result["perplexity"], result["accuracy"], tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=64, help="examples read (a quarter validate)")
    args = parser.parse_args(argv)
    from benchmarks.loss_path import write_code_corpus

    data_path = write_code_corpus(tempfile.mkdtemp(prefix="kt_quality_"), count=args.examples)
    rows = []
    for label, overrides in ROWS:
        loss, perplexity, accuracy, tokens = evaluate_row(data_path, args.examples, overrides)
        rows.append((label, loss, perplexity, accuracy, tokens))
        print(f"  {label}: loss {loss:.6f}, perplexity {perplexity:.4f}", flush=True)
    print("\n| base and loss path | val loss | val perplexity | val accuracy | loss tokens |")
    print("|---|---|---|---|---|")
    for label, loss, perplexity, accuracy, tokens in rows:
        print(f"| {label} | {loss:.6f} | {perplexity:.4f} | {accuracy:.4f} | {tokens:.0f} |")
    sparse, full = rows[0][1], rows[1][1]
    print(f"\nsparse vs full: relative difference {abs(sparse - full) / abs(full):.2e} (issue: <= 1e-4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
