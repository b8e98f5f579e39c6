"""Device mesh, layout maps as data, and the sharding plan of a model.

A layout file (`layouts/<family>_<style>.json`) maps variable-path regexes to
mesh axes, with fallbacks for tensors whose sharded dimension does not divide
the mesh axis (one key/value head on an 8-way model axis, say). `plan_sharding`
resolves every variable of an abstract model (shapes only, no memory) against a
mesh, checks each rule and dimension, and hands back the plan from which the
keras `ModelParallel` distribution, the sharding table and the per-device
memory figures are all derived, so they cannot disagree.

Example:

```python
import keras_tune
config = keras_tune.load_config("gemma_tiny", overrides={"distribution.mesh": "2x4"})
plan = keras_tune.plan_sharding(config, keras_tune.abstract_model(config).weights)
keras.distribution.set_distribution(plan.distribution())
print(plan.table())
```
"""

import dataclasses
import json
import math
import os
import re
from importlib import util as importlib_util
from pathlib import Path

from keras_tune import compat
from keras_tune.errors import UserError
from keras_tune.models import families

MESH_AXES = ("batch", "model")
# An optional third mesh axis ("BxMxE"): mixture-of-experts weights split their experts over it.
EXPERT_AXIS = "experts"


def simulate_devices(count):
    """Makes JAX expose `count` CPU devices. Call before JAX initializes.

    Args:
        count: number of simulated host devices (0 leaves things as they are).
    """
    if not count:
        return
    import sys

    if "jax" in sys.modules:
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", count)
        except Exception:  # backend already initialized: checked below
            pass
        jax.config.update("jax_platforms", "cpu")
        if len(jax.devices()) != count:
            raise UserError(
                f"--simulate-devices {count}: JAX already started with {len(jax.devices())} devices; "
                "pass the flag on the command line before anything imports JAX"
            )
        return
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


INITIALIZATION_TIMEOUT_S = 60
_COORDINATOR = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:(\d{1,5})$")


def _multi_process_request(dist):
    """`(coordinator, num_processes, process_id)` the config or Keras' variables ask for, or None."""
    if dist.coordinator or dist.num_processes > 1:
        if not (dist.coordinator and dist.num_processes > 1 and dist.process_id >= 0):
            raise UserError(
                f"multi-process run: got --coordinator '{dist.coordinator}', --num-processes {dist.num_processes}, "
                f"--process-id {dist.process_id}; expected all three (e.g. --coordinator 10.0.0.1:1234 "
                "--num-processes 2 --process-id 0)"
            )
        if not _COORDINATOR.match(dist.coordinator) or int(dist.coordinator.rsplit(":", 1)[1]) > 65535:
            raise UserError(f"--coordinator '{dist.coordinator}': expected HOST:PORT, e.g. 10.0.0.1:1234")
        return dist.coordinator, dist.num_processes, dist.process_id
    if os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES") or os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES"):
        return None, None, None  # keras.distribution.initialize reads its own variables
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return None, None, None  # a Cloud TPU pod slice: JAX discovers every host itself
    return None


# JAX's own heartbeat timeout: how long its coordination service waits before it aborts every
# process for a silent one. Kept above keras_tune's step and slow-phase timeouts, so the watchdog's
# one line comes first even when a peer stops during a compile, a checkpoint or an evaluation.
DEFAULT_HEARTBEAT_TIMEOUT_S = 100


def heartbeat_timeout(step_timeout, compile_timeout=0):
    """JAX's heartbeat timeout for a run whose steps may take `step_timeout` seconds.

    Args:
        step_timeout: `train.step_timeout` (0: the watchdog is off).
        compile_timeout: `train.compile_timeout`, what a slow phase (a first step, a
            checkpoint, an evaluation's start) may take while the watchdog waits.
    """
    if not step_timeout:
        return DEFAULT_HEARTBEAT_TIMEOUT_S
    return max(DEFAULT_HEARTBEAT_TIMEOUT_S, int(max(step_timeout, compile_timeout)) + 60)


def start_processes(config):
    """Starts JAX's multi-controller runtime for a multi-process run; does nothing for one process.

    Called before anything touches a device. Reads `--coordinator`,
    `--num-processes`, `--process-id`, else Keras' `KERAS_DISTRIBUTION_*`
    variables, else a Cloud TPU pod's own discovery. On CPU hosts, collectives
    go through gloo. A coordinator nobody answers, or a set of processes that
    never completes, is one `error:` line and exit 2 after
    `INITIALIZATION_TIMEOUT_S` seconds, not a hang.

    Args:
        config: the validated run config.

    Returns:
        True when several processes take part.
    """
    import sys
    import threading

    request = _multi_process_request(config.distribution)
    if request is None:
        return False
    import jax

    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not config.run.verbose:
        from keras_tune.environment import hide_gloo_connection_lines

        hide_gloo_connection_lines()
    coordinator, count, index = request
    timeout = float(os.environ.get("KERAS_TUNE_INITIALIZATION_TIMEOUT_S", INITIALIZATION_TIMEOUT_S))

    def give_up():  # the runtime blocks in C++: only leaving the process ends the wait
        print(f"error: --coordinator {coordinator or 'from the environment'}: the {count or 'expected'} processes "
              f"did not all connect within {timeout:g} s; expected process 0 listening at that address and every "
              "--process-id from 0 to N-1 started with the same --num-processes", file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        heartbeat_s = heartbeat_timeout(config.train.step_timeout, config.train.compile_timeout)
        compat.initialize_processes(coordinator, count, index, heartbeat_s)
    finally:
        watchdog.cancel()
    return jax.process_count() > 1


def parse_mesh(text, device_count):
    """Turns `"BxM"`, `"BxMxE"` or `"auto"` into `(batch, model)` or `(batch, model, experts)` sizes.

    Args:
        text: the `--mesh` value.
        device_count: how many devices JAX sees.
    """
    if text == "auto":
        return 1, device_count
    match = re.fullmatch(r"(\d+)x(\d+)(?:x(\d+))?", text or "")
    if not match:
        raise UserError(f"--mesh '{text}' is not of the form BxM (e.g. 1x8), BxMxE (e.g. 1x2x4) or 'auto'")
    sizes = tuple(int(group) for group in match.groups() if group is not None)
    if min(sizes) < 1:
        raise UserError(f"--mesh {text}: {'both axes' if len(sizes) == 2 else 'every axis'} must be at least 1, "
                        f"e.g. 1x{device_count}")
    if math.prod(sizes) != device_count:
        raise UserError(
            f"--mesh {text} needs {math.prod(sizes)} devices but {device_count} were found; "
            f"use a mesh whose product is {device_count} (e.g. 1x{device_count}), or --simulate-devices "
            f"{math.prod(sizes)} on CPU"
        )
    return sizes


def make_mesh(text, devices=None):
    """Builds a `keras.distribution.DeviceMesh` with axes ("batch", "model") (and "experts" for BxMxE).

    Args:
        text: the `--mesh` value, "BxM" or "auto".
        devices: devices to use; defaults to every device JAX sees (a test
            passes the first one for a 1x1 mesh).
    """
    import keras

    all_devices = devices if devices is not None else keras.distribution.list_devices()
    sizes = parse_mesh(text, len(all_devices))
    return keras.distribution.DeviceMesh(
        shape=sizes, axis_names=(MESH_AXES + (EXPERT_AXIS,))[: len(sizes)], devices=all_devices[: math.prod(sizes)]
    )


@dataclasses.dataclass(frozen=True)
class LayoutRule:
    pattern: str
    candidates: tuple  # tuples of axes, first preferred
    why: str = ""
    optional: bool = False  # may match no variable (layers only some models of the family have)


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    family: str
    description: str
    rules: tuple


def layout_dir():
    """Directory holding the shipped layout files (works from a wheel too)."""
    spec = importlib_util.find_spec("keras_tune.layouts")
    return Path(list(spec.submodule_search_locations)[0])


def list_layouts():
    """Returns the names of the shipped layouts, sorted."""
    return sorted(path.stem for path in layout_dir().glob("*.json"))


def load_layout(name_or_path, family=None):
    """Reads a layout from a shipped name (`gemma_tp`) or a JSON file path.

    Args:
        name_or_path: layout name or path to a `.json` file in the same format.
        family: the model family; a layout written for another family is refused.
    """
    path = Path(name_or_path)
    if not (name_or_path.endswith(".json") or os.sep in name_or_path):
        path = layout_dir() / f"{name_or_path}.json"
    if not path.is_file():
        raise UserError(
            f"unknown layout '{name_or_path}'; expected one of {', '.join(list_layouts())} or a path to a .json layout"
        )
    try:
        data = json.loads(path.read_text())
        rules = tuple(
            LayoutRule(
                pattern=rule["pattern"],
                candidates=tuple(tuple(axes) for axes in [rule["axes"], *rule.get("fallback", [])]),
                why=rule.get("why", ""),
                optional=bool(rule.get("optional", False)),
            )
            for rule in data["rules"]
        )
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"layout {path}: not a valid layout file ({error}); expected {{'rules': [{{'pattern', 'axes'}}]}}")
    for rule in rules:
        try:
            re.compile(rule.pattern)
        except re.error as error:
            raise UserError(f"layout {path}: rule '{rule.pattern}' is not a valid regex ({error})")
        for axes in rule.candidates:
            bad = [axis for axis in axes if axis not in (*MESH_AXES, EXPERT_AXIS, None)]
            if bad:
                raise UserError(f"layout {path}: rule '{rule.pattern}' names mesh axes {bad}; "
                                f"expected {(*MESH_AXES, EXPERT_AXIS)} or null")
    layout_family = data.get("family", family)
    if family and layout_family != family:
        raise UserError(
            f"layout '{name_or_path}' is written for {layout_family} models but the preset is {family}; "
            f"expected a {family}_* layout such as {family}_tp"
        )
    return Layout(path.stem, layout_family, data.get("description", ""), rules)


@dataclasses.dataclass
class Placement:
    """Where one variable lives: its axes and how they were chosen."""

    path: str
    shape: tuple
    dtype: str
    trainable: bool
    axes: tuple
    rule: str = ""
    note: str = ""

    def shard_factor(self, mesh_sizes):
        # An axis the mesh lacks ("experts" on a BxM mesh) has size 1.
        return math.prod(mesh_sizes.get(axis, 1) for axis in self.axes if axis)


def _fits(shape, axes, mesh_sizes):
    return len(axes) == len(shape) and all(
        axis is None or dim % mesh_sizes.get(axis, 1) == 0 for dim, axis in zip(shape, axes)
    )


def resolve_layout(layout, variables, mesh_sizes):
    """Chooses each variable's axes from the layout; checks every rule.

    Args:
        layout: a `Layout`.
        variables: keras variables (abstract ones are fine: only path, shape,
            dtype and trainable are read).
        mesh_sizes: mapping of axis name to size, e.g. {"batch": 2, "model": 4}.

    Returns:
        A list of `Placement`, one per variable, in the model's order.
    """
    placements, matched = [], {rule.pattern: 0 for rule in layout.rules}
    for variable in variables:
        path, shape = variable.path, tuple(variable.shape)
        rules = [rule for rule in layout.rules if re.fullmatch(rule.pattern, path)]
        if len(rules) > 1:
            raise UserError(
                f"layout {layout.name}: variable {path} matches several rules {[r.pattern for r in rules]}; "
                "expected at most one"
            )
        axes, rule_pattern, note = (None,) * len(shape), "", ""
        if rules:
            rule = rules[0]
            matched[rule.pattern] += 1
            fitting = [axes for axes in rule.candidates if _fits(shape, axes, mesh_sizes)]
            if not fitting:
                first = rule.candidates[0]
                bad = next(
                    (f"dimension {i} ({dim}) does not divide mesh axis '{axis}' of size {mesh_sizes.get(axis, 1)}"
                     for i, (dim, axis) in enumerate(zip(shape, first)) if axis and dim % mesh_sizes.get(axis, 1))
                    if len(first) == len(shape) else None,
                    f"rule has {len(first)} axes but the variable has {len(shape)} dimensions",
                )
                raise UserError(
                    f"layout {layout.name}: rule '{rule.pattern}' cannot shard {path} of shape {shape}: {bad}, "
                    "and no fallback fits; expected dimensions divisible by the mesh axes"
                )
            axes, rule_pattern = fitting[0], rule.pattern
            if axes != rule.candidates[0]:
                note = f"fallback: {rule.candidates[0]} does not divide {shape}"
            axes = tuple(axis if axis in mesh_sizes else None for axis in axes)  # "experts" on a BxM mesh
        placements.append(
            Placement(path, shape, str(variable.dtype), bool(variable.trainable), tuple(axes), rule_pattern, note)
        )
    placements = _lora_follows_its_kernel(placements, mesh_sizes)
    optional = {rule.pattern for rule in layout.rules if rule.optional}
    unused = [pattern for pattern, count in matched.items() if count == 0 and pattern not in optional]
    if unused:
        raise UserError(
            f"layout {layout.name}: rule '{unused[0]}' matches no variable of this model; "
            f"expected paths such as {placements[1].path if len(placements) > 1 else '...'}"
        )
    return placements


def _lora_follows_its_kernel(placements, mesh_sizes):
    """Shards each LoRA matrix no rule placed the way its base kernel is sharded.

    `lora_kernel_a` has the kernel's shape with the last dimension replaced by
    the rank, `lora_kernel_b` is `(rank, last dimension)`: A takes the kernel's
    axes but the last, B the last one, where the dimension divides the axis.
    Replicated, the LoRA weights of Gemma 7B r4 and their AdamW state would take
    126 MiB on every device.
    """
    by_path = {p.path: p for p in placements}
    out = []
    for placement in placements:
        base = placement.path.rsplit("/", 1)[0] + "/kernel"
        kernel = by_path.get(base)
        if placement.rule or kernel is None or not placement.path.endswith(("/lora_kernel_a", "/lora_kernel_b")):
            out.append(placement)
            continue
        if placement.path.endswith("_a"):
            axes = tuple(kernel.axes[:-1]) + (None,)
        else:
            axes = (None, kernel.axes[-1])
        if any(axes) and _fits(placement.shape, axes, mesh_sizes):
            placement = dataclasses.replace(placement, axes=axes, note=f"as {base}")
        out.append(placement)
    return out


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4, "int8": 1, "float64": 8}


@dataclasses.dataclass
class ShardingPlan:
    """A mesh, a layout and every variable's placement."""

    mesh: object
    layout: Layout
    placements: list

    @property
    def mesh_sizes(self):
        return dict(zip(self.mesh.axis_names, self.mesh.shape))

    def layout_map(self):
        """A keras `LayoutMap` keyed by exact variable paths (no regex ambiguity)."""
        import keras

        layout_map = keras.distribution.LayoutMap(self.mesh)
        for placement in self.placements:
            if any(placement.axes):
                layout_map[re.escape(placement.path)] = placement.axes
        return layout_map

    def distribution(self):
        """The keras `ModelParallel` distribution for this plan (see `PlanParallel`)."""
        return _plan_parallel_class()(layout_map=self.layout_map(), batch_dim_name="batch")

    def memory(self, optimizer_slots=2, dtype_bytes=None):
        """Bytes per device for base weights, LoRA/trainable weights and optimizer state.

        Args:
            optimizer_slots: state tensors per trainable variable (AdamW 2, SGD 0/1).
            dtype_bytes: override the bytes per element (planning in another precision).
        """
        sizes = self.mesh_sizes
        totals = {"frozen": 0, "trainable": 0, "optimizer": 0, "replicated": 0}
        for placement in self.placements:
            per = dtype_bytes or _DTYPE_BYTES.get(placement.dtype, 4)
            nbytes = math.prod(placement.shape) * per / placement.shard_factor(sizes)
            totals["trainable" if placement.trainable else "frozen"] += nbytes
            if placement.trainable:
                # Optimizer slots take the variable's layout and stay float32.
                totals["optimizer"] += optimizer_slots * math.prod(placement.shape) * 4 / placement.shard_factor(sizes)
            if not any(placement.axes):
                totals["replicated"] += nbytes
        return totals

    def table(self, paths=None):
        """The sharding table: path, shape, PartitionSpec (and fallbacks), plus totals.

        Args:
            paths: variables to list; defaults to the embedding and the first
                decoder block, as the seed tutorial prints.
        """
        rows = [
            p for p in self.placements
            if (paths is None and (p.path.startswith("token_embedding/") or p.path.startswith("decoder_block_0/")))
            or (paths is not None and p.path in paths)
        ]
        width = max([len(p.path) for p in rows] + [8])
        lines = [f"{'variable':<{width}}  {'shape':<20} {'PartitionSpec':<28} note"]
        for p in rows:
            spec = "PartitionSpec(" + ", ".join(repr(a) for a in p.axes) + ")"
            note = p.note or ("replicated" if not any(p.axes) else "")
            lines.append(f"{p.path:<{width}}  {str(p.shape):<20} {spec:<28} {note}")
        memory = self.memory()
        lines.append(
            f"mesh {self.mesh.shape} {self.mesh.axis_names}, layout {self.layout.name}: "
            f"{len(self.placements)} variables, {sum(1 for p in self.placements if any(p.axes))} sharded, "
            f"{format_bytes(memory['replicated'])} replicated per device"
        )
        return "\n".join(lines)


def packed_layout_axes(shape, model_size):
    """Axes for a variable whose planned layout no longer fits its rank (an int4 kernel, packed to 2-D).

    Shards the last (output) dimension over "model" where it divides, else the
    first, else replicates: a quantized kernel is the model's bulk, and Keras
    would otherwise fail on a layout of the unquantized rank.

    Args:
        shape: the variable's shape.
        model_size: the size of the mesh's "model" axis.
    """
    axes = [None] * len(shape)
    for dim in (len(shape) - 1, 0):
        if len(shape) and model_size > 1 and shape[dim] % model_size == 0:
            axes[dim] = "model"
            break
    return tuple(axes)


def _plan_parallel_class():
    import keras

    class PlanParallel(keras.distribution.ModelParallel):
        """`ModelParallel` whose layout follows the plan, re-laid for variables that changed rank.

        Keras' `quantize("int4")` replaces a kernel by a packed 2-D one under the
        same path; the plan's layout of the float kernel cannot apply to it.
        """

        def get_variable_layout(self, variable):
            layout = super().get_variable_layout(variable)
            if layout.axes is not None and len(layout.axes) != len(variable.shape):
                model_size = dict(zip(self.device_mesh.axis_names, self.device_mesh.shape)).get("model", 1)
                return keras.distribution.TensorLayout(packed_layout_axes(variable.shape, model_size), self.device_mesh)
            return layout

    return PlanParallel


def plan_sharding(config, variables, devices=None):
    """Resolves the config's mesh and layout against a model's variables.

    Args:
        config: a validated run config.
        variables: the model's variables (from `keras_tune.abstract_model`).
        devices: devices for the mesh; defaults to all.
    """
    mesh = make_mesh(config.distribution.mesh, devices)
    family = families.get(config.model.family)
    layout = load_layout(config.distribution.layout or family.layout("tp"), family.name)
    placements = resolve_layout(layout, variables, dict(zip(mesh.axis_names, mesh.shape)))
    if config.data.batch_size % mesh.shape[0]:
        raise UserError(
            f"--batch-size {config.data.batch_size} does not divide over the mesh's batch axis of size "
            f"{mesh.shape[0]}; expected a multiple of {mesh.shape[0]}"
        )
    return ShardingPlan(mesh, layout, placements)


def commit_to_devices(variables):
    """Marks each variable's array as committed to the devices it is on (no copy).

    On a one-device mesh Keras keeps the arrays it creates uncommitted (its
    relayout is skipped as already equivalent), while a jitted step returns
    committed ones: the step's second call then has other argument shardings
    and compiles again (14 s on the 270M on CPU). Committing the state before
    the first step makes that first compile the only one.

    Args:
        variables: Keras variables (model, optimizer, metrics).

    Returns:
        How many were uncommitted.
    """
    import jax

    count = 0
    for variable in variables:
        value = variable.value
        if isinstance(value, jax.Array) and not value.committed:
            variable.assign(jax.device_put(value, value.sharding))  # same buffer, now committed
            count += 1
    return count


def format_bytes(count):
    """Human-readable byte count (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
