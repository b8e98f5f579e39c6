"""What to change when a run does not fit: candidate changes re-planned in a fixed order.

`suggest` tries single changes (more model parallelism, the fsdp layout, LoRA
instead of full fine-tuning, a smaller batch, bfloat16, remat, the sparse loss,
an int8 then int4 base), then combinations of them, and names the first that fits.
"""

import copy

from keras_tune import config as config_lib
from keras_tune.distribution import plan_sharding
from keras_tune.errors import UserError
from keras_tune.memory.figures import figures
from keras_tune.models import families


# Command-line spelling of each lever the planner may suggest (the rest: --set).
_FLAGS = {
    "lora.rank": "--lora-rank",
    "data.batch_size": "--batch-size",
    "train.precision": "--precision",
    "train.quantize": "--quantize",
    "train.remat": "--remat",  # a switch
    "distribution.mesh": "--mesh",
    "distribution.layout": "--layout",
}


class Replanner:
    """Plans variants of a config on the same devices, building each abstract model once.

    Args:
        devices: the devices every variant's mesh is made of.
        arch: the backbone arguments (soft caps).
    """

    def __init__(self, devices, arch):
        self.devices = list(devices)
        self.arch = arch
        self._variables = {}

    def variables(self, config):
        """The abstract model's variables for the config's LoRA and precision (cached)."""
        from keras_tune.models.loader import abstract_model

        key = (config.lora.rank, tuple(config.lora.targets), config.train.precision)
        if key not in self._variables:
            self._variables[key] = list(abstract_model(config).weights)
        return self._variables[key]

    def report(self, config):
        """`figures` of `config` on these devices."""
        plan = plan_sharding(config, self.variables(config), devices=self.devices)
        return figures(config, plan, self.arch)


def variant(config, overrides):
    """A validated copy of `config` with dotted `overrides` applied.

    Args:
        config: a run config.
        overrides: e.g. `{"lora.rank": 4}`.
    """
    changed = copy.deepcopy(config)
    config_lib.apply_overrides(changed, overrides)
    return config_lib.validate(changed)


def as_flags(overrides):
    """The command-line spelling of config changes, e.g. "--lora-rank 4 --remat --set train.loss=sparse"."""
    parts = []
    for field, value in overrides.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if field in _FLAGS and value is True:
            parts.append(_FLAGS[field])
        else:
            parts.append(f"{_FLAGS[field]} {text}" if field in _FLAGS else f"--set {field}={text}")
    return " ".join(parts)


def _mesh_changes(config, device_count):
    batch_axis, model_axis = (int(n) for n in plan_mesh_text(config, device_count).split("x"))
    family = families.get(config.model.family)
    layout = config.distribution.layout or family.layout("tp")
    fsdp = family.layout("fsdp")
    meshes = [f"{device_count // m}x{m}" for m in range(device_count, 0, -1) if device_count % m == 0]
    current = f"{batch_axis}x{model_axis}"
    changes = [{"distribution.mesh": mesh} for mesh in meshes if int(mesh.split("x")[1]) > model_axis]
    if layout != fsdp and device_count > 1:
        for mesh in [current] + [mesh for mesh in meshes if mesh != current]:
            changes.append({"distribution.layout": fsdp, **({} if mesh == current else {"distribution.mesh": mesh})})
    return changes


def plan_mesh_text(config, device_count):
    """The config's mesh as "BxM" ("auto" is 1xN)."""
    mesh = config.distribution.mesh
    return f"1x{device_count}" if mesh == "auto" else mesh


def candidate_changes(config, device_count):
    """The single changes `suggest` tries, in its fixed order.

    More model parallelism (the same layout on a mesh with a larger model
    axis), the fsdp layout (this mesh, then the others), LoRA rank 4 instead
    of full fine-tuning, a smaller batch (halving), bfloat16, remat, the
    sparse loss, an int8 then int4 base.

    Args:
        config: the run config.
        device_count: devices of the mesh.
    """
    changes = _mesh_changes(config, device_count)
    if config.lora.rank == 0:
        changes.append({"lora.rank": 4})
    batch, batch_axis = config.data.batch_size // 2, int(plan_mesh_text(config, device_count).split("x")[0])
    while batch >= batch_axis and batch % batch_axis == 0:
        changes.append({"data.batch_size": batch})
        batch //= 2
    if config.train.precision != "bfloat16":
        changes.append({"train.precision": "bfloat16"})
    if not config.train.remat:
        changes.append({"train.remat": True})
    if config.train.loss != "sparse":
        changes.append({"train.loss": "sparse"})
    if not config.train.quantize:
        rank = {} if config.lora.rank else {"lora.rank": 4}
        changes += [{**rank, "train.quantize": "int8"}, {**rank, "train.quantize": "int4"}]
    return changes


def _try(replanner, config, overrides, memory):
    try:
        report = replanner.report(variant(config, overrides))
    except UserError:  # the change does not apply here (a layout that cannot shard, a batch that does not divide)
        return None
    return report if report.total <= memory else None


def suggest(config, replanner, memory):
    """The first candidate change that fits, or the first fitting combination of them.

    Args:
        config: the run config that does not fit.
        replanner: a `Replanner` on the run's devices.
        memory: bytes of one device.

    Returns:
        `(overrides, report)` of the change, or `(None, None)` if nothing tried fits.
    """
    changes = candidate_changes(config, len(replanner.devices))
    for overrides in changes:
        report = _try(replanner, config, overrides, memory)
        if report:
            return overrides, report
    # No single change is enough: add the levers up one after another, on each mesh and layout.
    levers = [c for c in changes if "distribution.mesh" not in c and "distribution.layout" not in c
              and "data.batch_size" not in c and "train.quantize" not in c]
    levers.append({"train.quantize": "int4"} if config.lora.rank else {"lora.rank": 4, "train.quantize": "int4"})
    for layout_change in [{}] + [c for c in changes if "distribution.layout" in c or "distribution.mesh" in c]:
        combined = dict(layout_change)
        for lever in levers:
            combined.update(lever)
            report = _try(replanner, config, combined, memory)
            if report:
                return combined, report
    return None, None
