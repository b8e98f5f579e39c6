"""All CPU benchmarks in one run: prints every table and writes the figures as JSON.

1. Step throughput: the seeds' hand-written keras-hub recipe against
   `keras_tune.training.run`, tiny preset on a 1x8 mesh of simulated CPU devices
   (`benchmarks/step_throughput.py`).
2. Input pipeline: the seeds' per-example `tf.numpy_function` tokenizing against
   `keras_tune.data` (`benchmarks/data_pipeline.py`).
3. Scaling: tiny preset step time and per-device memory over six meshes
   (`benchmarks/scaling.py`).
4. With `--real`: the real Gemma 3 270M on meshes 1x1 and 1x2 (several minutes more).

Every measurement runs in a child process (JAX needs its device count before it
starts; RSS is per side). `--quick` is the smoke setting: tiny sizes, and every
measurement in one child process to pay the start-up once.

Usage:

```
python benchmarks/run.py                       # all CPU tables, < 10 min on 2 cores
python benchmarks/run.py --quick --json /tmp/b.json
python benchmarks/run.py --real                # plus Gemma 3 270M
```
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common, scaling, step_throughput  # noqa: E402

SCRIPT = Path(__file__).resolve()
DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"
GPU_ROW = "not measured (no GPU lent to this task)"


# ---------------------------------------------------------------------------
# Children.


def data_pipeline_child(job):
    """Runs `benchmarks.data_pipeline.run(quick)` (owned by the data side) in this child."""
    from benchmarks import data_pipeline

    if job["quick"]:
        try:  # the smallest setting its run() offers; plain run(quick=True) if it has no such arguments
            return {"figures": data_pipeline.run(quick=True, tokenizer="tiny", examples=400)}
        except TypeError:
            pass
    return {"figures": data_pipeline.run(quick=job["quick"])}


def quick_child(job):
    """The smoke setting: every measurement in this one process."""
    here = {"result_path": job.get("result_path")}  # the runs' output goes beside this job's result
    out = {"step_throughput": step_throughput.many(dict(here, jobs=job["step_jobs"]))["results"]}
    out["scaling"] = scaling.measure_meshes(dict(here, **job["scaling_job"]))["rows"]
    try:
        out["data_pipeline"] = data_pipeline_child({"quick": True})
    except Exception as error:  # the other module's failure is reported, not fatal
        out["data_pipeline"] = {"error": f"{type(error).__name__}: {error}"[:600]}
    return out


HANDLERS = {"data_pipeline": data_pipeline_child, "quick": quick_child}


# ---------------------------------------------------------------------------
# Parent.


def machine():
    """What the figures were taken on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("jax", "jaxlib", "keras", "keras-hub", "tensorflow", "tensorflow-text"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    git = {}
    for key, args in (("head", ["rev-parse", "--short", "HEAD"]),
                      ("uncommitted_keras_tune_files", ["status", "--porcelain", "--", "keras_tune", "layouts", "presets"])):
        try:
            text = subprocess.run(["git", *args], cwd=common.REPO, capture_output=True, text=True, timeout=10).stdout
            git[key] = text.strip() if key == "head" else [line[3:] for line in text.splitlines()]
        except (OSError, subprocess.SubprocessError):
            git[key] = None
    return {
        "git": git,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "load_average_start": list(os.getloadavg()),
        "note": "shared 2-core machine: other engineers' test runs were using the same cores",
    }


def run_data_pipeline(quick, log_dir, timeout=300):
    out = common.spawn(SCRIPT, {"kind": "data_pipeline", "name": "data_pipeline", "quick": quick},
                       devices=1, timeout=timeout, log_dir=log_dir)
    if "error" in out:
        return {"error": out["error"]}
    figures = out["figures"]
    figures["peak_rss_mb"] = out.get("peak_rss_mb")
    return figures


def data_pipeline_table(figures):
    if not figures or "error" in figures:
        return f"Input pipeline: FAILED {(figures or {}).get('error', 'no result')}"
    try:
        from benchmarks import data_pipeline

        return data_pipeline.report(figures)
    except Exception as error:  # its report changed shape: show the raw figures
        return f"Input pipeline (raw, report failed: {error}):\n{json.dumps(figures, indent=1)[:3000]}"


def run_all(quick=False, real=False, log_dir=None):
    """Runs every benchmark; returns (figures, tables)."""
    import tempfile

    started = time.time()
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="kt_bench_"))
    figures = {
        "command": "python benchmarks/run.py" + (" --quick" if quick else "") + (" --real" if real else ""),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "quick": quick,
        "gpu": GPU_ROW,
    }
    if quick:
        plan = step_throughput.tiny_plan(quick=True, log_dir=log_dir)
        scaling_job = scaling.make_job(quick=True, log_dir=log_dir)
        out = common.spawn(SCRIPT, {"kind": "quick", "name": "quick", "step_jobs": plan["jobs"],
                                    "scaling_job": scaling_job}, devices=8, timeout=300, log_dir=log_dir)
        if "error" in out:
            out = {"step_throughput": [dict(j, error=out["error"]) for j in plan["jobs"]],
                   "scaling": [{"mesh": m, "error": out["error"]} for m in scaling_job["meshes"]],
                   "data_pipeline": {"error": out["error"]}}
        figures["step_throughput"] = step_throughput.tiny_finish(plan, out["step_throughput"])
        figures["scaling"] = scaling.finish(scaling_job, {"rows": out["scaling"]})
        data = out["data_pipeline"]
        figures["data_pipeline"] = data.get("figures", data)
    else:
        print("step throughput (one process a side and repeat):", flush=True)
        figures["step_throughput"] = step_throughput.run_tiny(log_dir=log_dir)
        print("input pipeline:", flush=True)
        figures["data_pipeline"] = run_data_pipeline(False, log_dir)
        print("scaling:", flush=True)
        figures["scaling"] = scaling.run(log_dir=log_dir)
    figures["real"] = None
    if real:
        print("real Gemma 3 270M:", flush=True)
        figures["real"] = step_throughput.run_real(log_dir=log_dir)
    figures["machine"]["load_average_end"] = list(os.getloadavg())
    figures["wall_s"] = round(time.time() - started, 1)
    tables = [
        "## Step throughput: keras-hub recipe vs keras_tune\n\n" + step_throughput.tiny_table(figures["step_throughput"]),
        "## Input pipeline\n\n" + data_pipeline_table(figures["data_pipeline"]),
        "## Scaling over meshes (simulated devices)\n\n" + scaling.format_table(figures["scaling"]),
    ]
    if figures["real"]:
        tables.append("## Real model: Gemma 3 270M\n\n" + step_throughput.real_table(figures["real"]))
    tables.append(f"## GPU\n\n{GPU_ROW}")
    return figures, tables


def main(argv=None):
    if "--child" in (argv or sys.argv):
        common.child_main(HANDLERS)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="minimal smoke setting (about a minute)")
    parser.add_argument("--real", action="store_true", help="also the real Gemma 3 270M on meshes 1x1 and 1x2")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help=f"where the figures go (default {DEFAULT_JSON})")
    parser.add_argument("--log-dir", help="keep the children's logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    figures, tables = run_all(quick=args.quick, real=args.real, log_dir=args.log_dir)
    load = figures["machine"]
    print()
    print(f"{figures['command']} on {load['cpu']} ({load['cores']} cores, shared), {figures['date']}, "
          f"load average {load['load_average_start'][0]:.1f} -> {load['load_average_end'][0]:.1f}, "
          f"{figures['wall_s']:.0f} s")
    print()
    print("\n\n".join(tables))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=1, default=float))
    print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
