"""Scaling on simulated devices: step time and per-device memory of a tiny preset over meshes.

One child process with 8 simulated CPU devices runs `keras_tune.training.run` on
`gemma_tiny` for each mesh (1x1 takes the first device, 1x2 the first two, ...),
same global batch, sequence length, data and steps. Per mesh it reports the
steady step time and the per-device bytes of base weights, LoRA weights and
optimizer state that the sharding plan computes (`plan.memory()`), next to the
bytes actually held on device 0 by the built model's and optimizer's arrays.

Simulated CPU devices all share this machine's two cores: the step times say
what the partitioning costs in collectives and per-device overhead, not how a
real 8-accelerator mesh would speed up. The memory figures are exact.

Usage:

```
python benchmarks/scaling.py [--quick] [--json PATH]
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
SETTINGS = {
    "full": dict(preset="gemma_tiny", meshes=("1x1", "1x2", "1x4", "1x8", "2x4", "8x1"), seq_len=128, batch=8,
                 steps=20, examples=160),
    "quick": dict(preset="gemma_tiny", meshes=("1x1", "1x8"), seq_len=64, batch=8, steps=3, examples=32),
}


def _bytes_on_device(arrays, device):
    total = 0
    for array in arrays:
        for shard in getattr(array, "addressable_shards", []):
            if shard.device == device:
                total += shard.data.nbytes
    return total


def measure_meshes(job):
    """Child: one `keras_tune.training.run` a mesh, all in this process."""
    import keras

    import keras_tune
    from keras_tune import training
    from keras_tune.optim import optimizer_slots

    rows = []
    for mesh in job["meshes"]:
        batch, model = (int(n) for n in mesh.split("x"))
        devices = keras.distribution.list_devices()[: batch * model]
        overrides = {
            "distribution.mesh": mesh,
            "data.name": "text",
            "data.path": job["data_path"],
            "data.seq_len": job["seq_len"],
            "data.batch_size": job["batch"],
            "data.batching": "pad",
            "data.validation_fraction": 0.0,
            "train.steps": job["steps"],
            "train.output_dir": common.run_output_dir(job, f"{job.get('name', 'scaling')}.{mesh}"),
        }
        try:
            config = keras_tune.load_config(job["preset"], overrides=overrides)
            timer = common.make_step_timer()
            result = training.run(config, devices=devices, callbacks=[timer])
            summary = timer.summary(job["batch"] * job["seq_len"])
            planned = result.plan.memory(optimizer_slots(config.optimizer))
            import jax

            device0 = jax.devices()[0]
            model_arrays = [v.value for v in result.causal_lm.weights]
            optimizer_arrays = [v.value for v in result.causal_lm.optimizer.variables]
            row = {
                "mesh": mesh,
                "devices": batch * model,
                "step_ms_median": summary["step_ms_median"],
                "steps_per_s": summary["steps_per_s"],
                "first_step_s": summary["first_step_s"],
                "planned_weights_bytes": planned["frozen"] + planned["trainable"],
                "planned_frozen_bytes": planned["frozen"],
                "planned_trainable_bytes": planned["trainable"],
                "planned_optimizer_bytes": planned["optimizer"],
                "planned_replicated_bytes": planned["replicated"],
                "measured_weights_bytes_device0": _bytes_on_device(model_arrays, device0),
                "measured_optimizer_bytes_device0": _bytes_on_device(optimizer_arrays, device0),
            }
        except Exception as error:  # one mesh failing still leaves the others
            traceback.print_exc()
            row = {"mesh": mesh, "error": f"{type(error).__name__}: {error}"[:600]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        keras.distribution.set_distribution(None)
        keras.config.set_dtype_policy("float32")
    return {"rows": rows}


HANDLERS = {"meshes": measure_meshes}


def make_job(quick=False, log_dir=None):
    """Writes the data and returns the child's job."""
    setting = "quick" if quick else "full"
    s = SETTINGS[setting]
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="kt_bench_"))
    data_path, _ = common.write_mtnt_like(log_dir / "data", s["examples"], seed=2)
    return dict(kind="meshes", name=f"scaling-{setting}", setting=setting, preset=s["preset"],
                meshes=list(s["meshes"]), seq_len=s["seq_len"], batch=s["batch"], steps=s["steps"],
                data_path=data_path, log_dir=str(log_dir))


def finish(job, out):
    """The table's figures from the child's output."""
    s = SETTINGS[job["setting"]]
    rows = out.get("rows") or [{"mesh": m, "error": out.get("error", "no result")} for m in job["meshes"]]
    return {"setting": dict(s, name=job["setting"], meshes=list(s["meshes"])), "rows": rows,
            "peak_rss_mb": out.get("peak_rss_mb"), "log_dir": job["log_dir"]}


def run(quick=False, log_dir=None, timeout=400):
    """Runs the scaling table in one child process; returns JSON-ready figures."""
    job = make_job(quick, log_dir)
    return finish(job, common.spawn(SCRIPT, job, 8, timeout, job["log_dir"]))


def _kib(value):
    return None if value is None else value / 1024


def format_table(result):
    s = result["setting"]
    head = (
        f"Scaling of `{s['preset']}` (keras_tune, batching pad, batch {s['batch']} x seq_len {s['seq_len']}, "
        f"{s['steps']} steps a mesh). All meshes are simulated CPU devices sharing the machine's 2 cores: "
        "step time measures partitioning overhead, not speed-up. Memory is per device, KiB."
    )
    rows = []
    for row in result["rows"]:
        if "error" in row:
            rows.append({"mesh": f"{row['mesh']}: FAILED {common.short_error(row['error'])}"})
            continue
        rows.append({
            **row,
            "w": _kib(row["planned_weights_bytes"]),
            "t": _kib(row["planned_trainable_bytes"]),
            "o": _kib(row["planned_optimizer_bytes"]),
            "r": _kib(row["planned_replicated_bytes"]),
            "mw": _kib(row["measured_weights_bytes_device0"]),
            "mo": _kib(row["measured_optimizer_bytes_device0"]),
        })
    columns = [
        ("mesh", "mesh"),
        ("devices", "devices"),
        ("step ms (median)", "step_ms_median"),
        ("steps/s", "steps_per_s"),
        ("first step s", "first_step_s"),
        ("plan: weights", "w"),
        ("of which LoRA", "t"),
        ("plan: optimizer", "o"),
        ("plan: replicated", "r"),
        ("device 0: weights", "mw"),
        ("device 0: optimizer", "mo"),
    ]
    return "\n".join([head, "", common.table(rows, columns)])


def main(argv=None):
    if "--child" in (argv or sys.argv):
        common.child_main(HANDLERS)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    result = run(quick=args.quick)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
