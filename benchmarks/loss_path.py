"""The training path's levers on the real Gemma 3 270M, side by side with the plain keras-hub recipe.

Every row trains the real `gemma3_270m_offline` (GGUF weights dequantized to
float32) with LoRA rank 4 on one CPU device, batch 2 x 128, in its own child
process (its peak RSS is its own). Sides of a group start together and train in
turns of a few steps (`common.run_in_turns`), so they see the same machine load.

- **MTNT-like** (prompt/target pairs, loss on targets): the keras-hub recipe
  (pad, keras-hub's full logits); keras_tune at the same padded shapes with the
  sparse loss (the default: head and cross-entropy only at loss positions, in
  chunks) and with `train.loss=full`; keras_tune `auto` (whole pairs packed into
  rows, document-masked, + sparse); and
  `--quantize int8` (the frozen base in int8, QLoRA-style).
- **Code** (Python source, loss on every token): the keras-hub recipe (pad)
  against keras_tune `pack` with document masking (the default) and without
  (`data.cross_document_attention=true`).
- **Batch 8 x 1,024**: what XLA plans for one train step (arguments + outputs +
  temporaries of the compiled `value_and_grad`), plain full logits against the
  sparse chunked loss, from the compiled program's `memory_analysis()`: at that
  size the plain path's logits alone are 8 GiB, more than this machine should
  be asked to hold twice, so it is compiled, not run.

Usage: `python benchmarks/loss_path.py [--json out.json]` (about 15-25 minutes).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.step_throughput import COLUMNS, _merge, _table_rows, keras_tune_side, plain_side  # noqa: E402

SCRIPT = Path(__file__).resolve()
REAL = dict(preset="gemma3_270m_offline", mesh="1x1", seq_len=128, batch=2, steps=12, turn_steps=2, lora_rank=4)
SPARSE, FULL = {"train.loss": "sparse"}, {"train.loss": "full"}
GROUPS = {
    "mtnt": [
        ("plain", "pad", {}, "keras-hub recipe (pad)"),
        ("keras_tune", "pad", SPARSE, "keras_tune pad, sparse loss"),
        ("keras_tune", "auto", SPARSE, "keras_tune auto, sparse loss"),
    ],
    "mtnt_more": [
        ("keras_tune", "pad", FULL, "keras_tune pad, full logits"),
        ("keras_tune", "pad", dict(SPARSE, **{"train.quantize": "int8"}), "keras_tune pad, sparse, int8 base"),
    ],
    "code": [
        ("plain", "pad", {}, "keras-hub recipe on code (pad)"),
        ("keras_tune", "pack", SPARSE, "keras_tune pack, document masking"),
        ("keras_tune", "pack", dict(SPARSE, **{"data.cross_document_attention": True}),
         "keras_tune pack, cross-document attention"),
    ],
}


def write_code_corpus(directory, count=96, chars=1500):
    """`count` chunks of the standard library's Python source, as `{"text"}` JSONL (deterministic)."""
    import sysconfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    chunks = []
    for path in files:
        text = path.read_text(errors="replace")
        for start in range(0, len(text) - chars, chars * 4):
            chunks.append(text[start:start + chars])
            if len(chunks) == count:
                break
        if len(chunks) == count:
            break
    out = directory / "code.jsonl"
    out.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks))
    return str(out)


def compiled_memory(job):
    """XLA's plan for one train step at batch x seq_len: plain full logits vs the sparse chunked loss."""
    import jax
    import jax.numpy as jnp
    import keras

    import keras_tune
    from keras_tune import losses
    from keras_tune.environment import cpu_schedule_options
    from keras_tune.models.loader import build_model

    config = keras_tune.load_config(job["preset"], overrides={"distribution.mesh": "1x1", "lora.rank": 4})
    causal_lm = build_model(config, lora=True, devices=jax.devices()[:1]).causal_lm
    batch, length = job["big_batch"], job["big_seq_len"]
    x = {"token_ids": jax.ShapeDtypeStruct((batch, length), jnp.int32),
         "padding_mask": jax.ShapeDtypeStruct((batch, length), jnp.int32)}
    y = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    w = jax.ShapeDtypeStruct((batch, length), jnp.float32)
    out = {}
    for name, model, extra in (("plain", causal_lm, {}),
                               ("sparse", losses.SparseLossModel(causal_lm, config.train.loss_chunk_tokens),
                                {"loss_positions": jax.ShapeDtypeStruct((batch, length), jnp.int32),
                                 "targets": y})):
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_fn(values, inputs, targets, weights, model=model):
            output, _ = model.stateless_call(values, non_trainable, inputs, training=True)
            if isinstance(model, losses.SparseLossModel):
                per = output[..., 0]
            else:
                per = keras.losses.sparse_categorical_crossentropy(targets, output, from_logits=True)
            return (per * weights).sum() / weights.sum()

        # The recipe's plan under XLA's default CPU schedule (keras_tune asks for the memory-optimized one).
        options = cpu_schedule_options("CPU_SCHEDULER_TYPE_DEFAULT" if name == "plain" else None)
        compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(trainable, {**x, **extra}, y, w).compile(options)
        stats = compiled.memory_analysis()
        total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
        out[name] = {"temp_gib": round(stats.temp_size_in_bytes / 2**30, 2), "total_gib": round(total / 2**30, 2)}
        print(f"  {name}: {out[name]}", flush=True)
    out["logits_gib_plain"] = round(batch * length * causal_lm.backbone.vocabulary_size * 4 / 2**30, 2)
    return out


HANDLERS = {"plain": plain_side, "keras_tune": keras_tune_side, "compiled_memory": compiled_memory}


def run(log_dir=None, timeout=900):
    """Runs every group and the compiled-memory job; returns the figures."""
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="kt_bench_loss_"))
    mtnt_path, _ = common.write_mtnt_like(log_dir / "data", REAL["steps"] * REAL["batch"] * 2, seed=1)
    code_path = write_code_corpus(log_dir / "data")
    rows = []
    for group, sides in GROUPS.items():
        jobs = []
        for kind, batching, overrides, label in sides:
            jobs.append(dict(REAL, kind=kind, batching=batching, overrides=overrides, label=label,
                             data_path=code_path if group == "code" else mtnt_path,
                             name=f"{group}-{len(jobs)}-{kind}-{batching}"))
        for job, result in zip(jobs, common.run_in_turns(SCRIPT, jobs, 1, timeout, log_dir, REAL["turn_steps"])):
            result["label"] = job["label"]
            print(f"  {job['label']}: " + (result.get("error") or f"{result.get('steps_per_s_robust')} steps/s, "
                  f"peak RSS {result.get('peak_rss_mb')} MiB"), flush=True)
            rows.append(result)
    big = dict(preset=REAL["preset"], kind="compiled_memory", name="compiled-8x1024", big_batch=8, big_seq_len=1024)
    memory = common.spawn(SCRIPT, big, 1, timeout, log_dir)
    merged = _merge(rows)
    return {"setting": REAL, "rows": merged, "ratios": ratios(merged), "compiled_8x1024": memory,
            "log_dir": str(log_dir)}


def ratios(rows):
    """The issue's figures: each keras_tune side against the keras-hub recipe of its data."""
    by = {r["label"]: r for r in rows}

    def ratio(mine, theirs, key):
        a, b = by.get(mine, {}).get(key), by.get(theirs, {}).get(key)
        return round(a / b, 3) if a and b else None

    plain, code = "keras-hub recipe (pad)", "keras-hub recipe on code (pad)"
    return {
        "mtnt_pad_sparse_steps_per_s_vs_plain": ratio("keras_tune pad, sparse loss", plain, "steps_per_s_robust"),
        "mtnt_pad_full_steps_per_s_vs_plain": ratio("keras_tune pad, full logits", plain, "steps_per_s_robust"),
        "mtnt_auto_loss_tokens_per_s_vs_plain": ratio("keras_tune auto, sparse loss", plain,
                                                      "loss_tokens_per_s_robust"),
        "mtnt_int8_peak_rss_vs_plain": ratio("keras_tune pad, sparse, int8 base", plain, "peak_rss_mb"),
        "code_pack_steps_per_s_vs_plain": ratio("keras_tune pack, document masking", code, "steps_per_s_robust"),
        "code_pack_peak_rss_vs_plain": ratio("keras_tune pack, document masking", code, "peak_rss_mb"),
        "code_masking_steps_per_s_vs_unmasked": ratio("keras_tune pack, document masking",
                                                      "keras_tune pack, cross-document attention",
                                                      "steps_per_s_robust"),
    }


def report(result):
    """The tables as text."""
    lines = [f"Real {REAL['preset']}, LoRA r4, batch {REAL['batch']} x {REAL['seq_len']}, {REAL['steps']} steps, "
             "one CPU device", "", common.table(_table_rows(result), COLUMNS), ""]
    lines += [f"- {name}: {value}x" for name, value in result["ratios"].items()]
    memory = result["compiled_8x1024"]
    if "error" not in memory:
        lines += ["", f"Batch 8 x 1,024, XLA's plan for one train step (plain logits alone "
                      f"{memory['logits_gib_plain']} GiB):",
                  f"- plain full logits: {memory['plain']['total_gib']} GiB ({memory['plain']['temp_gib']} GiB temporaries)",
                  f"- sparse chunked loss: {memory['sparse']['total_gib']} GiB "
                  f"({memory['sparse']['temp_gib']} GiB temporaries)"]
    return "\n".join(lines)


def main(argv=None):
    if "--child" in (argv or sys.argv):
        common.child_main(HANDLERS)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    result = run()
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
