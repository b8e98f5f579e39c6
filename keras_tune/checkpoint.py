"""Checkpoints on Orbax: what a run needs to continue exactly where it stopped.

A checkpoint is one step directory under `<run>/checkpoints/`, written by an
`orbax.checkpoint.CheckpointManager` (atomic: a step directory only appears once
it is complete, so a kill at any moment leaves the previous ones readable;
asynchronous: training goes on while it is written). It holds two items:

- `state`: the trainable variables (only the LoRA matrices when LoRA is on: a
  few MB even for a 7B base), every optimizer variable (moments, step counter,
  accumulators) and the random-generator states, keyed by variable path.
  Restoring reads them straight into each variable's current sharding, so a run
  can resume on another mesh.
- `meta` (JSON): the step, the data position (batches consumed; the resumed run
  skips that many batches of the deterministic training stream), what identifies
  the model (preset, architecture, LoRA rank/targets/alpha, layout), the full
  run config, the variables' shapes and a fingerprint (sum and absolute sum) of
  every array.

Resuming (`CheckpointStore.restore_latest`) tries the newest step first. A
checkpoint of another preset, rank, targets or layout is refused with both sides
named, before anything is assigned. A step whose files are unreadable, truncated
or fail their fingerprints is moved to `<run>/checkpoints-corrupt/` with a
warning, and the previous step is tried.

Example:

```python
store = CheckpointStore("runs/x", keep=3)
store.save(100, causal_lm, {"data_position": 100})
meta = store.restore_latest(causal_lm, identity=checkpoint_identity(config, "gemma_tp"))
```
"""

import json
import math
import os
import shutil
import sys
import time

import numpy as np

from keras_tune.errors import UserError, WriteFailed

FORMAT = "keras_tune.checkpoint/1"
_IDENTITY_NAMES = {
    "preset": "preset",
    "family": "model.family",
    "source": "model.source",
    "handle": "model.handle",
    "weights": "model.weights",
    "arch": "model.arch",
    "lora_rank": "lora.rank",
    "lora_targets": "lora.targets",
    "lora_alpha": "lora.alpha",
    "layout": "layout",
}


def checkpoint_dir(output_dir):
    """Where a run keeps its checkpoints."""
    return os.path.join(os.path.abspath(output_dir), "checkpoints")


def checkpoint_identity(config, layout_name):
    """What must match for a checkpoint to be loaded into this run's model.

    Args:
        config: the run config.
        layout_name: the resolved layout (the plan's, so "" and the default agree).
    """
    return {
        "preset": config.preset,
        "family": config.model.family,
        "source": config.model.source,
        "handle": config.model.handle,
        "weights": config.model.weights,
        "arch": json.loads(json.dumps(dict(config.model.arch), sort_keys=True, default=list)),
        "lora_rank": int(config.lora.rank),
        "lora_targets": sorted(config.lora.targets) if config.lora.rank else [],
        "lora_alpha": float(config.lora.alpha or config.lora.rank),
        "layout": layout_name,
    }


def _describe(identity, keys):
    return ", ".join(f"{_IDENTITY_NAMES.get(k, k)} {_short(identity.get(k))}" for k in keys)


def _short(value):
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_identity(found, expected, where):
    """Raises `UserError` naming both sides when a checkpoint belongs to another model."""
    differing = [key for key in expected if found.get(key) != expected[key]]
    if differing:
        raise UserError(
            f"checkpoint {where} was written for {_describe(found, differing)} but this run has "
            f"{_describe(expected, differing)}; expected the same preset, LoRA rank/targets/alpha and layout "
            "(pass another --output-dir to start a new run)"
        )


def _rng_variables():
    """The keras global SeedGenerator's state, if one was created."""
    from keras_tune import compat

    generator = compat.keras_global_attribute("global_seed_generator")
    return {"rng/global_seed_generator": generator.state} if generator is not None else {}


def state_variables(model):
    """The variables a checkpoint holds, keyed by stable names.

    Trainable variables by path; optimizer variables by path without the
    optimizer's own name (which Keras numbers per process: adam_w, adam_w_1...);
    seed-generator states (dropout and the keras global generator).

    Args:
        model: a compiled keras-hub CausalLM whose optimizer is built.
    """
    variables = {}
    for variable in model.trainable_variables:
        variables[f"trainable/{variable.path}"] = variable
    optimizer = model.optimizer
    if optimizer is not None:
        for variable in optimizer.variables:
            variables[f"optimizer/{variable.path.split('/', 1)[-1]}"] = variable
    for variable in model.non_trainable_variables:
        if "seed_generator" in variable.path:
            variables[f"rng/{variable.path}"] = variable
    variables.update(_rng_variables())
    return variables


def _fingerprint(value):
    import jax.numpy as jnp

    array = jnp.asarray(value).astype(jnp.float32)
    return [float(jnp.sum(array)), float(jnp.sum(jnp.abs(array)))]


def _fingerprints_match(found, expected):
    for a, b in zip(found, expected):
        scale = abs(expected[1]) + 1.0
        if not (math.isfinite(a) == math.isfinite(b)) or (math.isfinite(b) and abs(a - b) > 1e-4 * scale):
            return False
    return True


class CheckpointStore:
    """Orbax checkpoints of one run directory, with refusal and fallback.

    Args:
        output_dir: the run directory (checkpoints go to `<output_dir>/checkpoints`).
        keep: how many checkpoints to keep (the oldest are deleted).
        asynchronous: write in the background while training goes on.
        warn: where warnings go (a callable taking one line).
    """

    def __init__(self, output_dir, keep=3, asynchronous=True, warn=None):
        self.output_dir = os.path.abspath(output_dir)
        self.directory = checkpoint_dir(output_dir)
        self.keep = int(keep)
        self.asynchronous = asynchronous
        self.warn = warn or (lambda line: print(f"warning: {line}", file=sys.stderr))
        self._manager = None

    @property
    def manager(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep,
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=self.asynchronous,
            )
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        return self._manager

    def steps(self):
        """Steps with a complete checkpoint, oldest first (no Orbax needed when there are none)."""
        if not os.path.isdir(self.directory):
            return []
        if not any(name.isdigit() for name in os.listdir(self.directory)):
            return []
        return sorted(self.manager.all_steps())

    def path(self, step):
        return os.path.join(self.directory, str(step))

    def save(self, step, model, metadata=None):
        """Writes the checkpoint of `step` (returns once the arrays are copied; see `wait`).

        Args:
            step: the global step (batches trained).
            model: the compiled CausalLM, its state synced (a keras callback's `self.model`).
            metadata: extra JSON-able fields (config, identity, metrics...).
        """
        import orbax.checkpoint as ocp

        variables = state_variables(model)
        values = {name: variable.value for name, variable in variables.items()}
        meta = dict(metadata or {})
        meta.update(
            {
                "format": FORMAT,
                "step": int(step),
                "data_position": int(meta.get("data_position", step)),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "variables": {name: [list(v.shape), str(v.dtype)] for name, v in variables.items()},
                "fingerprints": {name: _fingerprint(value) for name, value in values.items()},
            }
        )
        try:
            self.manager.save(
                int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(values), meta=ocp.args.JsonSave(meta))
            )
        except OSError as error:
            raise self._write_failed(step, error) from None
        return meta

    def _write_failed(self, step, error):
        """The one-line error for a checkpoint that could not be written; the older ones stay."""
        older = [s for s in self.steps() if s != step]
        kept = f"the previous checkpoint {self.path(older[-1])} is intact" if older else "no earlier checkpoint exists"
        return WriteFailed(f"could not write checkpoint {step} in {self.directory}: {error.strerror or error}; {kept}")

    def wait(self):
        """Blocks until background writes are finished."""
        if self._manager is not None:
            try:
                self._manager.wait_until_finished()
            except OSError as error:
                raise self._write_failed(self._manager.latest_step(), error) from None

    def close(self):
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None

    def read_meta(self, step):
        """The JSON record of a checkpoint (raises if it is unreadable)."""
        import orbax.checkpoint as ocp

        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}; expected {FORMAT!r}")
        return meta

    def newest_meta(self):
        """`(step, meta)` of the newest checkpoint whose record reads, or `(None, None)`. Moves nothing."""
        for step in reversed(self.steps()):
            try:
                return step, self.read_meta(step)
            except Exception:  # noqa: BLE001 - judged again, with a warning, by restore_latest
                continue
        return None, None

    def quarantine(self, step, reason):
        """Moves a bad checkpoint out of the way (to `checkpoints-corrupt/`), with a warning."""
        _quiet_closed_loop_callbacks()
        corrupt = os.path.join(self.output_dir, "checkpoints-corrupt")
        os.makedirs(corrupt, exist_ok=True)
        target = os.path.join(corrupt, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(self.path(step), target)
        self.manager.reload()
        self.warn(f"checkpoint {self.path(step)} is unusable ({reason}); moved it to {target}")

    def _restore(self, step, meta, variables):
        import jax
        import orbax.checkpoint as ocp

        saved = meta.get("variables", {})
        mine = {name: [list(v.shape), str(v.dtype)] for name, v in variables.items()}
        if set(saved) != set(mine) or any(saved[k] != mine[k] for k in mine):
            key = next(k for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k))
            raise UserError(
                f"checkpoint {self.path(step)} holds {key} as {saved.get(key, 'missing')} but this run's model has "
                f"{mine.get(key, 'no such variable')}; expected a checkpoint of the same model, LoRA and optimizer "
                "(pass another --output-dir to start a new run)"
            )
        abstract = {
            name: jax.ShapeDtypeStruct(v.shape, v.value.dtype, sharding=getattr(v.value, "sharding", None))
            for name, v in variables.items()
        }
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        values = restored["state"]
        fingerprints = meta.get("fingerprints", {})
        for name, value in values.items():
            if name in fingerprints and not _fingerprints_match(_fingerprint(value), fingerprints[name]):
                raise ValueError(f"{name} does not match its fingerprint")
        return values

    def restore_latest(self, model, identity):
        """Loads the newest good checkpoint into `model`; returns its meta, or None if there is none.

        Args:
            model: the compiled CausalLM, optimizer built.
            identity: `checkpoint_identity` of this run; another is refused.
        """
        variables = state_variables(model)
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
            except Exception as error:  # noqa: BLE001 - any unreadable record means a bad checkpoint
                self.quarantine(step, f"{type(error).__name__}: {_first_line(error)}")
                continue
            check_identity(meta.get("identity", {}), identity, self.path(step))
            try:
                values = self._restore(step, meta, variables)
            except UserError:
                raise
            except Exception as error:  # noqa: BLE001 - truncated or corrupt arrays
                self.quarantine(step, f"{type(error).__name__}: {_first_line(error)}")
                continue
            # All arrays read and checked: only now is anything assigned.
            for name, variable in variables.items():
                variable.assign(values[name])
            return meta
        return None


def _quiet_closed_loop_callbacks():
    """After a failed read, TensorStore can still post a callback to the event loop Orbax
    already closed; Python would print that as an "Exception ignored" traceback on
    stderr after our one-line warning. Only that exact case is silenced."""
    previous = sys.unraisablehook
    if getattr(previous, "_keras_tune", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook._keras_tune = True
    sys.unraisablehook = hook


def _first_line(error, limit=160):
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_state_arrays(output_dir, step=None):
    """The arrays of a checkpoint as numpy, keyed by name (for inspection and tests)."""
    import orbax.checkpoint as ocp

    store = CheckpointStore(output_dir, asynchronous=False)
    step = step if step is not None else store.steps()[-1]
    restored = store.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    arrays = {name: np.asarray(value) for name, value in restored["state"].items()}
    store.close()
    return arrays
