"""Process start-up: quiet native logs, and TensorFlow kept off the accelerators.

keras_tune trains with JAX and uses TensorFlow only for `tf.data` (tokenizing and
batching). The `tensorflow` wheel that tensorflow-text pulls in is built with CUDA,
so on its own it would print, on every start:

* `cudart_stub.cc ... Could not find cuda drivers on your machine, GPU will not be
  used.` (and absl's `WARNING: All log messages before absl::InitializeLog() ...`):
  logged by the CUDA runtime stub while `libtensorflow_framework.so` loads, before
  TensorFlow has read `TF_CPP_MIN_LOG_LEVEL`, so that variable cannot hide it;
* `oneDNN custom operations are on ...`: the same, from TensorFlow's CPU kernels;
* `failed call to cuInit: ... CUDA error`: TensorFlow probing for GPUs the first
  time it runs an op, on any machine without a CUDA driver;
* `normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity
  normalization.`: tensorflow-text's copy of SentencePiece, each time keras-hub
  builds a Gemma tokenizer (Gemma's SentencePiece models do no normalization).

`quiet_start()`, run by `import keras_tune` before anything imports TensorFlow or
JAX, silences these where they start. It only sets defaults: a variable you set
yourself wins, and `TF_CPP_MIN_LOG_LEVEL=0` brings every log line back. Nothing
here hides a GPU or TPU from JAX.

`keep_tensorflow_off_accelerators()` checks that TensorFlow sees only CPUs, and
hides the others if it still can; `make_datasets` calls it before any `tf.data`
work.
"""

import contextlib
import functools
import os
import re
import sys
import tempfile
import threading
import warnings

# Defaults for the environment of this process; `os.environ.setdefault`, so a
# value the user set wins.
QUIET_ENVIRONMENT = {
    # TensorFlow's C++ logging: hide INFO, keep warnings and errors.
    "TF_CPP_MIN_LOG_LEVEL": "1",
    # Register only TensorFlow's CPU device factory: TensorFlow never calls cuInit,
    # never takes GPU (or TPU) memory, and tf.data runs on the CPU as it would
    # anyway. JAX does not read this variable and still uses every accelerator.
    "TF_ENABLED_DEVICE_TYPES": "CPU",
    # TensorFlow runs only the input pipeline here (string and integer ops), which
    # oneDNN's float kernels do not touch; off, its start-up notice goes too.
    "TF_ENABLE_ONEDNN_OPTS": "0",
}

# Native log lines, as bytes: absl's format (`I0000 00:00:...  1234 file.cc:12] `,
# letter = severity), SentencePiece's (`file.cc(12) LOG(INFO) `), and absl's header.
_ABSL_LINE = re.compile(rb"^([IWEF])\d{4} [\d:.]+ +\d+ \S+:\d+\] ")
_SENTENCEPIECE_LINE = re.compile(rb"^\S+\(\d+\) LOG\((INFO|WARNING|ERROR|FATAL)\) ")
_ABSL_HEADER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3, b"INFO": 0, b"WARNING": 1, b"ERROR": 2, b"FATAL": 3}

_filter_lock = threading.RLock()
_filter_depth = 0


def min_log_level():
    """The native log level in force: `TF_CPP_MIN_LOG_LEVEL` as an int (0 to 3)."""
    try:
        return max(0, min(3, int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))))
    except ValueError:
        return 0


def is_native_noise(line, level=None):
    """Whether a raw stderr line is a native log line below the log level in force.

    Args:
        line: one line of stderr output, as bytes.
        level: the minimum severity kept (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL);
            `min_log_level()` when None.
    """
    level = min_log_level() if level is None else level
    if level <= 0:
        return False
    if line.rstrip(b"\r\n") == _ABSL_HEADER:
        return True
    match = _ABSL_LINE.match(line) or _SENTENCEPIECE_LINE.match(line)
    return bool(match) and _SEVERITY[match.group(1)] < level


@contextlib.contextmanager
def quiet_native_logs():
    """Drops native log lines below `TF_CPP_MIN_LOG_LEVEL` written to stderr inside.

    For C++ code that logs before it reads `TF_CPP_MIN_LOG_LEVEL`, or never reads it
    (static initializers of TensorFlow's shared libraries, tensorflow-text's
    SentencePiece). File descriptor 2 goes to a temporary file for the duration;
    afterwards every other line is written to stderr, in order: warnings and errors
    are delayed, not dropped (unless the process dies inside). A no-op when the
    level is 0, when stderr cannot be redirected, and when nested; other threads
    wait until the outermost one ends.
    """
    global _filter_depth
    with _filter_lock:
        capture = saved = None
        if not _filter_depth and min_log_level() > 0:
            try:
                sys.stderr.flush()
                capture = tempfile.TemporaryFile()
                saved = os.dup(2)
                os.dup2(capture.fileno(), 2)
            except (OSError, ValueError, AttributeError):
                if saved is not None:
                    os.close(saved)
                if capture is not None:
                    capture.close()
                capture = saved = None
        if capture is None:
            yield
            return
        _filter_depth += 1
        try:
            yield
        finally:
            _filter_depth -= 1
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            with capture:
                capture.seek(0)
                kept = b"".join(line for line in capture if not is_native_noise(line))
            while kept:
                kept = kept[os.write(2, kept):]


class _QuietLoader:
    """Wraps a module's loader: runs it inside `quiet_native_logs`, then `after`."""

    def __init__(self, loader, finder, after):
        self._loader, self._finder, self._after = loader, finder, after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        try:
            with quiet_native_logs():
                self._loader.exec_module(module)
        finally:
            module.__loader__ = self._loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self._loader
        self._finder.done(module.__name__)
        if self._after is not None:
            self._after(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _QuietImports:
    """`sys.meta_path` entry: the first import of each watched module is quiet."""

    def __init__(self, watched):
        self.watched = dict(watched)  # module name -> callable(module) or None

    def done(self, name):
        self.watched.pop(name, None)
        if not self.watched and self in sys.meta_path:
            sys.meta_path.remove(self)

    def find_spec(self, name, path=None, target=None):
        if name not in self.watched:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader, self, self.watched[name])
                return spec
        return None


def _quiet_sentencepiece_tokenizers(keras_hub):
    """Wraps keras-hub's `SentencePieceTokenizer.set_proto` in `quiet_native_logs`.

    Args:
        keras_hub: the imported `keras_hub` module.
    """
    cls = getattr(getattr(keras_hub, "tokenizers", None), "SentencePieceTokenizer", None)
    set_proto = getattr(cls, "set_proto", None)
    if set_proto is None or getattr(set_proto, "_keras_tune_quiet", False):
        return

    @functools.wraps(set_proto)
    def quiet_set_proto(self, proto):
        with quiet_native_logs():
            return set_proto(self, proto)

    quiet_set_proto._keras_tune_quiet = True
    cls.set_proto = quiet_set_proto


def quiet_start():
    """Silences TensorFlow's and SentencePiece's start-up logs for this process.

    Sets `QUIET_ENVIRONMENT` as defaults (before TensorFlow is imported, so they
    apply), then, unless `TF_CPP_MIN_LOG_LEVEL` is 0, makes the first import of
    `tensorflow` drop the native INFO lines it prints while loading, and keras-hub's
    SentencePiece tokenizers drop tensorflow-text's `LOG(INFO)` line. Idempotent;
    called by `import keras_tune`. CUDA_VISIBLE_DEVICES, JAX_PLATFORMS and the like
    are left alone: JAX still finds GPUs and TPUs.
    """
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if min_log_level() <= 0:
        return
    watched = {}
    if "tensorflow" not in sys.modules:
        watched["tensorflow"] = None
    if "keras_hub" in sys.modules:
        _quiet_sentencepiece_tokenizers(sys.modules["keras_hub"])
    else:
        watched["keras_hub"] = _quiet_sentencepiece_tokenizers
    if watched and not any(isinstance(finder, _QuietImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietImports(watched))


# Lines gloo (the CPU collectives of a multi-process run) prints on stdout for every
# communicator it connects, e.g. "[Gloo] Rank 1 is connected to 3 peer ranks. Expected
# number of connected peer ranks is : 3" (threads print at once, so pieces of two can share a line).
_GLOO_CONNECTED = re.compile(rb"(\[Gloo\] Rank|peer ranks\. Expected number of connected peer ranks is)")
_stdout_filter = None


def _drop_lines(reader, out, drop):
    """Copies `reader` to `out`, leaving out whole lines `drop` matches; other text passes at once."""
    pending = b""
    while True:
        try:
            chunk = os.read(reader, 1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        kept = b"".join(line + b"\n" for line in lines if not drop(line))
        if pending and not b"[Gloo]".startswith(pending[:6]):  # a partial line we keep: a progress bar's
            kept, pending = kept + pending, b""
        while kept:
            kept = kept[os.write(out, kept):]
    if pending and not drop(pending):
        os.write(out, pending)


def stdout_is_terminal():
    """Whether the process's stdout is a terminal (as it was before `hide_gloo_connection_lines`)."""
    fd = _stdout_filter[0] if _stdout_filter is not None else 1
    try:
        return os.isatty(fd)
    except OSError:
        return False


def hide_gloo_connection_lines():
    """Keeps gloo's "[Gloo] Rank N is connected to ..." lines off stdout for the rest of the process.

    File descriptor 1 goes through a pipe whose reader thread passes everything
    else on unchanged (partial lines, a progress bar's included) and drops those
    lines; at exit the pipe is drained and stdout put back. Idempotent; a no-op
    when stdout cannot be redirected.
    """
    global _stdout_filter
    if _stdout_filter is not None:
        return
    import atexit

    try:
        sys.stdout.flush()
        saved = os.dup(1)
        reader, writer = os.pipe()
        os.dup2(writer, 1)
        os.close(writer)
    except (OSError, ValueError, AttributeError):
        return
    thread = threading.Thread(target=_drop_lines, args=(reader, saved, _GLOO_CONNECTED.search),
                              name="keras_tune-stdout", daemon=True)
    thread.start()
    _stdout_filter = (saved, reader, thread)

    def restore():
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os.dup2(saved, 1)  # the pipe's last writer closes: the thread reads to the end and stops
        thread.join(timeout=5)
        os.close(reader)

    atexit.register(restore)


# XLA's CPU scheduler that orders a program to keep fewer buffers live; the
# default one orders for parallelism and computes every parameter-only value
# (transposed and int8->float kernel copies) at the start of the step.
MEMORY_SCHEDULER_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
# The first jaxlib this flag is known in; an unknown XLA flag aborts the process.
MEMORY_SCHEDULER_JAXLIB = (0, 10)


def prefer_memory_optimized_cpu_schedule():
    """Asks XLA's CPU compiler for its memory-optimized schedule, unless XLA_FLAGS already picks one.

    On the 270M (one CPU device, 256 loss tokens) the train step's temporaries
    fall from 392 to 327 MiB in float32 and from 799 to 330 MiB with an int8
    base (Keras' int8 layers convert each kernel to float; the default schedule
    converts them all up front), at the same step time. It changes only the
    order of operations, not results, and only XLA's CPU backend reads it.
    Applies to JAX backends started after the call (`import keras_tune`
    calls it); a jaxlib older than `MEMORY_SCHEDULER_JAXLIB` is left alone.

    Returns:
        Whether the flag was added to XLA_FLAGS.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_scheduler_type" in flags or "xla_cpu_enable_concurrency_optimized_scheduler" in flags:
        return False  # the user's own choice
    if not cpu_scheduler_flag_known():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {MEMORY_SCHEDULER_FLAG}".strip()
    return True


def cpu_schedule_options(schedule):
    """Compile options that pick XLA's CPU `schedule` (e.g. "CPU_SCHEDULER_TYPE_DEFAULT") for one compile.

    Empty off CPU, or where the jaxlib does not know the option (it would refuse the compile).

    Args:
        schedule: an `xla_cpu_scheduler_type` value, or None for the process's own.
    """
    import jax

    if not schedule or jax.devices()[0].platform != "cpu" or not cpu_scheduler_flag_known():
        return {}
    return {"xla_cpu_scheduler_type": schedule}


def cpu_scheduler_flag_known():
    """Whether the installed jaxlib knows `--xla_cpu_scheduler_type` (an unknown XLA flag aborts the process)."""
    try:
        from importlib.metadata import version

        release = tuple(int(part) for part in version("jaxlib").split(".")[:2])
    except Exception:  # not installed, or a version string we cannot read: say no rather than risk an abort
        return False
    return release >= MEMORY_SCHEDULER_JAXLIB


def keep_tensorflow_off_accelerators(tf=None):
    """Makes TensorFlow see only CPUs, so tf.data never takes a GPU or TPU from JAX.

    With `quiet_start()`'s `TF_ENABLED_DEVICE_TYPES=CPU` TensorFlow has no other
    device to begin with and this only checks; it matters when TensorFlow was
    imported before keras_tune or that variable was overridden. `make_datasets`
    calls it before any `tf.data` work. Once TensorFlow has run an op (building a
    keras-hub tokenizer runs one) with an accelerator visible, visibility can no
    longer change: a `RuntimeWarning` says so and the devices stay as they are.

    Args:
        tf: the `tensorflow` module (a stand-in in tests); imported when None.

    Returns:
        The sorted device types TensorFlow can see afterwards (`["CPU"]` normally).
    """
    if tf is None:
        import tensorflow as tf

    visible = tf.config.get_visible_devices()
    if any(device.device_type != "CPU" for device in visible):
        cpus = [device for device in tf.config.list_physical_devices() if device.device_type == "CPU"]
        try:
            tf.config.set_visible_devices(cpus)
        except RuntimeError as error:
            names = ", ".join(device.name for device in visible if device.device_type != "CPU")
            warnings.warn(
                f"TensorFlow already runs with {names} visible and cannot be moved off them "
                f"({error}); tf.data may hold accelerator memory that JAX needs. Import "
                "keras_tune before running any TensorFlow op.",
                RuntimeWarning,
                stacklevel=2,
            )
        visible = tf.config.get_visible_devices()
    return sorted({device.device_type for device in visible})


_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compile_listener = None


def release_memory_after_compiles():
    """From now on, returns freed heap to the operating system after every XLA compile (once per process).

    XLA's compiler frees hundreds of MB of small allocations that glibc keeps
    resident; the compiled step's temporaries, allocated next, then come on top
    of them. On the 270M (one CPU device, batch 2 x 128) this lowers a run's
    peak RSS from 2,900 to 2,724 MiB. `malloc_trim` takes milliseconds, and
    compiles are few.

    Returns:
        Whether the listener was registered by this call (False: it already was).
    """
    import jax

    global _compile_listener
    if _compile_listener is not None:
        return False

    def listener(event, duration, **kwargs):
        if event == _BACKEND_COMPILE_EVENT:
            release_freed_memory()

    _compile_listener = listener
    jax.monitoring.register_event_duration_secs_listener(listener)
    return True


def require_jax_backend():
    """Refuses to go on when Keras runs on another backend than JAX.

    `import keras_tune` picks JAX only where `KERAS_BACKEND` is unset and Keras
    was not imported yet; a notebook that imported Keras first (Kaggle's default
    backend is TensorFlow) would otherwise fail deep inside the first train step.

    Raises:
        UserError: Keras' backend is not "jax".
    """
    import keras

    from keras_tune.errors import UserError

    backend = keras.backend.backend()
    if backend != "jax":
        raise UserError(
            f"Keras runs on the {backend!r} backend; keras_tune needs 'jax': set KERAS_BACKEND=jax "
            "before Keras is first imported (or import keras_tune first) and restart the process"
        )


def release_freed_memory():
    """Returns memory the C heap keeps after frees to the operating system (glibc's `malloc_trim`).

    Loading and quantizing a model frees many mid-sized host buffers (NumPy
    temporaries of a few MB each); glibc keeps such freed heap pages resident for
    reuse, while the next large buffers (XLA's step temporaries) are mapped
    fresh, so without this both count toward the peak: 430 MB on the 270M with
    `--quantize int8`. A no-op where the C library is not glibc.

    Returns:
        Whether memory was trimmed.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return False
