"""Distillation and DPO on the real Gemma 3 270M: peak RSS and steps/s, blockwise against the naive full-logits path.

Prepared once (not measured): a LoRA adapter for the teacher (rank 4 on query and
value, random factors standing in for a tuned adapter: the teacher is the 270M
with it, the student the 270M base), MTNT-like prompt/response pairs
(`benchmarks.common.mtnt_like_pairs`) and preference pairs built from them (the
chosen response the translation, the rejected one its words reversed).

Then each side is one `python -m keras_tune.fit` run in its own child process,
whose peak RSS is `wait4`'s `ru_maxrss`; steps/s is one over the median of the
per-step times the run logs in `metrics.csv` after its first two (compiling) steps:

- SFT on the same pairs (for scale);
- distillation (forward KL, hard-label weight 0.5) with keras_tune's blockwise
  divergence (`keras_tune.objectives.divergence`), and the same with
  `train.loss=full`: keras-hub's full `[tokens, vocabulary]` logits of both models;
- DPO (beta 0.1, the reference the LoRA-off network), blockwise and with full logits.

Usage (on a shared machine, one benchmark at a time):

```
flock /tmp/keras_tune_benchmark.lock python benchmarks/objectives.py
python benchmarks/objectives.py --preset gemma3_tiny --steps 4     # the script itself, in a minute
```
"""

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import PROMPT_TEMPLATE, measure_command, mtnt_like_pairs, table  # noqa: E402

COMPILING_STEPS = 2  # steps/s is measured after them


def _env():
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def prepare(work, preset, pairs):
    """Writes the teacher's adapter and the two data files under `work` (a child process: it loads the model)."""
    import numpy as np

    import keras_tune
    from keras_tune.lora import apply_lora, save_adapter
    from keras_tune.models.loader import load_causal_lm

    causal_lm = load_causal_lm(keras_tune.load_config(preset))
    apply_lora(causal_lm, 4, ("query", "value"))
    rng = np.random.default_rng(0)
    for variable in causal_lm.backbone.trainable_weights:
        variable.assign(rng.normal(0, 0.05, variable.shape).astype("float32"))
    save_adapter(causal_lm, str(work / "teacher.npz"), preset=preset)
    with open(work / "pairs.jsonl", "w") as sft, open(work / "prefs.jsonl", "w") as prefs:
        for source, target in mtnt_like_pairs(int(pairs), seed=0):
            prompt = PROMPT_TEMPLATE.format(source=source)
            sft.write(json.dumps({"prompt": prompt, "response": target}) + "\n")
            prefs.write(json.dumps({"prompt": prompt, "chosen": target,
                                    "rejected": " ".join(reversed(target.split()))}) + "\n")
    (work / "prepared").write_text(f"{preset} {pairs}")


def _figures(run_dir):
    """Steps/s (over the steps after the first two), the first two steps' seconds, and the last logged loss.

    The first two steps both compile (the second traces again once the optimizer
    state has its first values): 20 to 100 s each on the 270M, against 3 to 15 s
    for the steps after them.
    """
    from keras_tune.rundir import read_rows

    rows = [row for row in read_rows(str(run_dir / "metrics.csv")) if row.get("step_time_s") is not None]
    times = [row["step_time_s"] for row in rows]
    steady = times[COMPILING_STEPS:] or times
    return {"steps_per_s": 1.0 / statistics.median(steady) if steady else None,
            "median_step_s": statistics.median(steady) if steady else None,
            "compile_steps_s": sum(times[:COMPILING_STEPS]) if times else None,
            "last_loss": rows[-1]["loss"] if rows else None}


def main():  # long: the preparation, the measured sides and the table, in the order they run
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/keras_tune_objectives_bench", help="where adapters, data and runs go")
    parser.add_argument("--preset", default="gemma3_270m_offline")
    parser.add_argument("--steps", type=int, default=7, help="optimizer updates a side (the first two compile)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=64, help="MTNT-like pairs written")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        prepare(Path(args.child[0]), args.child[1], args.child[2])
        return

    work, env = Path(args.work), _env()
    if not (work / "prepared").is_file() or (work / "prepared").read_text() != f"{args.preset} {args.pairs}":
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        print(f"preparing a teacher adapter and data for {args.preset} in {work} ...", flush=True)
        code, _, _ = measure_command([sys.executable, __file__, "--child", str(work), args.preset, str(args.pairs)],
                                     work / "prepare.log", env)
        if code:
            sys.exit(f"preparation failed: see {work / 'prepare.log'}")
    common = ["--preset", args.preset, "--data", "text", "--seq-len", str(args.seq_len), "--batch-size",
              str(args.batch_size), "--batching", "pad", "--steps", str(args.steps), "--log-every", "0",
              "--set", "data.validation_fraction=0", "--set", "train.sample_prompts="]
    teacher = ["--teacher", args.preset, "--teacher-adapter", str(work / "teacher.npz")]
    sides = [
        ("sft", "blockwise (sparse)", ["--data-path", str(work / "pairs.jsonl")]),
        ("distill", "blockwise (sparse)", ["--objective", "distill", *teacher, "--data-path", str(work / "pairs.jsonl")]),
        ("distill", "naive full logits", ["--objective", "distill", *teacher, "--data-path", str(work / "pairs.jsonl"),
                                          "--set", "train.loss=full"]),
        ("dpo", "blockwise (sparse)", ["--objective", "dpo", "--data-path", str(work / "prefs.jsonl")]),
        ("dpo", "naive full logits", ["--objective", "dpo", "--data-path", str(work / "prefs.jsonl"),
                                      "--set", "train.loss=full"]),
    ]
    rows = []
    for objective, path, flags in sides:
        name = f"{objective}-{path.split()[0]}"
        run_dir = work / name
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [sys.executable, "-m", "keras_tune.fit", *common, *flags, "--output-dir", str(run_dir)]
        code, peak, wall = measure_command(command, work / f"{name}.log", env)
        row = {"objective": objective, "loss path": path, "peak_rss_gib": peak / 2**30, "wall_s": wall, "exit": code}
        if code == 0:
            row.update(_figures(run_dir))
        else:
            row["error"] = (work / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1][:200]
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n## Objectives on {args.preset}: batch {args.batch_size} x {args.seq_len} tokens "
          f"(DPO: {args.batch_size} pairs), {args.steps} steps\n")
    print(table(rows, [("objective", "objective"), ("loss path", "loss path"), ("peak RSS GiB", "peak_rss_gib"),
                       ("steps/s", "steps_per_s"), ("median step s", "median_step_s"),
                       ("compile s (steps 1-2)", "compile_steps_s"), ("wall s", "wall_s"), ("error", "error")]))
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "rows": rows}, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
