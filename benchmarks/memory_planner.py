"""The memory planner against XLA: planned bytes per device next to the compiled train step's.

For each case the planner (`keras_tune.plan_memory`, shapes only) is set beside
what XLA's compiled Keras train step says it needs on one device
(`compiled.memory_analysis()`: arguments + outputs - donated aliases + temporaries).
The train step is the one `fit` runs (`model.train_step` under `jax.jit` with the
state donated, as Keras jits it), on a model built abstractly under the plan's
distribution and compiled as `keras_tune.losses.compile_training` compiles it for `fit`, lowered
with `jax.ShapeDtypeStruct`s: no weight is allocated, so the real Gemma 3 270M
needs no download and no memory. XLA here is the CPU compiler on simulated
devices, under its default schedule (keras_tune's own CPU runs ask for the
memory-optimized one, which keeps less); TPU and GPU compilers fuse differently (a fused attention kernel keeps
no `B H T T` scores), so on an accelerator the same script also reads
`device.memory_stats()` peak after real steps when `--measure-peak` is given.

A second table gives the planner's verdicts for the main presets (LoRA rank 4,
the preset's batch and precision) on v5e-8, v3-8, 8xH100 and one L4: the table
of docs/scaling.md.

Usage:

```
python benchmarks/memory_planner.py               # both tables (~2 min on 2 cores)
python benchmarks/memory_planner.py --only-verdicts
python benchmarks/memory_planner.py --json out.json
python benchmarks/memory_planner.py --preset recurrentgemma_tiny   # only that preset's compiled cases
```
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Eight simulated CPU devices, set before anything imports JAX.
if "jax" not in sys.modules:
    _flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("KERAS_BACKEND", "jax")

# (preset, mesh, overrides): the planned-vs-compiled cases.
COMPILED_CASES = (
    *((preset, mesh, {}) for preset in ("gemma_tiny", "gemma2_tiny", "gemma3_tiny") for mesh in ("1x1", "1x8", "2x4")),
    ("gemma_tiny", "1x1", {"lora.rank": 0}),
    ("gemma_tiny", "2x4", {"distribution.layout": "gemma_fsdp"}),
    ("gemma2_tiny", "1x8", {"lora.targets": ("query", "key", "value", "attention_output", "ffw_gating",
                                             "ffw_gating_2", "ffw_linear")}),
    ("gemma3_tiny", "1x1", {"data.seq_len": 256, "data.batch_size": 2}),
    ("gemma3_270m_offline", "1x1", {}),
    # RecurrentGemma: recurrent and local-attention blocks (the planner's `recurrent_block_activations`).
    *(("recurrentgemma_tiny", mesh, {}) for mesh in ("1x1", "1x8", "2x4")),
    ("recurrentgemma_tiny", "1x1", {"lora.rank": 0}),
    ("recurrentgemma_tiny", "1x1", {"train.loss": "full"}),
    ("recurrentgemma_tiny", "2x4", {"distribution.layout": "recurrentgemma_fsdp"}),
    ("recurrentgemma_tiny", "1x1", {"data.seq_len": 256, "data.batch_size": 2}),
)

VERDICT_PRESETS = ("gemma_2b_en", "gemma_7b_en", "gemma2_9b_en", "gemma2_27b_en", "gemma3_4b_text",
                   "gemma3_12b_text", "gemma3_27b_text")
VERDICT_DEVICES = (("v5e-8", "1x8", "16GiB"), ("v3-8", "1x8", "16GiB"), ("8xH100", "1x8", "80GiB"),
                   ("1xL4", "1x1", "24GiB"))


# ---------------------------------------------------------------------------
# What XLA says: the compiled train step of the model `fit` trains.


def _batch_specs(config, distribution):
    """`ShapeDtypeStruct`s of one training batch, sharded as Keras shards data."""
    import jax

    batch, seq = config.data.batch_size, config.data.seq_len

    def spec(dtype):
        sharding = distribution.get_data_layout((batch, seq)).backend_layout
        return jax.ShapeDtypeStruct((batch, seq), dtype, sharding=sharding)

    x = {"token_ids": spec("int32"), "padding_mask": spec("bool")}
    if config.train.loss == "sparse":  # every position carries loss: the largest capacity
        x.update(loss_positions=spec("int32"), targets=spec("int32"))
    return x, spec("int32"), spec("float32")


def compiled_memory(config, devices=None, cpu_schedule="CPU_SCHEDULER_TYPE_DEFAULT"):
    """Per-device bytes XLA reports for the compiled train step `fit` would run for `config`.

    The model is built and compiled as `fit` does (`build_model`, then
    `compile_training`: remat, quantized base, the sparse-loss trainer and all);
    its train step is jitted as Keras jits it (state donated) and lowered with
    `jax.ShapeDtypeStruct`s of a batch, so no step runs.

    On CPU the step is compiled under XLA's default schedule by default: the
    planner models it (weight-only copies made up front, as a prefetching
    accelerator schedule may); the memory-optimized schedule keras_tune's own
    CPU runs ask for keeps less (`environment.prefer_memory_optimized_cpu_schedule`).

    Args:
        config: a validated run config.
        devices: devices for the mesh (default: all).
        cpu_schedule: `xla_cpu_scheduler_type` for a CPU compile (None: the process's own).

    Returns:
        A dict: argument, output, alias, temp, peak (argument + output - alias
        + temp: the donated state is updated in place), compile_s.
    """
    import jax
    import keras

    from keras_tune.environment import cpu_schedule_options
    from keras_tune.losses import compile_training
    from keras_tune.models.loader import build_model
    from keras_tune.optim import build_optimizer

    try:
        built = build_model(config, lora=True, devices=devices)
        trainer = compile_training(built.causal_lm, config.train, build_optimizer(config.optimizer, total_steps=100))
        distribution = keras.distribution.distribution()
        data = _batch_specs(config, distribution)
        trainer._symbolic_build(data_batch=data)  # builds the compiled metrics, as fit does
        shardings = trainer._get_state_sharding_spec()
        groups = (trainer.trainable_variables, trainer.non_trainable_variables,
                  trainer.optimizer.variables, trainer.metrics_variables)
        state = tuple([jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.value.sharding) for v in group]
                      for group in groups)
        started = time.perf_counter()
        step = jax.jit(trainer.train_step, donate_argnums=0, out_shardings=(None, shardings))
        analysis = step.lower(state, data).compile(cpu_schedule_options(cpu_schedule)).memory_analysis()
    finally:
        keras.distribution.set_distribution(None)
        keras.config.set_dtype_policy("float32")
    figures = {
        "argument": int(analysis.argument_size_in_bytes),
        "output": int(analysis.output_size_in_bytes),
        "alias": int(analysis.alias_size_in_bytes),
        "temp": int(analysis.temp_size_in_bytes),
    }
    figures["peak"] = figures["argument"] + figures["output"] - figures["alias"] + figures["temp"]
    figures["compile_s"] = round(time.perf_counter() - started, 1)
    return figures


def measured_peak(config, steps=3):
    """Peak bytes in use on device 0 after a few real train steps (`memory_stats`), or None on CPU.

    Args:
        config: a validated run config.
        steps: train steps on random tokens.
    """
    import jax
    import keras
    import numpy as np

    from keras_tune.losses import compile_training
    from keras_tune.models.loader import build_model
    from keras_tune.optim import build_optimizer

    device = jax.devices()[0]
    if device.platform == "cpu" or not hasattr(device, "memory_stats"):
        return None
    built = build_model(config, lora=True)
    trainer = compile_training(built.causal_lm, config.train, build_optimizer(config.optimizer, total_steps=steps))
    batch, seq = config.data.batch_size * steps, config.data.seq_len
    rng = np.random.default_rng(0)
    ids = rng.integers(3, built.causal_lm.backbone.vocabulary_size, size=(batch, seq)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones((batch, seq), bool)}
    if config.train.loss == "sparse":
        x.update(loss_positions=np.tile(np.arange(seq, dtype="int32"), (batch, 1)), targets=ids)
    trainer.fit(x, ids, sample_weight=np.ones((batch, seq), "float32"), batch_size=config.data.batch_size,
                epochs=1, verbose=0)
    keras.distribution.set_distribution(None)
    return int(device.memory_stats().get("peak_bytes_in_use", 0)) or None


# ---------------------------------------------------------------------------
# The tables.


def _config(preset, mesh, overrides):
    import keras_tune

    return keras_tune.load_config(preset, overrides={"distribution.mesh": mesh, **overrides})


def _devices(mesh):
    import jax

    batch, model = (int(n) for n in mesh.split("x"))
    return jax.devices()[: batch * model]


def compiled_rows(cases):
    """Planned and compiled per-device bytes of each `(preset, mesh, overrides)` case."""
    from keras_tune.memory.plan import plan_memory

    rows = []
    for preset, mesh, overrides in cases:
        row = {"preset": preset, "mesh": mesh, "overrides": dict(overrides)}
        try:
            config = _config(preset, mesh, overrides)
            report = plan_memory(config, devices=_devices(mesh))
            row.update(planned=report.total, planned_parts=report.as_dict())
            row.update(compiled=compiled_memory(config, _devices(mesh)))
            row["ratio"] = round(report.total / row["compiled"]["peak"], 3)
        except Exception as error:  # one broken case still leaves the others' rows
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        rows.append(row)
        print(f"  {preset} {mesh} {overrides or ''}: {row.get('ratio', row.get('error'))}", file=sys.stderr, flush=True)
    return rows


def verdict_rows():
    """The planner's verdict for each main preset (LoRA rank 4, its batch and precision) on each device."""
    from keras_tune.memory.plan import plan_memory

    rows = []
    for preset in VERDICT_PRESETS:
        row = {"preset": preset, "cells": {}}
        for name, mesh, size in VERDICT_DEVICES:
            config = _config(preset, mesh, {"lora.rank": 4, "train.device_memory": size})
            report = plan_memory(config, devices=_devices(mesh))
            row["batch"], row["seq_len"], row["precision"] = config.data.batch_size, config.data.seq_len, config.train.precision
            row["cells"][name] = {"total": report.total, "fits": report.fits, "verdict": report.verdict,
                                  "suggested": report.suggested, "suggestion": report.suggestion}
        rows.append(row)
    return rows


def _gib(count):
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def compiled_table(rows):
    """Markdown: planned against XLA-compiled bytes per device."""
    lines = [
        "| preset | mesh | changes | planned | XLA compiled | plan / XLA | planned: weights+state, activations, logits |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        changes = ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "preset"
        if "error" in row:
            lines.append(f"| {row['preset']} | {row['mesh']} | {changes} | error: {row['error']} | | | |")
            continue
        parts = row["planned_parts"]
        static = parts["base_weights"] + parts["trainable_weights"] + parts["optimizer_state"] + parts["gradients"]
        lines.append(
            f"| {row['preset']} | {row['mesh']} | {changes} | {_gib(row['planned'])} | {_gib(row['compiled']['peak'])} "
            f"| {row['ratio']:.2f} | {_gib(static)}, {_gib(parts['activations'])}, {_gib(parts['logits'])} |"
        )
    return "\n".join(lines)


def _cell(cell):
    if cell["fits"]:
        return f"{_gib(cell['total'])}: {cell['verdict']}"
    fix = f"; {cell['suggestion'].split(' (planned')[0]}" if cell["suggested"] else "; nothing tried fits"
    return f"{_gib(cell['total'])}: {cell['verdict'].replace('does not fit: ', 'no, ')}{fix}"


def verdict_table(rows):
    """Markdown: the planner's verdicts for the main presets on four machines."""
    names = [name for name, _, _ in VERDICT_DEVICES]
    header = " | ".join(f"{name} ({mesh}, {size})" for name, mesh, size in VERDICT_DEVICES)
    lines = [f"| preset (LoRA r4) | batch x seq, precision | {header} |", "| --- | --- |" + " --- |" * len(names)]
    for row in rows:
        cells = " | ".join(_cell(row["cells"][name]) for name in names)
        lines.append(f"| {row['preset']} | {row['batch']} x {row['seq_len']}, {row['precision']} | {cells} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only-verdicts", action="store_true", help="only the verdict table (seconds)")
    parser.add_argument("--quick", action="store_true", help="the tiny presets on 1x1 and 1x8 only")
    parser.add_argument("--preset", help="only the compiled cases of this preset (and no verdict table)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    started = time.time()
    figures = {"command": " ".join(["python", "benchmarks/memory_planner.py", *(argv or sys.argv[1:])])}
    if not args.only_verdicts:
        cases = [c for c in COMPILED_CASES if not args.quick or (c[1] in ("1x1", "1x8") and not c[2] and "tiny" in c[0])]
        cases = [c for c in cases if not args.preset or c[0] == args.preset]
        figures["compiled"] = compiled_rows(cases)
        print("## Planned vs XLA-compiled memory per device (CPU XLA, float32)\n")
        print(compiled_table(figures["compiled"]) + "\n")
    if args.preset:  # one preset's compiled cases only
        return _finish(figures, started, args.json)
    if not args.only_verdicts:
        config = _config("gemma3_270m_offline", "1x1", {})
        peak = measured_peak(config)
        figures["accelerator_peak"] = peak
        print(f"Accelerator peak (memory_stats, 270M, 1x1): {_gib(peak) if peak else 'not measured: no accelerator'}\n")
    figures["verdicts"] = verdict_rows()
    print("## Planner verdicts, LoRA rank 4, batch and precision of the preset\n")
    print(verdict_table(figures["verdicts"]) + "\n")
    return _finish(figures, started, args.json)


def _finish(figures, started, json_path):
    # The wall time, and the figures as JSON where asked.
    figures["wall_s"] = round(time.time() - started, 1)
    print(f"({figures['wall_s']} s)")
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
