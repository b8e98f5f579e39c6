"""Shared pieces of the benchmarks: child processes, the MTNT-like data, step timing, tables.

Every measurement runs in a child process of the script that asks for it, so JAX
starts with the device count that measurement needs (set through `XLA_FLAGS`
before JAX is imported) and the peak RSS of a process belongs to one side only.
A child gets its job as JSON on the command line and writes its figures as JSON
to a file; the parent only starts children and formats tables, and never
imports JAX itself.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------
# Child processes.


# What a plain keras-hub user gets: XLA's default CPU schedule (`import keras_tune`
# would otherwise ask for the memory-optimized one in the recipe's process too).
PLAIN_SCHEDULER_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT"


def child_env(devices, kind=None):
    """Environment for a child that must see `devices` simulated CPU devices.

    Args:
        devices: simulated CPU devices.
        kind: the job's kind; "plain" (the keras-hub recipe) runs with XLA's default CPU schedule.
    """
    from keras_tune.environment import cpu_scheduler_flag_known

    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    flags = re.sub(r"--xla_cpu_scheduler_type=\S+", "", flags)
    if kind == "plain" and cpu_scheduler_flag_known():
        flags = f"{flags} {PLAIN_SCHEDULER_FLAG}"
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["KERAS_BACKEND"] = "jax"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_output_dir(job, tag):
    """Where a child's training run writes its adapter and logs.

    Beside the job's log and result file when the parent gave one (so nothing is
    left behind in the temp folder per run), else a new temp dir. A folder left
    by an earlier run in the same log dir is emptied first: the fit would
    otherwise resume from its checkpoint and measure nothing.

    Args:
        job: the child's job; its `result_path`, when present, names the folder.
        tag: name of the run inside that folder.
    """
    result_path = job.get("result_path")
    if result_path:
        run_dir = Path(result_path).parent / f"{tag}.run"
        shutil.rmtree(run_dir, ignore_errors=True)
        return str(run_dir)
    return tempfile.mkdtemp(prefix="kt_bench_run_")


def spawn(script, job, devices, timeout, log_dir=None):
    """Runs `python script --child JOB_JSON` on `devices` simulated devices; returns its result dict.

    A child that fails or runs out of time gives `{"error": ...}` with the tail of
    its output, so one broken side still leaves a table with the others.

    Args:
        script: path of a benchmark script whose `--child` mode takes the job.
        job: JSON-ready dict describing what the child measures.
        devices: simulated CPU device count for the child's JAX.
        timeout: seconds before the child is killed.
        log_dir: where the child's output is kept (a temp dir if None).
    """
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="kt_bench_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    name = job.get("name", "job")
    result_path = log_dir / f"{name}.result.json"
    log_path = log_dir / f"{name}.log"
    job = dict(job, result_path=str(result_path))
    started = time.time()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, str(script), "--child", json.dumps(job)],
                env=child_env(devices, job.get("kind")),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                cwd=str(REPO),
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.time() - started
    if code == 0 and result_path.is_file():
        result = json.loads(result_path.read_text())
        result["process_wall_s"] = round(wall, 1)
        return result
    tail = log_path.read_text(errors="replace").strip().splitlines()[-6:] if log_path.is_file() else []
    return {"name": name, "error": f"exit {code}: " + " | ".join(tail)[-600:], "process_wall_s": round(wall, 1)}


class _Turns:
    """Child side of the round-robin: blocks until the parent hands it the turn.

    Built from the job's `turn_fds` (read, write) pipe ends; without them every
    call returns at once (a child measured on its own).
    """

    def __init__(self, job):
        fds = job.get("turn_fds")
        self.every = int(job.get("turn_steps") or 0)
        self.read_fd, self.write_fd = fds if fds else (None, None)

    @property
    def active(self):
        return self.read_fd is not None

    def _say_and_wait(self, word):
        if not self.active:
            return
        os.write(self.write_fd, word.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(self.read_fd, 1)
            if not chunk:
                raise RuntimeError("the benchmark parent went away")
            data += chunk

    def ready(self):
        """Everything built: wait for the first turn."""
        self._say_and_wait("R")

    def after_step(self, done, total):
        """After `done` of `total` steps: hand the turn on every `every` steps; wait at the end."""
        if done >= total:
            self._say_and_wait("F")  # finished: idle until every side is, then wrap up
        elif self.every and done % self.every == 0:
            self._say_and_wait("Y")


def run_in_turns(script, jobs, devices, timeout, log_dir, turn_steps, settle_s=0.3):
    """Starts every job's child at once and lets them train in turns of `turn_steps` steps.

    Each child builds its model and data, then waits; once all are ready, one
    child at a time runs `turn_steps` steps while the others sit blocked on a
    pipe (using no CPU), round-robin, until all have run all their steps. Every
    side thus sees the same machine load within a second or so: the fair way to
    compare step times on a machine other people are using. Child start-up and
    wrap-up never overlap anyone's timed steps, and `settle_s` seconds pass
    between turns so the input-pipeline threads of the side that just stopped
    (which go on prefetching, e.g. the keras-hub recipe's per-batch tokenizing)
    are done before the next side's clock runs.

    Returns the children's result dicts in the order of `jobs`.
    """
    import select

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + timeout
    children = []
    for job in jobs:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        result_path = log_dir / f"{job['name']}.result.json"
        child_job = dict(job, result_path=str(result_path), turn_fds=[to_child_r, from_child_w], turn_steps=turn_steps)
        log = open(log_dir / f"{job['name']}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, str(script), "--child", json.dumps(child_job)],
            env=child_env(devices, job.get("kind")), stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
            pass_fds=(to_child_r, from_child_w),
        )
        os.close(to_child_r)
        os.close(from_child_w)
        children.append({"job": job, "proc": proc, "log": log, "send": to_child_w, "recv": from_child_r,
                         "result_path": result_path, "state": "starting", "started": time.time()})

    def read_word(child, wait):
        ready, _, _ = select.select([child["recv"]], [], [], wait)
        if not ready:
            return None
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(child["recv"], 1)
            if not chunk:
                return "EOF"
            data += chunk
        return data.decode().strip()

    def send(child, word):
        try:
            os.write(child["send"], word.encode() + b"\n")
        except OSError:
            child["state"] = "dead"

    try:
        # 1. Wait until every child has built everything (or died).
        for child in children:
            word = read_word(child, max(1.0, deadline - time.time()))
            child["state"] = "ready" if word == "R" else "dead"
        # 2. Round-robin turns.
        active = [c for c in children if c["state"] == "ready"]
        while active and time.time() < deadline:
            for child in list(active):
                if len(active) > 1:
                    time.sleep(settle_s)
                send(child, "G")
                word = read_word(child, max(1.0, deadline - time.time()))
                if word == "Y":
                    continue
                active.remove(child)
                child["state"] = "finished" if word == "F" else "dead"
        # 3. Let them all wrap up.
        for child in children:
            if child["state"] == "finished":
                send(child, "X")
        for child in children:
            try:
                child["proc"].wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                child["proc"].kill()
                child["proc"].wait()
    finally:
        for child in children:
            if child["proc"].poll() is None:
                child["proc"].kill()
                child["proc"].wait()
            for fd in (child["send"], child["recv"]):
                try:
                    os.close(fd)
                except OSError:
                    pass
            child["log"].close()

    results = []
    for child in children:
        wall = round(time.time() - child["started"], 1)
        if child["proc"].returncode == 0 and child["result_path"].is_file():
            result = json.loads(child["result_path"].read_text())
            result["process_wall_s"] = wall
        else:
            log_path = log_dir / f"{child['job']['name']}.log"
            tail = log_path.read_text(errors="replace").strip().splitlines()[-6:]
            result = {"name": child["job"]["name"],
                      "error": f"exit {child['proc'].returncode}: " + " | ".join(tail)[-600:]}
        results.append(result)
    return results


def measure_command(command, log_path, env, timeout=1800):
    """Runs `command` from the repository root, its output to `log_path`.

    Returns:
        `(exit code, peak RSS bytes of that process (wait4's ru_maxrss), wall seconds)`;
        a command past `timeout` seconds is killed.
    """
    started = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                process.kill()
            time.sleep(0.05)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, time.time() - started


def short_error(text, limit=200):
    """The most telling line of a child's error (the last one naming an Error), cut to `limit`."""
    parts = [p.strip() for p in str(text).split(" | ")]
    named = [p for p in parts if "Error" in p or "error" in p]
    return (named[-1] if named else parts[-1])[:limit]


def child_main(handlers):
    """Entry of a child: `--child JOB_JSON`; runs `handlers[job["kind"]](job)` and writes its dict."""
    job = json.loads(sys.argv[sys.argv.index("--child") + 1])
    result = handlers[job["kind"]](job)
    result.setdefault("name", job.get("name"))
    result["peak_rss_mb"] = peak_rss_mb()
    Path(job["result_path"]).write_text(json.dumps(result, indent=1, default=float))


def peak_rss_mb():
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ---------------------------------------------------------------------------
# MTNT-like data: short translation pairs with MTNT's skewed lengths.

_EN = (
    "the a this that my your we they it is was are be have not very really just so but and or if when "
    "what why how where who movie game post thread comment reddit people time day week year thing way "
    "good bad great best worst new old first last long little big small right wrong sure maybe never "
    "always still again today tonight tomorrow guy friend team player city country work school home "
    "think know want need like love hate see look make take get give say tell play watch read write "
    "lol honestly actually literally probably though because about with without from into over"
).split()
_FR = (
    "le la les un une ce cette mon ton nous ils elle est était sont être avoir pas très vraiment juste "
    "mais et ou si quand quoi pourquoi comment où qui film jeu message fil commentaire gens temps jour "
    "semaine année chose façon bon mauvais meilleur pire nouveau vieux premier dernier long petit grand "
    "toujours encore aujourd'hui ce soir demain gars ami équipe joueur ville pays travail école maison "
    "penser savoir vouloir besoin aimer détester voir regarder faire prendre donner dire jouer lire écrire "
    "mdr honnêtement en fait littéralement probablement parce que avec sans depuis dans sur"
).split()
PROMPT_TEMPLATE = "Translate this into French:\n{source}\n"


def _sentence(rng, words, count):
    text = " ".join(rng.choice(words, size=count))
    text = text[0].upper() + text[1:]
    return text + rng.choice([".", "?", "!", "...", " :)", ""], p=[0.55, 0.15, 0.1, 0.08, 0.04, 0.08])


def mtnt_like_pairs(count, seed=0):
    """Deterministic (source, target) pairs with an MTNT-like, long-tailed length distribution.

    MTNT (Reddit comments and their translations) is mostly one short sentence
    with a long tail of multi-sentence comments: source word counts here are
    log-normal (median 11 words, clipped to 2..90) and the target is ~1.15x as
    long, with the same seed giving the same pairs.

    Args:
        count: number of pairs.
        seed: RNG seed.
    """
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.lognormal(np.log(11), 0.75, size=count)), 2, 90).astype(int)
    pairs = []
    for n in lengths:
        target_n = max(2, int(round(n * rng.uniform(1.0, 1.3))))
        pairs.append((_sentence(rng, _EN, n), _sentence(rng, _FR, target_n)))
    return pairs


def write_mtnt_like(directory, count, seed=0):
    """Writes `count` MTNT-like pairs as prompt/response JSONL; returns (path, plain strings).

    The JSONL feeds keras_tune's `text` recipe (prompt carries no loss); the
    plain strings (prompt + target in one string, as the seed notebooks feed
    `fit`) feed the keras-hub recipe. Both hold the same text.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"mtnt_like_{count}_{seed}.jsonl"
    strings = []
    with open(path, "w") as file:
        for source, target in mtnt_like_pairs(count, seed):
            prompt = PROMPT_TEMPLATE.format(source=source)
            file.write(json.dumps({"prompt": prompt, "response": target}) + "\n")
            strings.append(prompt + target)
    return str(path), strings


def read_plain_strings(path):
    """The plain-recipe strings (prompt + response) of a file written by `write_mtnt_like`."""
    with open(path) as file:
        return [(r["prompt"] + r["response"]) for r in map(json.loads, file)]


# ---------------------------------------------------------------------------
# Step timing (imported in children only: needs keras and jax).

COMPILE_STEP_SECONDS = 0.2  # a backend compile longer than this marks a step as a compile step


def make_step_timer(job=None):
    """Returns a keras callback that times every training step, and marks compile steps.

    The callback reads the step's logs, which waits for the step to finish, so
    each interval is one whole step: input fetch, dispatch and device compute.
    A JAX monitoring listener notes every backend compile; a step during which
    an XLA program of more than `COMPILE_STEP_SECONDS` was compiled is a
    compile step (the first step, and the first step of each new bucket
    length) and is kept out of the steady-state figures.

    With a job that holds `turn_fds` (see `run_in_turns`) the timer also waits
    for its turn before the first step and every `turn_steps` steps; waiting
    time is never part of a step.

    Args:
        job: the child's job (`steps` and the optional turn pipes are read).
    """
    import jax
    import keras

    compiles, lowering = [], []

    def listener(name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append((time.perf_counter(), duration))
        elif name in ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration"):
            lowering.append((time.perf_counter(), duration))

    jax.monitoring.register_event_duration_secs_listener(listener)

    turns = _Turns(job or {})
    total_steps = int((job or {}).get("steps") or 0)

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.starts, self.ends, self.begin, self.last = [], [], None, None
            self.compiles = compiles

        def on_train_begin(self, logs=None):
            turns.ready()
            self.begin = self.last = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            # `logs` arrive as Python numbers (this callback is not async-safe): the step is done.
            self.starts.append(self.last)
            self.ends.append(time.perf_counter())
            if turns.active:
                turns.after_step(len(self.ends), total_steps)
            self.last = time.perf_counter()

        def summary(self, tokens_per_step, nonpad_per_step=None, loss_per_step=None):
            """Figures over the steady steps (compile steps left out).

            Two kinds of rate: plain ones (work / summed step time) and `_robust`
            ones, where each step counts at the median time of steps of its shape
            (padded positions), so a few steps slowed by other processes on a
            shared machine do not move the figure.
            """
            starts = self.starts
            steps = []
            for i, (start, end) in enumerate(zip(starts, self.ends)):
                compiled = sum(d for t, d in compiles if start <= t <= end and d > COMPILE_STEP_SECONDS)
                steps.append({"i": i, "s": end - start, "compile": compiled > 0})
            steady = [s for s in steps if not s["compile"]]
            compile_steps = [s for s in steps if s["compile"]]
            steady_s = sum(s["s"] for s in steady)
            out = {
                "steps": len(steps),
                "steady_steps": len(steady),
                "compile_steps": len(compile_steps),
                "first_step_s": round(steps[0]["s"], 3) if steps else None,
                "compile_steps_s": round(sum(s["s"] for s in compile_steps), 3),
                "steady_s": round(steady_s, 3),
                "steps_per_s": round(len(steady) / steady_s, 3) if steady_s else None,
                "step_ms_median": round(1000 * float(np.median([s["s"] for s in steady])), 2) if steady else None,
            }

            def rate(per_step):
                if not steady_s:
                    return None
                if callable(per_step):
                    return round(sum(per_step(s["i"]) for s in steady) / steady_s, 1)
                return round(per_step * len(steady) / steady_s, 1)

            # Where the compile steps' time goes: XLA compiling vs tracing and lowering to MLIR.
            windows = list(zip(starts, self.ends))

            def within(events):
                return sum(d for t, d in events if any(a <= t <= b for a, b in windows))

            out["xla_compile_s"] = round(within(compiles), 3)
            out["trace_lower_s"] = round(within(lowering), 3)
            # End to end: every step, compiles included (what a short run sees), waits for turns left out.
            total_s = sum(s["s"] for s in steps)
            out["total_s"] = round(total_s, 3)
            if nonpad_per_step is not None and total_s:
                per = nonpad_per_step
                done = sum(per(s["i"]) for s in steps) if callable(per) else per * len(steps)
                out["nonpad_tokens_per_s_with_compile"] = round(done / total_s, 1)
            out["tokens_per_s"] = rate(tokens_per_step)

            def per(value, i):
                return value(i) if callable(value) else value

            by_shape = {}
            for s in steady:
                by_shape.setdefault(per(tokens_per_step, s["i"]), []).append(s["s"])
            median_of = {shape: float(np.median(times)) for shape, times in by_shape.items()}
            robust_s = sum(median_of[per(tokens_per_step, s["i"])] for s in steady)
            if robust_s:
                out["steps_per_s_robust"] = round(len(steady) / robust_s, 3)
                out["tokens_per_s_robust"] = round(sum(per(tokens_per_step, s["i"]) for s in steady) / robust_s, 1)
                for name, value in (("nonpad", nonpad_per_step), ("loss", loss_per_step)):
                    if value is not None:
                        out[f"{name}_tokens_per_s_robust"] = round(sum(per(value, s["i"]) for s in steady) / robust_s, 1)
                out["step_ms_by_positions"] = {str(k): round(1000 * v, 2) for k, v in sorted(median_of.items())}
            if nonpad_per_step is not None:
                out["nonpad_tokens_per_s"] = rate(nonpad_per_step)
            if loss_per_step is not None:
                out["loss_tokens_per_s"] = rate(loss_per_step)
            return out

    return StepTimer()


# ---------------------------------------------------------------------------
# Tables.


def fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def table(rows, columns):
    """A Markdown table: `columns` is a list of (header, key or callable)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for _, key in columns:
            value = key(row) if callable(key) else row.get(key)
            cells.append(fmt(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
