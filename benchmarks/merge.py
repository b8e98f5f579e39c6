"""Merging two Gemma 3 270M models: peak RSS of keras_tune's streaming merge, the keras-hub recipe and mergekit.

Two models are prepared once (not measured): A, the offline 270M, written with
`save_to_preset` as `python -m keras_tune.export --keras-preset` writes it; B, the
same with a random rank-8 LoRA update merged into every attention and MLP kernel.
Each is also exported to Transformers for mergekit. Then each side merges A and B
(linear, 0.5/0.5) in its own child process, whose peak RSS (`wait4`'s `ru_maxrss`)
and wall time are reported beside the size of the two inputs:

- keras_tune: `python -m keras_tune.merge A B --out OUT` (and slerp, ties);
- the plain keras-hub recipe: `CausalLM.from_preset` twice, average the weights, `save_to_preset`;
- mergekit (`mergekit-yaml`, with `--lazy-unpickle`) on the Transformers exports, where it imports.

Then the outputs are compared tensor by tensor (keras_tune against the recipe in
Keras' layout; against mergekit in Transformers' layout, through keras_tune's
`--transformers` export of the same merge, run unmeasured).

Usage:

```
flock /tmp/keras_tune_benchmark.lock python benchmarks/merge.py
python benchmarks/merge.py --mergekit-path /tmp/keras_tune_mergekit   # mergekit installed with pip --target
python benchmarks/merge.py --preset gemma3_tiny                       # the script itself, in seconds
```
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import measure_command as measure  # noqa: E402
from benchmarks.common import table  # noqa: E402


def _env(extra_path=None):
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    paths = [str(REPO)] + ([extra_path] if extra_path else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


# ---------------------------------------------------------------------------
# Children


def prepare(work, preset):
    """Writes presets A and B (and their Transformers exports) under `work`."""
    import numpy as np

    import keras_tune
    from keras_tune.lora import apply_lora, merge_lora
    from keras_tune.models.exports.transformers import export_transformers
    from keras_tune.models.loader import load_causal_lm

    config = keras_tune.load_config(preset)
    causal_lm = load_causal_lm(config)
    causal_lm.save_to_preset(str(work / "A"))
    export_transformers(causal_lm, str(work / "A_hf"))
    apply_lora(causal_lm, 8, ("query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear"))
    rng = np.random.default_rng(0)
    for variable in causal_lm.backbone.trainable_weights:
        variable.assign(rng.normal(0, 0.02, variable.shape).astype("float32"))
    merge_lora(causal_lm)
    causal_lm.save_to_preset(str(work / "B"))
    export_transformers(causal_lm, str(work / "B_hf"))
    (work / "prepared").write_text(preset)


def kerashub_recipe(first, second, out):
    """The plain keras-hub way: both models in memory, averaged variable by variable, saved."""
    import keras_hub
    import numpy as np

    a = keras_hub.models.CausalLM.from_preset(first)
    b = keras_hub.models.CausalLM.from_preset(second)
    for mine, theirs in zip(a.backbone.weights, b.backbone.weights):
        mine.assign((np.asarray(mine.value) + np.asarray(theirs.value)) / 2)
    a.save_to_preset(out)


# ---------------------------------------------------------------------------
# Comparisons


def compare_keras(first, second):
    """Largest |difference| between two presets' weights, tensor by tensor."""
    import numpy as np

    from keras_tune.merging import preset_weights

    a, b = preset_weights(first, "a"), preset_weights(second, "b")
    worst = 0.0
    for key in a.keys():
        rows = a.shape(key)[0] if a.shape(key) else 1
        worst = max(worst, float(np.abs(a.read(key, 0, rows) - b.read(key, 0, rows)).max()))
    return worst


def compare_safetensors(first, second):
    """Largest |difference| between two Transformers directories' tensors (names of the first)."""
    import numpy as np
    from safetensors import safe_open

    def files(directory):
        return sorted(Path(directory).glob("*.safetensors"))

    names = {}
    for path in files(second):
        with safe_open(str(path), "numpy") as handle:
            names.update({name: path for name in handle.keys()})
    worst = 0.0
    for path in files(first):
        with safe_open(str(path), "numpy") as handle:
            for name in handle.keys():
                with safe_open(str(names[name]), "numpy") as other:
                    mine = handle.get_tensor(name).astype(np.float32)
                    worst = max(worst, float(np.abs(mine - other.get_tensor(name).astype(np.float32)).max()))
    return worst


def _size(paths):
    return sum(path.stat().st_size for directory in paths for path in Path(directory).rglob("*.weights.h5"))


def _safetensors_size(paths):
    return sum(path.stat().st_size for directory in paths for path in Path(directory).rglob("*.safetensors"))


def main():  # long: the preparation, five measured children and the comparisons, in the order they run
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/keras_tune_merge_bench", help="where models and outputs go")
    parser.add_argument("--preset", default="gemma3_270m_offline")
    parser.add_argument("--mergekit-path", help="a folder holding mergekit (pip install --target), added to PYTHONPATH")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        prepare(Path(rest[0]), rest[1]) if kind == "prepare" else kerashub_recipe(*rest)
        return

    work = Path(args.work)
    env = _env()
    if not (work / "prepared").is_file() or (work / "prepared").read_text() != args.preset:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        print(f"preparing two {args.preset} models in {work} ...", flush=True)
        code, _, _ = measure([sys.executable, __file__, "--child", "prepare", str(work), args.preset],
                             work / "prepare.log", env)
        if code:
            sys.exit(f"preparation failed: see {work / 'prepare.log'}")
    a, b = str(work / "A"), str(work / "B")
    two_models = _size([a, b])
    rows = []

    def run(label, method, command, inputs_size, env=env, out=None):
        if out:
            shutil.rmtree(out, ignore_errors=True)
        name = label.split()[0].replace("-", "_")
        code, peak, wall = measure(command, work / f"{name}-{method}.log", env)
        row = {"tool": label, "method": method, "peak_rss_gib": peak / 2**30, "inputs_gib": inputs_size / 2**30,
               "ratio": peak / inputs_size, "wall_s": wall, "exit": code}
        if code:
            row["error"] = (work / f"{name}-{method}.log").read_text(errors="replace").strip().splitlines()[-1][:200]
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    merge = [sys.executable, "-m", "keras_tune.merge"]
    run("keras_tune merge", "linear", [*merge, a, b, "--out", str(work / "kt_linear")], two_models,
        out=work / "kt_linear")
    run("keras_tune merge", "slerp t=0.5", [*merge, "--method", "slerp", "--t", "0.5", a, b, "--out",
                                            str(work / "kt_slerp")], two_models, out=work / "kt_slerp")
    run("keras_tune merge", "ties d=0.5", [*merge, "--method", "ties", "--base", a, b, "--density", "0.5", "--out",
                                           str(work / "kt_ties")], two_models, out=work / "kt_ties")
    run("keras-hub recipe", "linear", [sys.executable, __file__, "--child", "recipe", a, b, str(work / "recipe")],
        two_models, out=work / "recipe")
    mergekit_env = _env(args.mergekit_path)
    found = subprocess.run([sys.executable, "-c", "import mergekit.merge"], env=mergekit_env, capture_output=True)
    if found.returncode == 0:
        config = work / "mergekit.yaml"
        config.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n"
                          f"  - model: {work / 'A_hf'}\n    parameters: {{weight: 0.5}}\n"
                          f"  - model: {work / 'B_hf'}\n    parameters: {{weight: 0.5}}\n")
        run("mergekit-yaml --lazy-unpickle", "linear",
            [sys.executable, "-m", "mergekit.scripts.run_yaml", str(config), str(work / "mergekit"), "--lazy-unpickle"],
            _safetensors_size([work / "A_hf", work / "B_hf"]), env=mergekit_env, out=work / "mergekit")
    else:
        rows.append({"tool": "mergekit", "method": "linear", "error": "not importable: " +
                     found.stderr.decode(errors="replace").strip().splitlines()[-1][:150]})

    agreement = {"keras_tune vs keras-hub recipe (max |diff|)": compare_keras(work / "kt_linear", work / "recipe")}
    if (work / "mergekit").is_dir():
        shutil.rmtree(work / "kt_hf", ignore_errors=True)
        code, _, _ = measure([*merge, a, b, "--transformers", str(work / "kt_hf")], work / "kt_hf.log", env)
        if code == 0:
            agreement["keras_tune vs mergekit, Transformers layout (max |diff|)"] = compare_safetensors(
                work / "mergekit", work / "kt_hf")

    print(f"\n## Merging two {args.preset} models (inputs {two_models / 2**30:.2f} GiB of model.weights.h5)\n")
    print(table(rows, [("tool", "tool"), ("method", "method"), ("peak RSS GiB", "peak_rss_gib"),
                       ("inputs GiB", "inputs_gib"), ("peak / inputs", "ratio"), ("wall s", "wall_s"),
                       ("error", "error")]))
    print()
    for what, value in agreement.items():
        print(f"- {what}: {value:.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "rows": rows, "agreement": agreement}, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
