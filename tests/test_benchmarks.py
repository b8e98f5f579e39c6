"""Smoke test of the benchmark entry: `benchmarks/run.py --quick` runs and writes its JSON.

Never asserts on timings: only that every table was produced and the figures
have the keys BENCHMARKS.md and readers of `results.json` rely on.
"""

import json
import os
import subprocess
import sys

from helpers import REPO


def test_run_quick_writes_json(tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ)
    # The children set their own device counts; nothing here needs JAX.
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--json", str(out),
         "--log-dir", str(tmp_path / "logs")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in ("command", "date", "machine", "quick", "gpu", "step_throughput", "data_pipeline", "scaling",
                "real", "wall_s"):
        assert key in figures, key
    assert figures["quick"] is True
    assert figures["gpu"].startswith("not measured")
    assert figures["real"] is None

    step = figures["step_throughput"]
    rows = {row["label"]: row for row in step["rows"]}
    assert set(rows) == {"keras-hub recipe (pad)", "keras_tune (pad)", "keras_tune (auto)"}, rows
    for label, row in rows.items():
        assert "error" not in row, (label, row.get("error"))
        for key in ("steps_per_s", "tokens_per_s", "nonpad_tokens_per_s", "first_step_s", "step_ms_median"):
            assert row.get(key) is not None, (label, key)
    for key in ("steps_per_s_pad_vs_plain", "nonpad_tokens_per_s_auto_vs_plain"):
        assert key in step["ratios"], key

    scaling_rows = figures["scaling"]["rows"]
    assert [row["mesh"] for row in scaling_rows] == ["1x1", "1x8"]
    for row in scaling_rows:
        assert "error" not in row, row
        assert row["planned_weights_bytes"] > 0
        # The plan and the arrays actually on device 0 agree.
        assert row["measured_weights_bytes_device0"] == row["planned_weights_bytes"]

    assert "error" not in figures["data_pipeline"], figures["data_pipeline"]

    for title in ("## Step throughput", "## Input pipeline", "## Scaling", "## GPU"):
        assert title in proc.stdout

    # keras_tune's training runs keep their output beside the logs, one folder a run,
    # instead of leaving a temp folder behind each time.
    run_dirs = sorted(p.name for p in (tmp_path / "logs").glob("*.run"))
    assert run_dirs == sorted([f"{job}.run" for job in ("keras_tune-pad-r0", "keras_tune-auto-r0")]
                              + ["scaling-quick.1x1.run", "scaling-quick.1x8.run"]), run_dirs
    assert all((tmp_path / "logs" / name / "adapter.npz").is_file() for name in run_dirs), run_dirs


def test_the_recipe_side_runs_with_xlas_default_cpu_schedule(monkeypatch):
    """Only keras_tune's processes get the memory-optimized schedule `import keras_tune` asks for."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import common
    from keras_tune import environment

    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {environment.MEMORY_SCHEDULER_FLAG}")
    plain = common.child_env(1, "plain")["XLA_FLAGS"].split()
    ours = common.child_env(1, "keras_tune")["XLA_FLAGS"].split()
    assert sorted(plain) == sorted([common.PLAIN_SCHEDULER_FLAG, "--xla_force_host_platform_device_count=1"])
    assert ours == ["--xla_force_host_platform_device_count=1"]  # the child's `import keras_tune` adds it
