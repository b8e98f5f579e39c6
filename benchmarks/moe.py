"""Gemma 4 mixture of experts: keras_tune's top-k dispatch against keras-hub's dense expert computation.

keras-hub 0.32's `Gemma4MoEBlock` runs every token through every expert (an
`[experts, tokens, width]` product) and zeroes what the router did not pick;
keras_tune's `SparseExperts` sorts the `[tokens x k]` assignments by expert and
multiplies each expert by its own rows only (`keras_tune.models.gemma4.moe`).
This script trains the same model both ways and reports step time and peak
memory:

- the architecture is `gemma4_moe_tiny`'s (dense MLP beside the experts, k = v
  global layers), scaled up by the flags below to what a CPU machine holds; by
  default 128 experts of which each token uses 8, and experts a quarter as wide
  as the model, as in the 26B-A4B;
- a preparation child builds keras_tune's `Gemma4TextBackbone` once with random
  weights and writes them by variable path; each measured child loads them into
  its model (keras_tune's `Gemma4TextCausalLM`, or keras-hub's own
  `Gemma4CausalLM`), puts LoRA (rank 4) on `query` and `value` the same way,
  and runs Keras `fit` (Adam, cross-entropy on the logits) for `--steps` steps
  on the same random token batches;
- each side is its own child process (one CPU device, XLA's memory-optimized CPU
  schedule on both, as `import keras_tune` asks for it), so its peak RSS
  (`ru_maxrss`) is its own; the first step (compile) is left out of the step time;
- the first step's loss of both sides is printed: the same weights and tokens
  give the same loss, so the two compute the same function.

Usage:

```
flock /tmp/keras_tune_benchmark.lock python benchmarks/moe.py
python benchmarks/moe.py --experts 8 --top-k 2 --hidden 64 --expert-width 32 --seq-len 32 --steps 3   # seconds
```
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import child_main, make_step_timer, short_error, spawn, table  # noqa: E402

SIDES = (("keras_tune", "keras_tune top-k dispatch"), ("keras_hub", "keras-hub dense experts"))
LORA_TARGETS = ("query", "value")


def architecture(args):
    """`gemma4_moe_tiny`'s backbone arguments with the sizes the flags ask for."""
    from keras_tune import config as config_lib

    arch = dict(config_lib.load_config("gemma4_moe_tiny").model.arch)
    heads = max(1, args.hidden // 64)
    arch.update(
        num_layers=args.layers, hidden_dim=args.hidden, intermediate_dim=2 * args.hidden,
        num_query_heads=heads, num_key_value_heads=max(1, heads // 2), num_global_key_value_heads=1,
        head_dim=args.hidden // heads, global_head_dim=2 * (args.hidden // heads),
        sliding_window_size=max(16, args.seq_len // 2), num_experts=args.experts,
        expert_intermediate_dim=args.expert_width, num_experts_per_token=args.top_k,
    )
    return arch


# ---------------------------------------------------------------------------
# Children


def prepare(job):
    """Builds keras_tune's backbone once with random weights (norm scales too) and writes them by path."""
    import numpy as np

    from keras_tune import compat
    from keras_tune.models.gemma4 import Gemma4TextBackbone

    compat.set_random_seed(0)
    backbone = Gemma4TextBackbone(**job["arch"], dtype="float32")
    rng = np.random.default_rng(0)
    arrays = {}
    for variable in backbone.weights:
        value = np.asarray(variable.numpy())
        if variable.path.endswith("scale"):  # exactly 1 would hide a scale applied wrongly
            value = (1.0 + rng.normal(0.0, 0.2, size=value.shape)).astype("float32")
        arrays[variable.path] = value
    np.savez(job["weights"], **arrays)
    return {"parameters": int(sum(a.size for a in arrays.values()))}


def _model(job):
    """The side's CausalLM with the prepared weights and LoRA on `LORA_TARGETS`, and the inputs it takes."""
    import keras_hub
    import numpy as np

    from keras_tune.lora import apply_lora
    from keras_tune.models.gemma4 import Gemma4TextBackbone, Gemma4TextCausalLM

    arch = job["arch"]
    if job["kind"] == "keras_tune":
        causal_lm = Gemma4TextCausalLM(preprocessor=None, backbone=Gemma4TextBackbone(**arch, dtype="float32"))
    else:
        backbone = keras_hub.models.Gemma4Backbone(**arch, image_size=None, dtype="float32")  # text only
        causal_lm = keras_hub.models.Gemma4CausalLM(preprocessor=None, backbone=backbone)
    with np.load(job["weights"]) as arrays:
        for variable in causal_lm.backbone.weights:
            variable.assign(arrays[variable.path])
    if job["kind"] == "keras_tune":
        apply_lora(causal_lm, 4, LORA_TARGETS)
    else:
        causal_lm.backbone.enable_lora(4, list(LORA_TARGETS))  # the keras-hub recipe's own call
    return causal_lm


def _batches(job):
    """`(x, y)` of `steps x batch` rows of random tokens (the same on both sides); keras-hub also takes positions."""
    import numpy as np

    rows, length = job["steps"] * job["batch"], job["seq_len"]
    tokens = np.random.default_rng(1).integers(3, job["arch"]["vocabulary_size"], size=(rows, length + 1))
    tokens = tokens.astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((rows, length), "int32")}
    if job["kind"] == "keras_hub":
        x["position_ids"] = np.broadcast_to(np.arange(length, dtype="int32"), (rows, length)).copy()
    return x, tokens[:, 1:]


def train(job):
    """Runs `steps` LoRA training steps on one side; returns its step times and first loss."""
    import keras

    causal_lm = _model(job)
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"])))
    timer = make_step_timer(job)
    x, y = _batches(job)
    causal_lm.fit(x, y, batch_size=job["batch"], epochs=1, shuffle=False, verbose=0, callbacks=[timer, record])
    tokens = job["batch"] * job["seq_len"]
    summary = timer.summary(tokens)
    return {"first_loss": losses[0], "step_ms": summary["step_ms_median"], "first_step_s": summary["first_step_s"],
            "steady_steps": summary["steady_steps"], "tokens_per_s": summary["tokens_per_s"]}


# ---------------------------------------------------------------------------
# Parent


def expert_gflop(arch, tokens, experts):
    """Forward GFLOP of the expert matrices per step (gate, up, down) when each token meets `experts` experts."""
    return 3 * 2 * tokens * arch["hidden_dim"] * arch["expert_intermediate_dim"] * experts * arch["num_layers"] / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=128, help="experts per MoE block (26B-A4B: 128)")
    parser.add_argument("--top-k", type=int, default=8, help="experts per token (26B-A4B: 8)")
    parser.add_argument("--hidden", type=int, default=512, help="model width")
    parser.add_argument("--expert-width", type=int, default=128,
                        help="each expert's intermediate width (26B-A4B: a quarter of the model width, as here)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6, help="training steps a side (the first compiles)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds a child may run")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main({"prepare": prepare, "keras_tune": train, "keras_hub": train})
        return

    work = Path(tempfile.mkdtemp(prefix="kt_bench_moe_"))
    try:
        arch = architecture(args)
        job = {"arch": arch, "weights": str(work / "weights.npz"), "steps": args.steps, "batch": args.batch,
               "seq_len": args.seq_len}
        prepared = spawn(__file__, dict(job, kind="prepare", name="prepare"), 1, args.timeout, work)
        if "error" in prepared:
            sys.exit(f"preparation failed: {prepared['error']}")
        tokens = args.batch * args.seq_len
        rows = []
        for kind, label in SIDES:
            result = spawn(__file__, dict(job, kind=kind, name=kind), 1, args.timeout, work)
            result.update(side=label, expert_gflop=expert_gflop(arch, tokens, args.top_k if kind == "keras_tune"
                                                                else args.experts))
            rows.append(result)
            print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ours, theirs = rows
    print(f"\n## Gemma 4 MoE: {args.layers} layers, width {args.hidden}, {args.experts} experts of width "
          f"{args.expert_width}, top {args.top_k}; {prepared['parameters'] / 1e6:.0f}M parameters; "
          f"batch {args.batch} x {args.seq_len} tokens; LoRA rank 4 on {'/'.join(LORA_TARGETS)}; "
          f"{args.steps} steps, the first (compile) left out\n")
    print(table(rows, [("side", "side"), ("step ms (median)", "step_ms"), ("tokens/s", "tokens_per_s"),
                       ("first step s", "first_step_s"), ("peak RSS MiB", "peak_rss_mb"),
                       ("expert GFLOP/step (fwd)", "expert_gflop"), ("first loss", lambda r: f"{r['first_loss']:.5f}" if "first_loss" in r else None),
                       ("error", lambda r: short_error(r["error"]) if "error" in r else None)]))
    if "error" not in ours and "error" not in theirs:
        print(f"\n- step time, keras-hub / keras_tune: {theirs['step_ms'] / ours['step_ms']:.2f}x; "
              f"peak RSS, keras-hub / keras_tune: {theirs['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x")
        print(f"- first-step loss: {ours['first_loss']:.6f} (keras_tune) vs {theirs['first_loss']:.6f} (keras-hub), "
              f"|diff| {abs(ours['first_loss'] - theirs['first_loss']):.2g}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "parameters": prepared["parameters"],
                                               "rows": rows}, indent=1, default=float))


if __name__ == "__main__":
    main()
