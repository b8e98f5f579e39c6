"""LoRA toggle, trainable-parameter report, adapter files and merging.

An adapter file is a `.npz` holding the LoRA matrices keyed by variable path,
plus a JSON record of the base preset, rank, alpha, targets and shapes. Loading
checks that record against the model first, so an adapter from another preset,
rank or target set is refused whole instead of being loaded half-way (keras-hub's
own `.lora.h5` files identify layers by index and cannot tell).

Example:

```python
keras_tune.apply_lora(causal_lm, rank=4, targets=("query", "value"))
print(keras_tune.trainable_report(causal_lm))
keras_tune.save_adapter(causal_lm, "run/adapter.npz", preset="gemma_tiny")
```
"""

import contextlib
import json
import math

import numpy as np

from keras_tune import compat
from keras_tune.errors import UserError
from keras_tune.rundir import atomic_write

ADAPTER_FORMAT = "keras_tune.lora/1"
_METADATA_KEY = "__keras_tune_metadata__"


def _backbone(model):
    return getattr(model, "backbone", model)


def _weighted_sublayers(backbone):
    # keras-hub's `Backbone.enable_lora`/`save_lora_weights`/`load_lora_weights`
    # identify a LoRA layer by its index in exactly this list.
    return [layer for layer in compat.sublayers(backbone) if layer.weights]


def apply_lora(model, rank, targets=("query", "value"), alpha=0.0):
    """Freezes the base weights and adds rank-`rank` adapters to the named layers.

    `rank=0` means full fine-tuning: every weight stays trainable. The layers are
    registered as keras-hub's `Backbone.enable_lora` registers them, so
    `backbone.save_lora_weights(path)` / `load_lora_weights(path)` work too
    (those `.lora.h5` files carry no alpha; keras_tune's `.npz` adapter does).

    Args:
        model: a keras-hub CausalLM or Backbone.
        rank: LoRA rank; 0 turns LoRA off.
        targets: layer names to adapt: query, key, value, attention_output,
            ffw_gating, ffw_gating_2, ffw_linear.
        alpha: scale numerator; the update is scaled by alpha / rank
            (0 means alpha = rank, a scale of 1, as keras-hub does).

    Returns:
        The paths of the layers that received adapters.
    """
    backbone = _backbone(model)
    if rank == 0:
        backbone.trainable = True
        return []
    backbone.trainable = True
    for layer in compat.sublayers(backbone):
        layer.trainable = False
    adapted, indices = [], []
    for index, layer in enumerate(_weighted_sublayers(backbone)):
        if layer.name in targets and hasattr(layer, "enable_lora"):
            layer.trainable = True
            layer.enable_lora(rank, lora_alpha=alpha or rank)
            if getattr(layer, "bias", None) is not None:  # Keras leaves it trainable; adapters hold A and B only
                layer.bias.trainable = False
            adapted.append(layer.path)
            if hasattr(layer, "lora_kernel_a"):  # what keras-hub's .lora.h5 files can hold
                indices.append(index)
    if not adapted:
        raise UserError(f"--lora-targets {','.join(targets)}: no layer of this model has those names")
    compat.set_kerashub_lora_state(backbone, indices, rank)
    return adapted


def count_parameters(variables):
    """Total number of elements in `variables` (shapes only; values are never read).

    Args:
        variables: Keras variables, or anything with a `.shape`.

    Returns:
        An int.
    """
    return sum(math.prod(variable.shape) for variable in variables)


def trainable_report(model):
    """Counts trainable and total parameters.

    Args:
        model: a keras-hub CausalLM or Backbone.

    Returns:
        A dict with `trainable`, `total` and `fraction`.
    """
    backbone = _backbone(model)
    trainable = count_parameters(backbone.trainable_weights)
    total = count_parameters(backbone.weights)
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}


def format_report(report):
    """One line such as `trainable 11,067,392 of 8,548,748,288 parameters (0.129%)`."""
    return (
        f"trainable {report['trainable']:,} of {report['total']:,} parameters "
        f"({100 * report['fraction']:.3f}%)"
    )


def _lora_variables(layer):
    """A LoRA layer's adapter variables: Keras' `(lora_kernel_a, lora_kernel_b)`, or a layer's own list
    (`lora_variables`, e.g. Gemma 4's expert bank: a pair for each of its matrices)."""
    own = getattr(layer, "lora_variables", None)
    return tuple(own) if own else (layer.lora_kernel_a, layer.lora_kernel_b)


def _lora_layers(model):
    return [
        layer
        for layer in compat.sublayers(_backbone(model))
        if getattr(layer, "lora_enabled", False)
    ]


def adapter_metadata(model, preset):
    """The record an adapter file carries, used to refuse mismatches."""
    layers = _lora_layers(model)
    if not layers:
        raise UserError("this model has no LoRA layers; expected --lora-rank > 0 to save an adapter")
    return {
        "format": ADAPTER_FORMAT,
        "preset": preset,
        "rank": int(layers[0].lora_rank),
        "alpha": float(layers[0].lora_alpha),
        "targets": sorted({layer.name for layer in layers}),
        "variables": {v.path: list(v.shape) for layer in layers for v in _lora_variables(layer)},
    }


def save_adapter(model, path, preset):
    """Writes the LoRA weights and their record to `path` (`.npz`), atomically.

    Args:
        model: a keras-hub CausalLM with LoRA enabled.
        path: destination file; written to a temporary name, then renamed.
        preset: the base preset name recorded in the file.
    """
    metadata = adapter_metadata(model, preset)
    arrays = {v.path: np.asarray(v.numpy()) for layer in _lora_layers(model) for v in _lora_variables(layer)}
    arrays[_METADATA_KEY] = np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8)
    with atomic_write(path, suffix=".npz") as partial:  # np.savez adds .npz to names without it
        np.savez(partial, **arrays)
    return metadata


def read_adapter(path):
    """Returns `(metadata, arrays)` from an adapter file, refusing unreadable ones."""
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
        metadata = json.loads(arrays.pop(_METADATA_KEY).tobytes().decode())
    except FileNotFoundError:
        raise UserError(f"--adapter {path}: no such file")
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise UserError(f"--adapter {path}: not a keras_tune adapter file ({type(error).__name__}); expected a .npz written by keras_tune")
    if metadata.get("format") != ADAPTER_FORMAT:
        raise UserError(f"--adapter {path}: format {metadata.get('format')!r}; expected {ADAPTER_FORMAT!r}")
    return metadata, arrays


def load_adapter(model, path, preset=None):
    """Enables LoRA as the adapter file says and loads its weights, all or nothing.

    Args:
        model: a keras-hub CausalLM without LoRA (or with the same LoRA).
        path: an adapter written by `save_adapter`.
        preset: the model's preset name; a different one in the file is refused.
    """
    metadata, arrays = read_adapter(path)
    if preset and metadata["preset"] != preset:
        raise UserError(
            f"--adapter {path} was trained on preset {metadata['preset']} but the model is {preset}; "
            "expected an adapter of the same base model"
        )
    if not _lora_layers(model):
        apply_lora(model, metadata["rank"], tuple(metadata["targets"]), metadata["alpha"])
    current = adapter_metadata(model, metadata["preset"])
    for field in ("rank", "targets", "variables"):
        if current[field] != metadata[field]:
            mine, theirs = current[field], metadata[field]
            if field == "variables":
                key = next(k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k))
                mine, theirs = f"{key} {mine.get(key, 'missing')}", f"{key} {theirs.get(key, 'missing')}"
            raise UserError(
                f"--adapter {path}: {field} {theirs} does not match the model's {mine}; "
                "expected an adapter of the same preset, rank and targets"
            )
    for layer in _lora_layers(model):
        for variable in _lora_variables(layer):
            variable.assign(arrays[variable.path])
    return metadata


def merge_lora(model):
    """Folds every adapter into its base kernel: W <- W + (alpha / rank) A B.

    The adapters are zeroed, so the model computes the same function and can be
    saved as a plain preset (Keras saves EinsumDense kernels merged anyway).

    Args:
        model: a keras-hub CausalLM with LoRA enabled.
    """
    for layer in _lora_layers(model):
        if hasattr(layer, "merge_lora"):  # a layer that folds its own adapters (Gemma 4's expert bank)
            layer.merge_lora()
            continue
        merged = layer.kernel  # keras returns the kernel with the LoRA update added
        compat.base_kernel(layer).assign(merged)
        layer.lora_kernel_b.assign(np.zeros(layer.lora_kernel_b.shape, layer.lora_kernel_b.dtype))
    return model


def write_adapter_file(path, metadata, arrays):
    """Writes an adapter file from a record and arrays (what `read_adapter` returns), atomically.

    For adapters made without a model, such as `keras_tune.merging`'s
    concatenation of several adapters; `load_adapter` checks the record as usual.

    Args:
        path: destination `.npz` file.
        metadata: the record (`format`, `preset`, `rank`, `alpha`, `targets`, `variables`).
        arrays: `{variable path: array}`, the `lora_kernel_a`/`lora_kernel_b` of each layer.
    """
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"adapter record format {metadata.get('format')!r}; expected {ADAPTER_FORMAT!r}")
    contents = {key: np.asarray(value) for key, value in arrays.items()}
    contents[_METADATA_KEY] = np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8)
    with atomic_write(path, suffix=".npz") as partial:
        np.savez(partial, **contents)


@contextlib.contextmanager
def lora_switched_off(model):
    """The base network alone while inside: every LoRA layer computes without its update.

    What DPO's reference model is (`keras_tune.objectives.preference`): the same
    variables, so a LoRA run holds one copy of the base. Keras' LoRA layers
    read `lora_enabled` when they compute (`kernel`, the int8 path's branch),
    so a function traced inside this block leaves the adapters out; they are
    back, unchanged, when it ends.

    Args:
        model: a keras-hub CausalLM or Backbone with LoRA enabled.
    """
    layers = _lora_layers(model)
    for layer in layers:
        layer.lora_enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.lora_enabled = True
