"""Step throughput: the seeds' hand-written keras-hub recipe against `keras_tune.training.run`.

Both sides train the same tiny random-init Gemma (`gemma_tiny`: 2 layers, 8 query
and 8 key/value heads, so keras-hub's own layout map works on a 1x8 mesh) on the
same MTNT-like text (short prompt/target pairs, long-tailed lengths), with the
same mesh, global batch, sequence length, LoRA rank and step count:

- **plain**: the recipe of the Keras distributed-Gemma tutorial, written out by
  hand: `DeviceMesh((1, 8), ("batch", "model"))`, `GemmaBackbone.get_layout_map`,
  `ModelParallel`, `GemmaCausalLM(backbone, preprocessor)`, `enable_lora(rank=4)`,
  AdamW(5e-5, weight_decay=0.01) excluding bias/scale from decay, `compile`, then
  `fit(list_of_strings, batch_size=B)`: the preprocessor pads every example to
  the fixed length and the loss covers prompt and target alike.
- **keras_tune**: `keras_tune.training.run(config)` on the same text written as
  prompt/response JSONL (`--data text`), with `batching` pad (equal padded
  shapes: the toolkit's own cost), auto (whole pairs packed into rows, each
  attending only to itself, loss on targets only) or bucket (one pair a row in a
  few lengths, for reference).

Each side runs in its own child process (its peak RSS is its own). In a round
all sides start at once, build everything, then take turns of a few steps
each (`common.run_in_turns`), so every side sees the same load on a shared
machine; a second round reverses the order. keras_tune's batches are made by
its own pipeline, then replayed in the same order so each step's token counts
are known exactly (the pipeline's per-batch cost is `data_pipeline.py`'s
subject). Figures: steps/s, padded tokens/s, non-pad tokens/s and loss tokens/s
over the steady steps (compile steps left out; each step counted at the median
time of its shape), first-step (compile) time, XLA compile seconds, non-pad
tokens/s including compiles, peak RSS.

`--real` adds the real Gemma 3 270M (`gemma3_270m_offline`, GGUF weights from the
registry package, LoRA rank 4) on meshes 1x1 and 1x2 of the two real cores.

Usage:

```
python benchmarks/step_throughput.py            # tiny preset, 8 simulated devices (~2-5 min)
python benchmarks/step_throughput.py --quick    # smoke setting
python benchmarks/step_throughput.py --real     # plus Gemma 3 270M on 1x1 and 1x2 (~10 min more)
python benchmarks/step_throughput.py --only-real
```
"""

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

SCRIPT = Path(__file__).resolve()

# The default (full) setting and the smoke setting. In the full setting every
# side of a round runs at once in its own process, taking turns of `turn_steps`
# steps (`common.run_in_turns`); rounds repeat with the turn order reversed.
# (kind, batching, rounds it runs in): bucket is shown once, for reference.
SIDES = (("plain", "pad", 2), ("keras_tune", "pad", 2), ("keras_tune", "auto", 2), ("keras_tune", "bucket", 1))
SETTINGS = {
    # seq_len 256: the tiny preset's 1,024-piece tokenizer cuts this text into about
    # twice as many tokens as Gemma's 262k vocabulary, so 256 here pads as much as
    # 128 does with the real tokenizer (about two thirds of every padded row).
    "full": dict(preset="gemma_tiny", mesh="1x8", devices=8, seq_len=256, batch=8, steps=60, rounds=2,
                 turn_steps=5, sides=SIDES, examples=480),
    "quick": dict(preset="gemma_tiny", mesh="1x8", devices=8, seq_len=64, batch=8, steps=4, rounds=1,
                  turn_steps=0, sides=tuple((k, b, 1) for k, b, _ in SIDES[:3]), examples=32),
}
REAL = dict(preset="gemma3_270m_offline", seq_len=128, batch=2, steps=16, turn_steps=2, meshes=("1x1", "1x2"),
            examples=16)

# ---------------------------------------------------------------------------
# Children: one side each.


def _devices(mesh):
    import keras

    batch, model = (int(n) for n in mesh.split("x"))
    return batch, model, keras.distribution.list_devices()[: batch * model]


def _inline_layout_map(mesh):
    """The Keras distributed-Gemma tutorial's LayoutMap, written inline (keras-hub has none for Gemma 3)."""
    import keras

    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["token_embedding/embeddings"] = ("model", None)
    layout_map["decoder_block.*attention.*(query|key|value).kernel"] = ("model", None, None)
    layout_map["decoder_block.*attention_output.kernel"] = ("model", None, None)
    layout_map["decoder_block.*ffw_gating.*kernel"] = (None, "model")
    layout_map["decoder_block.*ffw_linear.kernel"] = ("model", None)
    return layout_map


def plain_side(job):
    """The hand-written keras-hub recipe, as the seed notebooks do it."""
    import time

    import keras
    import keras_hub
    import numpy as np

    from keras_tune import config as config_lib

    started = time.perf_counter()
    config = config_lib.load_config(job["preset"])
    keras.utils.set_random_seed(0)
    batch, model, devices = _devices(job["mesh"])
    mesh = keras.distribution.DeviceMesh(shape=(batch, model), axis_names=("batch", "model"), devices=devices)
    real = config.model.source == "gguf"
    # keras-hub's own map for Gemma; Gemma 3 has none, so the tutorial's map inline.
    layout_map = _inline_layout_map(mesh) if real else keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    )
    if real:
        # Weights only through keras_tune's GGUF importer (keras-hub reads no GGUF).
        from keras_tune.models.gguf.load import load_gguf_causal_lm
        from keras_tune.models.gguf.registry import registry_gguf_path

        causal_lm = load_gguf_causal_lm(registry_gguf_path(), sequence_length=job["seq_len"])
        preprocessor = causal_lm.preprocessor
    else:
        # Offline tokenizer only: the same one the tiny preset uses.
        from keras_tune.models.tiny import tiny_tokenizer

        preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(
            tokenizer=tiny_tokenizer("gemma"), sequence_length=job["seq_len"]
        )
        backbone = keras_hub.models.GemmaBackbone(**config.model.arch)
        causal_lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
    causal_lm.backbone.enable_lora(rank=job["lora_rank"])
    optimizer = keras.optimizers.AdamW(learning_rate=5e-5, weight_decay=0.01)
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
    causal_lm.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=optimizer,
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    built_s = time.perf_counter() - started
    count = job["steps"] * job["batch"]
    if real:
        # keras-hub's Gemma 3 preprocessor takes prompts and responses (loss on responses only).
        with open(job["data_path"]) as file:
            records = [json.loads(line) for line in file]
        records = (records * (1 + count // len(records)))[:count]
        # A document ({"text"}) is a response with an empty prompt: loss on every token.
        inputs = {"prompts": [r.get("prompt", "") for r in records],
                  "responses": [r.get("response", r.get("text")) for r in records]}
    else:
        strings = common.read_plain_strings(job["data_path"])
        inputs = (strings * (1 + count // len(strings)))[:count]
    timer = common.make_step_timer(job)
    causal_lm.fit(inputs, batch_size=job["batch"], epochs=1, callbacks=[timer], verbose=0)
    # Exact padding of what was trained on: one epoch over exactly these examples.
    x, _, weight = preprocessor(inputs)
    nonpad = float(np.asarray(x["padding_mask"]).sum()) / job["steps"]
    loss = float((np.asarray(weight) > 0).sum()) / job["steps"]
    result = timer.summary(job["batch"] * job["seq_len"], nonpad, loss)
    positions = job["batch"] * job["seq_len"]
    result.update(side="plain", build_s=round(built_s, 2), mean_nonpad_per_step=nonpad,
                  mean_positions_per_step=positions, pad_fraction=round(1 - nonpad / positions, 4))
    return result


def replay_dataset(batches):
    """A tf.data.Dataset giving `batches` (numpy `(x, y, w)` tuples) in this order, from every iterator.

    One in-memory dataset a batch shape, merged by a fixed choice sequence: no
    Python runs per batch, and the order never reshuffles.
    """
    import numpy as np
    import tensorflow as tf

    shapes = sorted({b[1].shape for b in batches})
    parts = []
    for shape in shapes:
        group = [b for b in batches if b[1].shape == shape]
        x = {key: np.stack([b[0][key] for b in group]) for key in group[0][0]}
        parts.append(tf.data.Dataset.from_tensor_slices(
            (x, np.stack([b[1] for b in group]), np.stack([b[2] for b in group]))
        ))
    if len(parts) == 1:
        return parts[0].prefetch(tf.data.AUTOTUNE)
    choice = tf.data.Dataset.from_tensor_slices(np.array([shapes.index(b[1].shape) for b in batches], np.int64))
    return tf.data.Dataset.choose_from_datasets(parts, choice).prefetch(tf.data.AUTOTUNE)


def keras_tune_side(job):
    """`keras_tune.training.run(config)`, its training batches replayed in a known order (see below)."""
    import time

    import numpy as np

    import keras_tune
    import keras_tune.data as data_lib
    from keras_tune import training

    started = time.perf_counter()
    batch, model, devices = _devices(job["mesh"])
    overrides = {
        "distribution.mesh": job["mesh"],
        "data.name": "text",
        "data.path": job["data_path"],
        "data.seq_len": job["seq_len"],
        "data.batch_size": job["batch"],
        "data.batching": job["batching"],
        "data.validation_fraction": 0.0,
        "data.max_examples": 0,
        "train.steps": job["steps"],
        "train.output_dir": common.run_output_dir(job, job.get("name", "job")),
        "lora.rank": job["lora_rank"],
        "optimizer.learning_rate": 5e-5,
        "optimizer.weight_decay": 0.01,
        # The recipe generates nothing; the preset's before/after samples would add
        # generation's compile and memory to one side only.
        "train.sample_prompts": (),
    }
    overrides.update(job.get("overrides", {}))  # the loss path, quantization, document masking...
    config = keras_tune.load_config(job["preset"], overrides=overrides)

    # The exact batches keras_tune's pipeline makes for this run, replayed in order,
    # so step i's token counts are known. (Keras peeks at one batch through a
    # separate iterator before training, and the pipeline reshuffles per iterator,
    # so counting inside the live pipeline cannot be matched to steps.) The
    # pipeline's own per-batch cost is measured by benchmarks/data_pipeline.py.
    counts, info = [], {}
    make_datasets = data_lib.make_datasets

    def replaying_make_datasets(*args, **kwargs):
        bundle = make_datasets(*args, **kwargs)
        if not job.get("replay", True):  # diagnosis only: the live pipeline, per-step counts unknown
            info["report"] = bundle.report
            info["built_s"] = time.perf_counter() - started
            counts[:] = [(1, 1, job["batch"] * job["seq_len"])] * job["steps"]
            return bundle
        batches = list(bundle.train_stream().take(job["steps"]).as_numpy_iterator())
        counts[:] = [(int((x["padding_mask"] != 0).sum()), int((w > 0).sum()), int(x["padding_mask"].size))
                     for x, _, w in batches]  # a mask or segment ids: non-zero is a real token
        bundle.train = replay_dataset(batches)
        bundle.stream = None  # fit trains on `train` repeated: the replay
        info["report"] = bundle.report
        info["built_s"] = time.perf_counter() - started
        return bundle

    data_lib.make_datasets = replaying_make_datasets
    timer = common.make_step_timer(job)
    try:
        training.run(config, devices=devices, callbacks=[timer])
    finally:
        data_lib.make_datasets = make_datasets
    steps = len(timer.ends)
    result = timer.summary(
        lambda i: counts[i][2], lambda i: counts[i][0], lambda i: counts[i][1]
    )
    report = info["report"]
    result.update(
        side="keras_tune",
        batching=report.batching,
        buckets=list(report.bucket_lengths),
        build_s=round(info["built_s"], 2),
        mean_nonpad_per_step=float(np.mean([c[0] for c in counts[:steps]])),
        mean_positions_per_step=float(np.mean([c[2] for c in counts[:steps]])),
        pad_fraction=round(1 - sum(c[0] for c in counts[:steps]) / sum(c[2] for c in counts[:steps]), 4),
    )
    return result


def many(job):
    """Several jobs in one process (the smoke setting: one JAX start for all)."""
    import keras

    results = []
    for sub in job["jobs"]:
        try:
            results.append(HANDLERS[sub["kind"]](dict({"result_path": job.get("result_path")}, **sub)))
        except Exception as error:  # one broken side still leaves the others
            traceback.print_exc()
            results.append({"name": sub["name"], "error": f"{type(error).__name__}: {error}"[:600]})
        keras.distribution.set_distribution(None)
        keras.config.set_dtype_policy("float32")
    return {"results": results}


HANDLERS = {"plain": plain_side, "keras_tune": keras_tune_side, "many": many}

# ---------------------------------------------------------------------------
# Parent: lay out the jobs, start the children, make the tables.


def _label(kind, batching):
    return "keras-hub recipe (pad)" if kind == "plain" else f"keras_tune ({batching})"


def tiny_plan(quick=False, log_dir=None):
    """Writes the data and lays out the child jobs of the tiny side-by-side."""
    setting = "quick" if quick else "full"
    s = SETTINGS[setting]
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="kt_bench_"))
    data_path, strings = common.write_mtnt_like(log_dir / "data", s["examples"], seed=0)
    base = dict(preset=s["preset"], mesh=s["mesh"], seq_len=s["seq_len"], batch=s["batch"], steps=s["steps"],
                data_path=data_path, lora_rank=4)
    jobs = []
    for r in range(s["rounds"]):
        sides = [(kind, batching) for kind, batching, rounds in s["sides"] if r < rounds]
        for kind, batching in sides if r % 2 == 0 else reversed(sides):
            jobs.append(dict(base, kind=kind, batching=batching, label=_label(kind, batching),
                             name=f"{kind}-{batching}-r{r}", round=r))
    words = sorted(len(x.split()) for x in strings)
    return {
        "setting": dict(s, name=setting, sides=[list(x) for x in s["sides"]]),
        "data": {"kind": "MTNT-like prompt/target pairs (benchmarks/common.py)", "path": data_path,
                 "examples": len(strings), "words_median": words[len(words) // 2], "words_max": words[-1]},
        "jobs": jobs,
        "log_dir": str(log_dir),
    }


def tiny_finish(plan, results):
    """Turns the children's results into the side-by-side figures."""
    for result, job in zip(results, plan["jobs"]):
        result["label"] = job["label"]
    rows = _merge(results)
    return {k: plan[k] for k in ("setting", "data", "log_dir")} | {
        "rows": rows, "ratios": _ratios(rows), "targets": TARGETS,
    }


BEST_MAX = ("steps_per_s_robust", "tokens_per_s_robust", "nonpad_tokens_per_s_robust", "loss_tokens_per_s_robust")
BEST_MIN = ("step_ms_median",)
MEDIAN = ("steps_per_s", "tokens_per_s", "nonpad_tokens_per_s", "loss_tokens_per_s", "first_step_s",
          "compile_steps_s", "compile_steps", "peak_rss_mb", "pad_fraction", "mean_nonpad_per_step",
          "mean_positions_per_step", "build_s", "process_wall_s", "xla_compile_s", "trace_lower_s",
          "nonpad_tokens_per_s_with_compile", "total_s")


def _merge(results):
    """One row a side: best run for the robust rates, median over runs for the rest."""
    import statistics

    rows = {}
    for result in results:
        key = result.get("label") or result.get("name")
        rows.setdefault(key, []).append(result)
    merged = []
    for label, group in rows.items():
        good = [g for g in group if "error" not in g]
        row = {"label": label, "repeats": len(good), "failed_runs": len(group) - len(good)}
        if not good:
            row["error"] = group[0]["error"]
            merged.append(row)
            continue
        for key in BEST_MAX + BEST_MIN + MEDIAN:
            values = [g[key] for g in good if g.get(key) is not None]
            if not values:
                continue
            if key in BEST_MAX:
                row[key] = max(values)
                row[key + "_median_of_runs"] = round(statistics.median(values), 3)
            elif key in BEST_MIN:
                row[key] = min(values)
                row[key + "_median_of_runs"] = round(statistics.median(values), 3)
            else:
                value = round(statistics.median(values), 4)
                row[key] = int(value) if key == "compile_steps" and float(value).is_integer() else value
        row["runs"] = [{k: g.get(k) for k in ("steps_per_s", "steps_per_s_robust", "step_ms_median",
                                              "nonpad_tokens_per_s_robust", "first_step_s", "peak_rss_mb",
                                              "step_ms_by_positions")} for g in good]
        for key in ("batching", "buckets", "side", "steps", "steady_steps"):
            if key in good[0]:
                row[key] = good[0][key]
        merged.append(row)
    return merged


def _ratios(rows):
    by = {r["label"]: r for r in rows}
    plain = by.get("keras-hub recipe (pad)", {})
    out = {}
    for label, key, name in (
        ("keras_tune (pad)", "steps_per_s_robust", "steps_per_s_pad_vs_plain"),
        ("keras_tune (pad)", "steps_per_s", "steps_per_s_pad_vs_plain_all_steps_median_of_runs"),
        ("keras_tune (auto)", "nonpad_tokens_per_s_robust", "nonpad_tokens_per_s_auto_vs_plain"),
        ("keras_tune (auto)", "nonpad_tokens_per_s", "nonpad_tokens_per_s_auto_vs_plain_all_steps_median_of_runs"),
        ("keras_tune (auto)", "nonpad_tokens_per_s_with_compile", "nonpad_tokens_per_s_with_compile_auto_vs_plain"),
        ("keras_tune (bucket)", "nonpad_tokens_per_s_robust", "nonpad_tokens_per_s_bucket_vs_plain"),
    ):
        mine = by.get(label, {}).get(key)
        theirs = plain.get(key)
        if mine and theirs:
            out[name] = round(mine / theirs, 3)
    return out


TARGETS = {"steps_per_s_pad_vs_plain": 0.95, "nonpad_tokens_per_s_auto_vs_plain": 1.5}

COLUMNS = [
    ("side", "label"),
    ("steps/s", "steps_per_s_robust"),
    ("step ms (median)", "step_ms_median"),
    ("tokens/s (padded)", "tokens_per_s_robust"),
    ("non-pad tokens/s", "nonpad_tokens_per_s_robust"),
    ("loss tokens/s", "loss_tokens_per_s_robust"),
    ("padding", lambda r: f"{100 * r['pad_fraction']:.0f}%" if r.get("pad_fraction") is not None else None),
    ("first step s", "first_step_s"),
    ("compiles", "compile_steps"),
    ("XLA compile s", "xla_compile_s"),
    ("non-pad tokens/s incl. compile", "nonpad_tokens_per_s_with_compile"),
    ("steps/s, all steps", "steps_per_s"),
    ("peak RSS MiB", "peak_rss_mb"),
    ("runs", "repeats"),
]


def _table_rows(result):
    """Result rows for a table; a side that failed shows as one labelled line."""
    return [
        {"label": f"{row['label']}: FAILED {common.short_error(row['error'])}"} if "error" in row else row
        for row in result["rows"]
    ]


def tiny_table(result):
    s = result["setting"]
    head = (
        f"Tiny preset `{s['preset']}`, mesh {s['mesh']} on {s['devices']} simulated CPU devices, batch {s['batch']} x "
        f"seq_len {s['seq_len']}, LoRA rank 4, {s['steps']} steps a run, {s['rounds']} round(s)"
        + (f": in a round every side runs in its own process and they take turns of {s['turn_steps']} steps, "
           "so all sides see the same machine load" if s.get("turn_steps") else " in one process")
        + ". Rates leave compile steps out and count each step at the median time of its shape; the first five "
        "columns are the side's best round, the rest the median over rounds ('steps/s, all steps': mean over "
        "every steady step)."
    )
    rows = _table_rows(result)
    if s.get("name") == "quick":
        head += " SMOKE SETTING: a few steps at a short length check the wiring; these figures measure nothing."
    lines = [head, "", common.table(rows, COLUMNS), ""]
    for name, value in result["ratios"].items():
        target = TARGETS.get(name)
        verdict = "" if target is None else (f" (target >= {target}: {'met' if value >= target else 'NOT met'})")
        lines.append(f"- {name}: {value:.3f}x{verdict}")
    return "\n".join(lines)


def run_tiny(quick=False, log_dir=None, timeout=480):
    """Runs the tiny side-by-side: each round starts every side at once and they train in turns."""
    plan = tiny_plan(quick, log_dir)
    setting = plan["setting"]
    results = [None] * len(plan["jobs"])
    for r in range(setting["rounds"]):
        index = [i for i, job in enumerate(plan["jobs"]) if job["round"] == r]
        out = common.run_in_turns(SCRIPT, [plan["jobs"][i] for i in index], setting["devices"], timeout,
                                  plan["log_dir"], setting["turn_steps"])
        for i, result in zip(index, out):
            results[i] = result
            job = plan["jobs"][i]
            print(f"  {job['name']}: " + (result.get("error") or
                  f"{result.get('steps_per_s_robust')} steps/s, {result.get('nonpad_tokens_per_s_robust')} "
                  f"non-pad tokens/s, process {result.get('process_wall_s')} s"), flush=True)
    return tiny_finish(plan, results)


def real_table(result):
    head = (
        f"Real `{REAL['preset']}` (Gemma 3 270M, GGUF weights dequantized to float32), LoRA rank 4, batch "
        f"{REAL['batch']} x seq_len {REAL['seq_len']}, {REAL['steps']} steps, on the machine's real cores "
        f"(1 or 2 XLA devices); the keras-hub recipe and keras_tune (pad) train in turns of {REAL['turn_steps']} "
        "steps, keras_tune (auto) runs after them alone"
    )
    rows = _table_rows(result)
    lines = [head, "", common.table(rows, COLUMNS), ""]
    lines += [f"- {name}: {value:.3f}x" for name, value in result.get("ratios", {}).items()]
    return "\n".join(lines)


def run_real(log_dir=None, timeout=600):
    """Gemma 3 270M on meshes 1x1 and 1x2: the keras-hub recipe and keras_tune (pad) in turns, then auto.

    The two sides of the equal-shape comparison train in turns (as the tiny ones
    do); `auto` runs after them on its own, since a third 4 GiB process at once
    is more than a shared machine should be asked for.
    """
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="kt_bench_real_"))
    data_path, _ = common.write_mtnt_like(log_dir / "data", REAL["examples"] * REAL["batch"], seed=1)
    results = []
    for mesh in REAL["meshes"]:
        devices = 1 if mesh == "1x1" else 2
        base = dict(preset=REAL["preset"], mesh=mesh, seq_len=REAL["seq_len"], batch=REAL["batch"],
                    steps=REAL["steps"], data_path=data_path, lora_rank=4)
        pair = [dict(base, kind="plain", batching="pad", label=f"{mesh} keras-hub recipe (pad)"),
                dict(base, kind="keras_tune", batching="pad", label=f"{mesh} keras_tune (pad)")]
        alone = dict(base, kind="keras_tune", batching="auto", label=f"{mesh} keras_tune (auto)")
        for job in pair + [alone]:
            job["name"] = f"real-{mesh}-{job['kind']}-{job['batching']}"
        out = common.run_in_turns(SCRIPT, pair, devices, timeout, log_dir, REAL["turn_steps"])
        out.append(common.spawn(SCRIPT, alone, devices, timeout, log_dir))
        for job, result in zip(pair + [alone], out):
            result["label"] = job["label"]
            print(f"  {job['name']}: " + (result.get("error") or
                  f"{result.get('steps_per_s_robust')} steps/s, {result.get('nonpad_tokens_per_s_robust')} "
                  f"non-pad tokens/s, process {result.get('process_wall_s')} s"), flush=True)
            results.append(result)
    rows = _merge(results)
    return {"setting": dict(REAL, meshes=list(REAL["meshes"])), "rows": rows, "ratios": _real_ratios(rows),
            "log_dir": str(log_dir)}


def _real_ratios(rows):
    by = {r["label"]: r for r in rows}
    out = {}
    for mesh in REAL["meshes"]:
        plain = by.get(f"{mesh} keras-hub recipe (pad)", {})
        for label, key, name in ((f"{mesh} keras_tune (pad)", "steps_per_s_robust", f"{mesh}_steps_per_s_pad_vs_plain"),
                                 (f"{mesh} keras_tune (auto)", "nonpad_tokens_per_s_robust",
                                  f"{mesh}_nonpad_tokens_per_s_auto_vs_plain")):
            mine, theirs = by.get(label, {}).get(key), plain.get(key)
            if mine and theirs:
                out[name] = round(mine / theirs, 3)
    return out


def main(argv=None):
    if "--child" in (argv or sys.argv):
        common.child_main(HANDLERS)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="minimal smoke setting")
    parser.add_argument("--real", action="store_true", help="also Gemma 3 270M on meshes 1x1 and 1x2")
    parser.add_argument("--only-real", action="store_true", help="only Gemma 3 270M (no tiny side-by-side)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    out = {}
    if not args.only_real:
        out["tiny"] = run_tiny(quick=args.quick)
        print(tiny_table(out["tiny"]))
    if args.real or args.only_real:
        out["real"] = run_real()
        print(real_table(out["real"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
