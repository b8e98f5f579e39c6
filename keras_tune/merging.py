"""Model merging: linear, SLERP, task arithmetic, TIES and DARE over adapters and whole models, tensor by tensor.

What merges (each model with a weight, and a density for TIES and DARE), all of one
architecture and vocabulary:

- keras-hub preset directories (`config.json`, `model.weights.h5` or keras-hub's sharded
  `model.weights.json`, tokenizer assets), as `python -m keras_tune.export --keras-preset` writes them;
- full-weight run directories (`--lora-rank 0`: the preset in `model/`, or `model.weights.h5` beside
  `config.json` as earlier versions wrote it);
- keras_tune adapters (`adapter.npz`, or the run directory holding it) and PEFT adapter
  directories: each is its base plus its full update, `scale * A @ B`;
- keras_tune preset names (`gemma3_270m_offline`): the model is built once and saved as a preset.

The methods are mergekit's (`x_i` the models, `w_i` their weights, `b` the base,
`tau_i = x_i - b` the task vectors):

| method | result |
| --- | --- |
| `linear` | `sum w_i x_i / sum w_i` (`normalize: false` drops the division) |
| `slerp` | spherical interpolation over each whole tensor from the base (or the first model) to the other, by `t` |
| `task_arithmetic` | `b + lambda * sum w_i tau_i` |
| `ties` | each `tau_i` trimmed to its `density` largest magnitudes; per element the sign of `sum w_i tau_i` is elected; `b + lambda * sum w_i tau_i [agrees] / sum w_i [agrees]` |
| `dare` | each element of `tau_i` dropped with probability `1 - density`, the rest divided by `density`; `b + lambda * sum w_i tau_i` |
| `dare_ties` | DARE's drop, then TIES's sign election and disjoint mean |

DARE's drop is seeded: model `i`'s keep mask over a tensor named `key` is
`numpy.random.default_rng([seed, zlib.crc32(key.encode()), i]).random(shape) < density`,
drawn in row order, so it does not depend on how the tensor is read.

Streaming: an output tensor is computed a block of rows at a time (`BLOCK_ELEMENTS`) from
blocks read with h5py and written to the output's `model.weights.h5` before the next is
read. Only TIES holds one whole tensor, the magnitudes whose quantile it trims at. Adapters
are never expanded beyond the block being written.

Example:

```python
import keras_tune

keras_tune.merge_models({
    "merge_method": "ties",
    "base_model": "gemma3_tiny",
    "models": [
        {"model": "runs/a/adapter.npz", "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": "runs/b/adapter.npz", "parameters": {"weight": 0.4, "density": 0.5}},
    ],
}, out="merged/")
```
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from keras_tune.errors import UserError, WriteFailed
from keras_tune.rundir import refuse_existing

# Elements of one block of rows: 16 MiB in float32. Memory holds a few blocks per input.
BLOCK_ELEMENTS = 1 << 22
# mergekit's SLERP: past this cosine the two tensors are (anti)parallel and it interpolates linearly.
DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8

WEIGHTS_FILE = "model.weights.h5"
MERGE_RECORD_FILE = "merge.json"
SHARDED_WEIGHTS_FILE = "model.weights.json"
_WEIGHT_FILES = (WEIGHTS_FILE, SHARDED_WEIGHTS_FILE, "model_*.weights.h5")
INPUT_KINDS = ("a keras-hub preset directory, a run directory, an adapter .npz, "
               "a PEFT adapter directory or a keras_tune preset name")


@dataclasses.dataclass(frozen=True)
class Method:
    """What a merge method needs and does, with mergekit's defaults.

    Attributes:
        needs_base: it merges task vectors, differences from a base model.
        normalize: the default of `normalize` (divide by the weights' sum).
        sparsify: None, "magnitude" (TIES's trim) or "random" (DARE's drop).
        consensus: TIES's sign election and disjoint mean.
        rescale: the default of `rescale` (DARE: divide what is kept by the density).
    """

    needs_base: bool
    normalize: bool = False
    sparsify: str = None
    consensus: bool = False
    rescale: bool = False


METHODS = {
    "linear": Method(needs_base=False, normalize=True),
    "slerp": Method(needs_base=False),
    "task_arithmetic": Method(needs_base=True),
    "ties": Method(needs_base=True, normalize=True, sparsify="magnitude", consensus=True),
    "dare": Method(needs_base=True, sparsify="random", rescale=True),
    "dare_ties": Method(needs_base=True, sparsify="random", consensus=True, rescale=True),
}
METHOD_ALIASES = {"dare_linear": "dare"}  # mergekit's name for DARE without sign election


# ---------------------------------------------------------------------------
# The recipe: flags, a mergekit-style YAML file or a dict


@dataclasses.dataclass
class MergeInput:
    """One model of a merge.

    Attributes:
        model: a path or preset name (see the module docstring).
        weight: its weight (None: 1).
        density: the fraction of its task vector TIES and DARE keep (None: 1).
    """

    model: str
    weight: float = None
    density: float = None


@dataclasses.dataclass
class MergeRecipe:
    """A merge, as mergekit's YAML describes one.

    Attributes:
        method: linear, slerp, task_arithmetic, ties, dare (or dare_linear) or dare_ties.
        models: the `MergeInput`s.
        base: the base model (a path or preset name), or None.
        t: SLERP's factor, from 0 (the base, or the first model) to 1 (the other).
        normalize: divide by the weights' sum (None: the method's default).
        scale: mergekit's `lambda`, the factor on the merged task vector.
        rescale: DARE divides what it keeps by the density (None: yes).
        seed: the seed of DARE's drop.
    """

    method: str
    models: list
    base: str = None
    t: float = None
    normalize: bool = None
    scale: float = 1.0
    rescale: bool = None
    seed: int = 0


_TOP_KEYS = ("merge_method", "models", "base_model", "parameters", "dtype", "seed")
_SHARED_PARAMETERS = ("t", "normalize", "lambda", "rescale", "weight", "density")
_MODEL_PARAMETERS = ("weight", "density")


def _number(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{what} {value!r}; expected a number (mergekit's gradients and per-layer filters "
                        "are not supported)")
    return float(value)


def _flag(value, what):
    if not isinstance(value, bool):
        raise UserError(f"{what} {value!r}; expected true or false")
    return value


def _mapping(value, what, allowed):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{what}: {type(value).__name__}; expected a mapping of {', '.join(allowed)}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise UserError(f"{what}: unknown key {unknown[0]!r}; expected some of {', '.join(allowed)}")
    return value


def recipe_from_mapping(mapping, source="merge config"):
    """A `MergeRecipe` from mergekit's YAML form, parsed into a dict.

    Accepted: `merge_method`, `base_model`, `models` (each `model:` with optional
    `parameters: {weight, density}`), `parameters` (`t`, `normalize`, `lambda`,
    `rescale`, and default `weight`/`density`), `seed`, and `dtype` (accepted and
    unused: the merge computes in float32 and writes each tensor in its input's dtype).

    Args:
        mapping: the parsed YAML.
        source: what to name in error messages (the file).

    Raises:
        UserError: a key or value mergekit's form does not have, or one not supported.
    """
    mapping = _mapping(mapping, source, _TOP_KEYS)
    method = mapping.get("merge_method")
    if not isinstance(method, str):
        raise UserError(f"{source}: merge_method {method!r}; expected one of {', '.join(METHODS)}")
    shared = _mapping(mapping.get("parameters"), f"{source}: parameters", _SHARED_PARAMETERS)
    models = mapping.get("models")
    if not isinstance(models, list) or not models:
        raise UserError(f"{source}: models {models!r}; expected a list of `- model: PATH` entries")
    inputs = []
    for index, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        entry = _mapping(entry, f"{source}: models[{index}]", ("model", "parameters"))
        if not isinstance(entry.get("model"), str):
            raise UserError(f"{source}: models[{index}] has no model; expected `model: PATH`")
        own = _mapping(entry.get("parameters"), f"{source}: models[{index}].parameters", _MODEL_PARAMETERS)
        given = {**{k: shared[k] for k in _MODEL_PARAMETERS if k in shared}, **own}
        inputs.append(MergeInput(
            entry["model"],
            weight=_number(given["weight"], f"{source}: weight") if "weight" in given else None,
            density=_number(given["density"], f"{source}: density") if "density" in given else None,
        ))
    base = mapping.get("base_model")
    if base is not None and not isinstance(base, str):
        raise UserError(f"{source}: base_model {base!r}; expected a path or preset name")
    seed = mapping.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"{source}: seed {seed!r}; expected a non-negative integer")
    return MergeRecipe(
        method=method, models=inputs, base=base,
        t=_number(shared["t"], f"{source}: t") if "t" in shared else None,
        normalize=_flag(shared["normalize"], f"{source}: normalize") if "normalize" in shared else None,
        scale=_number(shared["lambda"], f"{source}: lambda") if "lambda" in shared else 1.0,
        rescale=_flag(shared["rescale"], f"{source}: rescale") if "rescale" in shared else None,
        seed=seed,
    )


def read_recipe(source):
    """A `MergeRecipe` from a recipe, a dict in mergekit's form or a mergekit-style YAML file.

    Args:
        source: a `MergeRecipe`, a dict, or the path of a YAML file.

    Raises:
        UserError: a missing or malformed file, or one `recipe_from_mapping` refuses.
    """
    if isinstance(source, MergeRecipe):
        return source
    if isinstance(source, dict):
        return recipe_from_mapping(source, "merge config")
    import yaml

    path = Path(source)
    if not path.is_file():
        raise UserError(f"merge config {path}: no such file; expected a mergekit-style YAML file")
    try:
        mapping = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        reason = str(error).strip().splitlines()[0]
        raise UserError(f"merge config {path}: not YAML ({reason}); expected mergekit's merge config")
    return recipe_from_mapping(mapping, f"merge config {path}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """A checked recipe's numbers, one weight and density per merged input.

    Attributes:
        method: the method's name (aliases resolved).
        weights: one float per input.
        densities: one float per input.
        t: SLERP's factor.
        normalize: divide by the weights' sum.
        scale: the factor on the merged task vector (mergekit's lambda).
        rescale: DARE divides what it keeps by the density.
        seed: DARE's seed.
    """

    method: str
    weights: tuple
    densities: tuple
    t: float = None
    normalize: bool = False
    scale: float = 1.0
    rescale: bool = False
    seed: int = 0


def check_recipe(recipe):
    """Refuses what the method cannot take and says what it will warn about, before anything is read.

    Args:
        recipe: a `MergeRecipe`.

    Returns:
        `(settings, warnings)`: the `Settings` over `recipe.models` (a base among
        them is dropped later), and lines to print.

    Raises:
        UserError: an unknown method, parameters it does not take, t or a
            density out of range, weights whose sum it cannot divide by.
    """
    name = METHOD_ALIASES.get(recipe.method, recipe.method)
    if name not in METHODS:
        raise UserError(f"merge method {recipe.method!r}; expected one of {', '.join(METHODS)}")
    method, models = METHODS[name], list(recipe.models)
    if not models:
        raise UserError("no models to merge; expected at least one (two for slerp)")
    for model in models:
        if model.density is not None and method.sparsify is None:
            raise UserError(f"density given for {model.model}; density is for ties, dare and dare_ties, not {name}")
        if model.density is not None and not 0 < model.density <= 1:
            raise UserError(f"density {model.density:g} for {model.model}; expected 0 < density <= 1")
    if name == "slerp":
        if any(model.weight is not None for model in models):
            raise UserError("slerp takes t, not weights; expected --t (parameters: t) and no weights")
        if recipe.t is None:
            raise UserError("slerp needs t, its interpolation factor; expected --t (parameters: t) between 0 and 1")
        if not 0 <= recipe.t <= 1:
            raise UserError(f"slerp t {recipe.t:g}; expected 0 <= t <= 1 (0 is the base or first model)")
    elif recipe.t is not None:
        raise UserError(f"t given for {name}; t is slerp's interpolation factor")
    if not method.needs_base and recipe.scale != 1:
        raise UserError(f"lambda given for {name}; lambda scales the task vector of task_arithmetic, ties, dare")
    if recipe.rescale is not None and method.sparsify != "random":
        raise UserError(f"rescale given for {name}; rescale is for dare and dare_ties")
    weights = tuple(1.0 if model.weight is None else float(model.weight) for model in models)
    normalize = method.normalize if recipe.normalize is None else recipe.normalize
    warnings = []
    if name == "linear":
        total = sum(weights)
        if normalize and abs(total) < 1e-8:
            raise UserError(f"weights {list(weights)} sum to 0; linear divides by their sum: expected a nonzero sum")
        if not normalize and abs(total - 1) > 1e-6:
            warnings.append(f"weights sum to {total:g}, not 1, with normalize false: the merged weights are "
                            f"scaled by {total:g}")
    settings = Settings(
        method=name, weights=weights,
        densities=tuple(1.0 if model.density is None else float(model.density) for model in models),
        t=recipe.t, normalize=normalize, scale=float(recipe.scale),
        rescale=method.rescale if recipe.rescale is None else recipe.rescale, seed=int(recipe.seed),
    )
    return settings, warnings


# ---------------------------------------------------------------------------
# The methods, on blocks of rows of one tensor


def row_blocks(shape, block_elements=BLOCK_ELEMENTS):
    """`(start, stop)` row ranges of a tensor, each of at most `block_elements` elements (at least a row).

    Args:
        shape: the tensor's shape (a 0-d tensor is one row).
        block_elements: the most elements a block holds.
    """
    rows = shape[0] if len(shape) else 1
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, block_elements // max(per_row, 1))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)] or [(0, 0)]


def merge_tensor(settings, key, shape, readers, base=None, block_elements=BLOCK_ELEMENTS):
    """Merges one tensor, yielding `(start, stop, rows)` blocks of the result in order.

    Args:
        settings: a `Settings` with one weight and density per reader.
        key: the tensor's name (seeds DARE's drop).
        shape: its shape.
        readers: one function per input, `(start, stop) -> float array of those rows`.
        base: the base's reader (task methods), or None.
        block_elements: the most elements a block holds.
    """
    blocks = row_blocks(shape, block_elements)
    if settings.method == "slerp":
        yield from _slerp_tensor(settings.t, readers, blocks)
    elif settings.method == "linear":
        for start, stop in blocks:
            yield start, stop, _linear_block(settings, [read(start, stop) for read in readers])
    else:
        yield from _task_tensor(settings, key, shape, readers, base, blocks)


def merge_arrays(settings, arrays, base=None, key="tensor", block_elements=BLOCK_ELEMENTS):
    """Merges in-memory arrays with the same code that merges files (for tests and notebooks).

    Args:
        settings: a `Settings` (`check_recipe(recipe)[0]`), one weight and density per array.
        arrays: the inputs' tensors, all of one shape (slerp: from `arrays[0]` to `arrays[1]`).
        base: the base tensor of a task method.
        key: the tensor's name, which seeds DARE's drop.
        block_elements: rows are merged in blocks of at most this many elements.

    Returns:
        The merged array (float32, or float64 for float64 inputs).
    """
    arrays = [np.asarray(array) for array in arrays]
    shape = arrays[0].shape
    dtype = np.float64 if any(array.dtype == np.float64 for array in arrays) else np.float32

    def reader(array):
        flat = array.reshape((1,)) if array.ndim == 0 else array
        return lambda start, stop: np.asarray(flat[start:stop], dtype)

    out = np.empty(shape if shape else (1,), dtype)
    base_reader = reader(np.asarray(base)) if base is not None else None
    for start, stop, rows in merge_tensor(settings, key, shape, [reader(a) for a in arrays], base_reader,
                                          block_elements):
        out[start:stop] = rows
    return out.reshape(shape)


def _all_equal(blocks):
    return all(np.array_equal(blocks[0], block) for block in blocks[1:])


def _linear_block(settings, blocks):
    total_weight = sum(settings.weights)
    if (settings.normalize or total_weight == 1) and _all_equal(blocks):
        return blocks[0]  # exactly unchanged, not (w1 x + w2 x) / (w1 + w2) rounded
    dtype = blocks[0].dtype.type
    mixed = functools.reduce(np.add, (dtype(weight) * block for weight, block in zip(settings.weights, blocks)))
    return mixed / dtype(total_weight) if settings.normalize else mixed


def _slerp_tensor(t, readers, blocks):
    """SLERP over the whole tensor (mergekit's `slerp`): statistics in one pass, the result in a second."""
    first, second = readers
    same, squares0, squares1, dot = True, 0.0, 0.0, 0.0
    for start, stop in blocks:
        a, b = first(start, stop), second(start, stop)
        same = same and np.array_equal(a, b)
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        squares0, squares1, dot = squares0 + a64 @ a64, squares1 + b64 @ b64, dot + a64 @ b64
    if same:
        for start, stop in blocks:
            yield start, stop, first(start, stop)
        return
    norm0, norm1 = math.sqrt(squares0), math.sqrt(squares1)
    norm0, norm1 = norm0 if norm0 > NORM_EPS else 1.0, norm1 if norm1 > NORM_EPS else 1.0
    cosine = min(1.0, max(-1.0, dot / (norm0 * norm1)))
    if abs(cosine) > DOT_THRESHOLD:
        weight0, weight1 = 1 - t, t
    else:
        theta = math.acos(cosine)
        weight0, weight1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    for start, stop in blocks:
        a, b = first(start, stop), second(start, stop)
        dtype = a.dtype.type
        yield start, stop, dtype(weight0) * a + dtype(weight1) * b


def _magnitude_threshold(read, base, shape, blocks, density):
    """TIES's trim: the k-th largest |tau| over the whole tensor, k = max(1, int(density * size)) as mergekit."""
    size = math.prod(shape)
    keep = max(1, int(density * size))
    magnitudes, offset = np.empty(size, np.float32), 0
    for start, stop in blocks:
        block = np.abs(read(start, stop) - base(start, stop)).ravel()
        magnitudes[offset:offset + block.size] = block
        offset += block.size
    magnitudes.partition(size - keep)
    return magnitudes[size - keep]


def _task_tensor(settings, key, shape, readers, base, blocks):
    """Task arithmetic, TIES and DARE: sparsified, weighted task vectors combined onto the base."""
    method = METHODS[settings.method]
    thresholds, generators = [None] * len(readers), [None] * len(readers)
    for index, read in enumerate(readers):
        density = settings.densities[index]
        if method.sparsify == "magnitude" and density < 1:
            thresholds[index] = _magnitude_threshold(read, base, shape, blocks, density)
        elif method.sparsify == "random" and density < 1:
            generators[index] = np.random.default_rng([settings.seed, zlib.crc32(key.encode()), index])
    for start, stop in blocks:
        base_rows = base(start, stop)
        dtype = base_rows.dtype.type
        weighted = []
        for index, read in enumerate(readers):
            delta = read(start, stop) - base_rows
            if thresholds[index] is not None:
                delta = np.where(np.abs(delta) >= thresholds[index], delta, dtype(0))
            if generators[index] is not None:
                kept = generators[index].random(delta.shape) < settings.densities[index]
                delta = np.where(kept, delta, dtype(0))
                if settings.rescale:
                    delta = delta / dtype(settings.densities[index])
            weighted.append(dtype(settings.weights[index]) * delta)
        yield start, stop, base_rows + _combine(settings, method, weighted, dtype)


def _combine(settings, method, weighted, dtype):
    """mergekit's `GeneralizedTaskArithmeticMerge`: sign election, (disjoint) sum, normalization, lambda."""
    total = functools.reduce(np.add, weighted)
    if method.consensus:
        majority = np.where(total >= 0, dtype(1), dtype(-1))
        agrees = [np.sign(delta) == majority for delta in weighted]
        mixed = functools.reduce(np.add, (np.where(agree, delta, dtype(0)) for agree, delta in zip(agrees, weighted)))
        divisor = functools.reduce(np.add, (dtype(weight) * agree for weight, agree in zip(settings.weights, agrees)))
        divisor = np.where(divisor == 0, dtype(1), divisor)
    else:
        mixed, divisor = total, sum(settings.weights)
        divisor = dtype(1 if abs(divisor) < 1e-8 else divisor)
    if settings.normalize:
        mixed = mixed / divisor
    if settings.scale != 1:
        mixed = mixed * dtype(settings.scale)
    return mixed


# ---------------------------------------------------------------------------
# Keras weights files, read a block of rows at a time


def _has_datasets(group):
    import h5py

    found = []
    group.visititems(lambda name, item: found.append(name) if isinstance(item, h5py.Dataset) else None)
    return bool(found)


def _backbone_group(file):
    """The group whose layout is a backbone's: the file itself, or a CausalLM's `layers/<backbone>`."""
    group = file
    while "layers" in group:
        holding = [child for child in group["layers"].values() if _has_datasets(child)]
        if len(holding) != 1 or "layers" not in holding[0]:
            break
        group = holding[0]
    return group


class WeightsFile:
    """The tensors of a Keras weights file, by their path under the backbone (`layers/.../vars/0`).

    Reads `model.weights.h5` (a backbone's, as keras-hub presets hold, or a CausalLM's,
    as `save_weights` writes in a run directory) and keras-hub's sharded
    `model.weights.json`. Each Keras layer's `vars` group names its layer, so a
    Keras variable path (`decoder_block_0/attention/query`) finds its tensor.

    Args:
        path: the `.weights.h5` or `.weights.json` file.
        label: the model as the user named it, for messages.
    """

    def __init__(self, path, label):
        import h5py

        self.path, self.label = Path(path), label
        names = [self.path]
        if self.path.suffix == ".json":
            try:
                weight_map = json.loads(self.path.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise UserError(f"merge input {label}: unreadable {self.path.name} ({type(error).__name__}); "
                                "expected keras-hub's sharded weights map")
            files = {name for value in weight_map.values() for name in (value if isinstance(value, list) else [value])}
            names = [self.path.parent / name for name in sorted(files)]
        try:
            self._files = [h5py.File(name, "r") for name in names]
        except OSError as error:
            raise UserError(f"merge input {label}: unreadable weights {error.filename or names[0]} "
                            f"({str(error).splitlines()[0]}); expected a Keras .weights.h5 file")
        self._datasets, self.groups, self._layers = {}, {}, {}
        for file in self._files:
            root = _backbone_group(file) if len(self._files) == 1 else file
            self.groups.setdefault("", dict(root.attrs))
            root.visititems(self._collect)
        self._owners = {self._layer_path(owner): owner for owner in self._layers}
        self._cached = (None, None)

    def _collect(self, name, item):
        import h5py

        if isinstance(item, h5py.Dataset):
            self._datasets.setdefault(name, item)
            return
        self.groups.setdefault(name, dict(item.attrs))
        if name == "vars" or name.endswith("/vars"):
            owner = name[:-len("vars")].rstrip("/")
            if owner and "name" in item.attrs:
                self._layers.setdefault(owner, str(item.attrs["name"]))

    def _layer_path(self, owner):
        parts = owner.split("/")
        prefixes = ("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        return "/".join(self._layers[prefix] for prefix in prefixes if prefix in self._layers)

    def keys(self):
        """The tensors' keys, in file order."""
        return list(self._datasets)

    def shape(self, key):
        """A tensor's shape."""
        return tuple(self._datasets[key].shape)

    def dtype(self, key):
        """A tensor's numpy dtype (ml_dtypes' bfloat16 where Keras marked the dataset so)."""
        dataset = self._datasets[key]
        if dataset.attrs.get("dtype") == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return dataset.dtype

    def dataset(self, key):
        """The h5py dataset of a key (for its stored dtype and attributes)."""
        return self._datasets[key]

    def read(self, key, start, stop):
        """Rows `start:stop` of a tensor as float32 (float64 stays float64); a 0-d tensor is one row."""
        if self._cached[0] == (key, start, stop):
            return self._cached[1]
        dataset = self._datasets[key]
        raw = np.asarray(dataset[()]).reshape((1,)) if dataset.ndim == 0 else np.asarray(dataset[start:stop])
        dtype = self.dtype(key)
        if raw.dtype != dtype:
            raw = raw.view(dtype)
        value = raw.astype(np.float64 if dtype == np.float64 else np.float32)
        self._cached = ((key, start, stop), value)
        return value

    def kernel_key(self, layer_path):
        """The key of a layer's first variable (an EinsumDense's kernel), or None.

        Args:
            layer_path: a Keras layer path, e.g. `decoder_block_0/attention/query`.
        """
        owner = self._owners.get(layer_path)
        key = None if owner is None else f"{owner}/vars/0"
        return key if key in self._datasets else None

    def find_layer(self, block, name):
        """The layer path of the layer called `name` inside decoder block `block`, or None."""
        found = [path for path in self._owners if path.startswith(f"decoder_block_{block}/")
                 and path.rsplit("/", 1)[-1] == name]
        return found[0] if len(found) == 1 else None

    def close(self):
        """Closes the files."""
        for file in self._files:
            file.close()


def preset_weights(directory, label):
    """The `WeightsFile` of a keras-hub preset directory (single or sharded weights)."""
    directory = Path(directory)
    single, sharded = directory / WEIGHTS_FILE, directory / SHARDED_WEIGHTS_FILE
    if single.is_file():
        return WeightsFile(single, label)
    if sharded.is_file():
        return WeightsFile(sharded, label)
    raise UserError(f"merge input {label}: a keras-hub preset without {WEIGHTS_FILE}; expected its weights beside "
                    "config.json")


# ---------------------------------------------------------------------------
# The inputs: what each reference is, opened without building anything


@dataclasses.dataclass
class LowRank:
    """An adapter's update to one kernel, `scale * matmul(a, b)`, computed a block of rows at a time.

    Attributes:
        a: the left factor, the kernel's leading axes plus the rank.
        b: the right factor; with the same number of axes as `a` (and more than
            two), it is per row of `a` too.
        scale: alpha / rank.
    """

    a: np.ndarray
    b: np.ndarray
    scale: float

    def rows(self, start, stop):
        """The update's rows `start:stop`, float32."""
        b = self.b[start:stop] if self.b.ndim == self.a.ndim > 2 else self.b
        return np.float32(self.scale) * np.matmul(self.a[start:stop], b, dtype=np.float32)


@dataclasses.dataclass
class Source:
    """One model reference of a merge, opened cheaply.

    Attributes:
        label: the reference as the user wrote it.
        kind: "preset", "run", "adapter", "peft" or "preset name".
        identity: what makes two references the same model (a real path, or the name).
        preset_dir: its keras-hub files (config.json, tokenizer assets), once known.
        weights: its own full weights (presets, runs; preset names once built).
        config: the keras_tune config it is built from (preset names, runs).
        adapter: `(record, arrays)` of a keras_tune adapter.
        peft: `{(block, layer name): (lora_A, lora_B, scale)}` of a PEFT adapter.
        base: the `Source` an adapter updates.
        updates: an adapter's `{tensor key: LowRank}`, once matched to its base.
    """

    label: str
    kind: str
    identity: str
    preset_dir: str = None
    weights: WeightsFile = None
    config: object = None
    adapter: tuple = None
    peft: dict = None
    base: "Source" = None
    updates: dict = None

    def read(self, key, start, stop):
        """Rows `start:stop` of the tensor `key` of this model (an adapter's base plus its update)."""
        rows = (self.weights or self.base).read(key, start, stop)
        update = (self.updates or {}).get(key)
        return rows if update is None else rows + update.rows(start, stop)

    def structure(self):
        """The weights file whose layout an output preset copies: a backbone's (a run's own file is a CausalLM's)."""
        return preset_weights(self.preset_dir, self.label) if self.kind == "run" else self.weights


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_kerashub_config(value):
    return isinstance(value, dict) and isinstance(value.get("config"), dict) and "class_name" in value


def _is_run_config(value):
    return isinstance(value, dict) and "preset" in value and isinstance(value.get("model"), dict)


def _preset_source(directory, label):
    return Source(label, "preset", str(Path(directory).resolve()), preset_dir=str(directory),
                  weights=preset_weights(directory, label))


def _adapter_source(path, label):
    from keras_tune.lora import read_adapter

    try:
        adapter = read_adapter(str(path))
    except UserError as error:
        raise UserError(f"merge input {label}: {str(error).split(': ', 1)[-1]}")
    return Source(label, "adapter", str(Path(path).resolve()), adapter=adapter)


def _directory_source(path, label):
    from keras_tune import config as config_lib
    from keras_tune.peft import CONFIG_FILE, read_peft_updates

    if (path / CONFIG_FILE).is_file():
        return Source(label, "peft", str(path.resolve()), peft=read_peft_updates(path)[1])
    config_json = _read_json(path / "config.json")
    if _is_kerashub_config(config_json):
        return _preset_source(path, label)
    if _is_run_config(config_json):
        if (path / "adapter.npz").is_file():
            return _adapter_source(path / "adapter.npz", label)
        if _is_kerashub_config(_read_json(path / "model" / "config.json")):  # a full-weight run's preset
            return _preset_source(path / "model", label)
        if (path / WEIGHTS_FILE).is_file():  # a full-weight run of earlier versions: the CausalLM's save_weights
            config = config_lib.from_json((path / "config.json").read_text(encoding="utf-8"))
            return Source(label, "run", str(path.resolve()), config=config,
                          weights=WeightsFile(path / WEIGHTS_FILE, label))
    raise UserError(f"merge input {label}: a directory with no keras-hub config.json, adapter or model weights; "
                    f"expected {INPUT_KINDS}")


def open_source(reference):
    """Opens one model reference (no model is built; preset names are built later, if needed).

    Args:
        reference: a path or a keras_tune preset name.

    Raises:
        UserError: nothing of a kind `merge_models` reads is there.
    """
    from keras_tune import config as config_lib

    path = Path(reference)
    if path.is_file():
        if path.suffix == ".npz":
            return _adapter_source(path, reference)
        raise UserError(f"merge input {reference}: a {path.suffix or 'suffix-less'} file; expected {INPUT_KINDS}")
    if path.is_dir():
        return _directory_source(path, reference)
    if reference in config_lib.list_presets():
        return Source(reference, "preset name", reference, config=config_lib.load_config(reference))
    raise UserError(f"merge input {reference}: no such file or directory, and not a preset name; expected {INPUT_KINDS}")


# ---------------------------------------------------------------------------
# The plan: which inputs, which base, checked before anything heavy


@dataclasses.dataclass
class MergePlan:
    """The opened inputs of a checked recipe.

    Attributes:
        settings: the `Settings`, one weight and density per input.
        inputs: the merged `Source`s (slerp: from `inputs[0]` to `inputs[1]`).
        base: the task methods' base `Source`, or None.
        sources: every `Source` the merge reads (inputs, base, adapters' bases).
        opened: every `Source` opened, to close.
    """

    settings: Settings
    inputs: list
    base: Source
    sources: list
    opened: list

    def reference(self):
        """The model whose config, tokenizer and weights layout the output copies: the base, else the first."""
        for source in [self.base, *self.inputs]:
            while source is not None and source.preset_dir is None:
                source = source.base
            if source is not None:
                return source
        raise UserError("no input carries a keras-hub config; expected a preset, run or preset name among them")

    def close(self):
        """Closes every weights file."""
        for source in self.opened:
            if source.weights is not None:
                source.weights.close()


def _drop_base_from_inputs(settings, inputs, base):
    """mergekit's rule: a base listed among the models is the base, not a task vector."""
    keep = [i for i, source in enumerate(inputs) if source.identity != base.identity]
    if not keep:
        raise UserError(f"the only model is the base {base.label}; expected models besides the base to merge into it")
    pick = lambda values: tuple(values[i] for i in keep)  # noqa: E731
    return dataclasses.replace(settings, weights=pick(settings.weights), densities=pick(settings.densities)), \
        [inputs[i] for i in keep]


def _slerp_pair(settings, inputs, base):
    """SLERP's two ends: the base (also when listed among the models) and the other model, or the two models."""
    if base is not None:
        others = [source for source in inputs if source.identity != base.identity]
        if len(others) != 1:
            raise UserError(f"slerp merges the base and one other model; got {len(others)} besides the base {base.label}")
        inputs = [base, others[0]]
    elif len(inputs) != 2:
        raise UserError(f"slerp merges two models; got {len(inputs)}")
    return dataclasses.replace(settings, weights=(1.0, 1.0), densities=(1.0, 1.0)), inputs


def _adapters_base(adapters, base, opened):
    """The model adapters update: the merge's base, else the one preset their files name."""
    presets = sorted({source.adapter[0]["preset"] for source in adapters if source.kind == "adapter"})
    if len(presets) > 1:
        named = ", ".join(f"{s.label} ({s.adapter[0]['preset']})" for s in adapters if s.kind == "adapter")
        raise UserError(f"adapters of different base presets: {named}; expected adapters of one base model")
    if base is not None:
        return base
    peft = [source.label for source in adapters if source.kind == "peft"]
    if peft:
        raise UserError(f"PEFT adapter {peft[0]} needs its base model: expected --base (base_model:) naming a "
                        "keras-hub preset directory or a keras_tune preset name")
    if presets[0] not in opened:
        opened[presets[0]] = open_source(presets[0])
    return opened[presets[0]]


def plan_merge(recipe, keep_lora=False):
    """Opens and checks a recipe's inputs: everything that can be refused before a model is built or read.

    Args:
        recipe: a `MergeRecipe`.
        keep_lora: the output is the concatenated adapter (linear or
            task_arithmetic over keras_tune adapters).

    Returns:
        `(MergePlan, warnings)`.

    Raises:
        UserError: see `check_recipe`; a missing input; a missing base; adapters
            of different presets; `keep_lora` over anything but keras_tune adapters.
    """
    settings, warnings = check_recipe(recipe)
    method = METHODS[settings.method]
    inputs = [open_source(model.model) for model in recipe.models]
    base = open_source(recipe.base) if recipe.base else None
    if base is not None and base.kind in ("adapter", "peft"):
        raise UserError(f"base_model {base.label} is an adapter; expected a whole model: a keras-hub preset "
                        "directory, a run directory or a keras_tune preset name")
    opened = {source.label: source for source in [*inputs, base] if source is not None}
    adapters = [source for source in inputs if source.kind in ("adapter", "peft")]
    if keep_lora:
        if settings.method not in ("linear", "task_arithmetic"):
            raise UserError(f"--keep-lora concatenates adapters, exact for linear and task_arithmetic; not {settings.method}")
        other = next((source for source in inputs if source.kind != "adapter"), None)
        if other is not None:
            raise UserError(f"--keep-lora concatenates keras_tune adapters; {other.label} is a {other.kind}")
    adapter_base = _adapters_base(adapters, base, opened) if adapters else None
    for source in adapters:
        source.base = adapter_base
    everything = [*opened.values(), *inputs]
    if settings.method == "linear" and base is not None and base is not adapter_base:
        warnings.append(f"base_model {base.label} is not used: linear averages the models (a base serves adapters)")
        base = None
    if settings.method == "slerp":
        settings, inputs = _slerp_pair(settings, inputs, base)
    elif method.needs_base:
        if base is None and adapters and len(adapters) == len(inputs):
            base = adapter_base  # adapters' task vectors are their updates to their own base
        if base is None:
            full = next(source.label for source in inputs if source.kind not in ("adapter", "peft"))
            raise UserError(f"{settings.method} merges differences from a base model, and {full} is a whole model: "
                            "expected --base (base_model:) naming it")
        settings, inputs = _drop_base_from_inputs(settings, inputs, base)
    sources = list({id(s): s for s in [*inputs, base, adapter_base] if s is not None}.values())
    return MergePlan(settings, inputs, base, sources, list({id(s): s for s in everything}.values())), warnings


# ---------------------------------------------------------------------------
# Building what needs a model, then checking architectures and vocabularies


def _save_built_model(config, directory, log):
    """Builds the config's model once and saves it as a keras-hub preset (preset names, run directories)."""
    from keras_tune.environment import release_freed_memory
    from keras_tune.models.loader import load_causal_lm

    log(f"building {config.preset} once to read its weights and tokenizer")
    causal_lm = load_causal_lm(config)
    causal_lm.save_to_preset(str(directory))
    del causal_lm
    release_freed_memory()


def build_missing_presets(plan, workdir, log):
    """Gives every preset-name and run input a keras-hub preset (built once each) in `workdir`.

    Args:
        plan: a `MergePlan`.
        workdir: a scratch directory, removed by the caller.
        log: where progress lines go.
    """
    from keras_tune import config as config_lib

    built = {}
    for index, source in enumerate(plan.sources):
        if source.preset_dir is not None or source.config is None:
            continue
        fingerprint = config_lib.to_json(source.config)
        if fingerprint not in built:
            built[fingerprint] = Path(workdir) / f"built-{index}"
            _save_built_model(source.config, built[fingerprint], log)
        source.preset_dir = str(built[fingerprint])
        if source.weights is None:
            source.weights = preset_weights(source.preset_dir, source.label)


def _architecture(preset_dir):
    config = _read_json(Path(preset_dir) / "config.json") or {}
    fields = {key: value for key, value in config.get("config", {}).items() if key not in ("name", "trainable", "dtype")}
    return config.get("class_name"), fields


def _tokenizer_files(preset_dir):
    """{file under assets/: sha256} of a preset's tokenizer assets."""
    root = Path(preset_dir) / "assets"
    files = sorted(path for path in root.rglob("*") if path.is_file()) if root.is_dir() else []
    return {str(path.relative_to(preset_dir)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def _first_difference(mine, theirs):
    return next((key for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)), None)


def check_same_model_kind(plan):
    """Refuses inputs of different architectures, vocabularies or tensors (one line naming the difference).

    Args:
        plan: a `MergePlan` whose inputs all have preset directories (`build_missing_presets`).
    """
    full = [source for source in plan.sources if source.weights is not None]
    reference = plan.reference()
    kind, fields = _architecture(reference.preset_dir)
    assets = _tokenizer_files(reference.preset_dir)
    for source in full:
        other_kind, other_fields = _architecture(source.preset_dir)
        if other_kind != kind:
            raise UserError(f"different architectures: {reference.label} is a {kind}, {source.label} a {other_kind}; "
                            "expected models of one architecture")
        field = _first_difference(fields, other_fields)
        if field is not None:
            plural, singular = ("vocabularies", "vocabulary") if field == "vocabulary_size" else \
                ("architectures", "architecture")
            raise UserError(f"different {plural}: {reference.label} has {field} {fields.get(field)}, {source.label} "
                            f"{other_fields.get(field)}; expected models of one {singular}")
        other_assets = _tokenizer_files(source.preset_dir)
        changed = _first_difference(assets, other_assets)
        if changed is not None and assets and other_assets:
            raise UserError(f"different vocabularies: {reference.label} and {source.label} differ in {changed}; "
                            "expected models of one tokenizer")
        _check_same_tensors(reference, source)


def _check_same_tensors(reference, source):
    mine, theirs = reference.weights, source.weights
    if mine is theirs:
        return
    missing = sorted(set(mine.keys()) ^ set(theirs.keys()))
    if missing:
        raise UserError(f"different architectures: {missing[0]} is in one of {reference.label} and {source.label} "
                        "only; expected models of one architecture")
    for key in mine.keys():
        if mine.shape(key) != theirs.shape(key):
            raise UserError(f"different architectures: {key} is {list(mine.shape(key))} in {reference.label}, "
                            f"{list(theirs.shape(key))} in {source.label}; expected models of one architecture")
        if not np.issubdtype(mine.dtype(key), np.floating) and mine.dtype(key).name != "bfloat16":
            raise UserError(f"merge input {reference.label}: {key} is {mine.dtype(key)}; expected floating-point "
                            "weights (merge unquantized models)")


def _keras_adapter_updates(source, weights):
    record, arrays = source.adapter
    scale = record["alpha"] / record["rank"]
    updates = {}
    for path in sorted(record["variables"]):
        if not path.endswith("/lora_kernel_a"):
            continue
        layer = path.rsplit("/", 1)[0]
        a, b = arrays[path], arrays[f"{layer}/lora_kernel_b"]
        key = weights.kernel_key(layer)
        expected = tuple(a.shape[:-1]) + (b.shape[-1],)
        if key is None or weights.shape(key) != expected:
            found = "no such layer" if key is None else f"kernel {list(weights.shape(key))}"
            raise UserError(f"adapter {source.label} updates {layer} {list(expected)}, but its base "
                            f"{source.base.label} has {found}; expected an adapter of that model")
        updates[key] = LowRank(np.asarray(a, np.float32), np.asarray(b, np.float32), scale)
    return updates


def _peft_updates(source, weights):
    from keras_tune.peft import HF_MODULES, keras_update_factors

    updates = {}
    for (block, name), (lora_a, lora_b, scale) in sorted(source.peft.items()):
        layer = weights.find_layer(block, name)
        if layer is None:
            raise UserError(f"PEFT adapter {source.label} updates block {block} {name}, which its base "
                            f"{source.base.label} does not have; expected an adapter of that model")
        key = weights.kernel_key(layer)
        a, b = keras_update_factors(lora_a, lora_b, HF_MODULES[name][1], weights.shape(key), f"{source.label} {layer}")
        updates[key] = LowRank(a, b, scale)
    return updates


def attach_updates(plan):
    """Matches every adapter's layers to its base's tensors (`Source.updates`)."""
    for source in plan.sources:
        if source.kind in ("adapter", "peft") and source.base is not None:
            base = source.base
            while base.weights is None:
                base = base.base
            reader = _keras_adapter_updates if source.kind == "adapter" else _peft_updates
            source.updates = reader(source, base.weights)


# ---------------------------------------------------------------------------
# Outputs


def plan_outputs(out, transformers=None, keep_lora=False):
    """What to write, refused before anything is read when it exists or cannot be written.

    Args:
        out: a path or paths: `.npz` an adapter (with `keep_lora`), `.gguf` a
            GGUF, anything else a keras-hub preset directory.
        transformers: a Transformers directory to write too, or None.
        keep_lora: write the adapter of a linear/task_arithmetic merge of adapters.

    Returns:
        `{"adapter"|"gguf"|"preset"|"transformers": path}`.
    """
    paths = [out] if isinstance(out, (str, os.PathLike)) else list(out or [])
    outputs = {}
    for path in paths:
        path = str(path)
        kind = {".npz": "adapter", ".gguf": "gguf"}.get(Path(path).suffix, "preset")
        if kind in outputs:
            raise UserError(f"--out {path}: a second {kind} output (after {outputs[kind]}); expected one of each")
        outputs[kind] = path
    if transformers:
        outputs["transformers"] = str(transformers)
    if not outputs:
        raise UserError("nothing to write; expected --out DIR (a keras-hub preset), FILE.gguf or FILE.npz")
    if "adapter" in outputs and not keep_lora:
        raise UserError(f"--out {outputs['adapter']}: an adapter output needs --keep-lora (linear or task_arithmetic "
                        "over keras_tune adapters, the merges that stay low-rank)")
    if keep_lora and "adapter" not in outputs:
        raise UserError("--keep-lora writes an adapter; expected --out FILE.npz")
    for kind, path in outputs.items():
        refuse_existing(path, "--transformers" if kind == "transformers" else "--out")
    return outputs


def _abstract_backbone(preset_dir):
    """The backbone a preset's config.json describes, shapes only (for the family's export checks)."""
    import keras
    import keras_hub  # noqa: F401 (registers keras-hub's classes for deserialization)

    from keras_tune import compat

    pending = list(compat.keras_global_attribute("uninitialized_variables", []) or [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            return keras.saving.deserialize_keras_object(_read_json(Path(preset_dir) / "config.json"))
    finally:
        compat.set_keras_global_attribute("uninitialized_variables", pending)


def check_exports(plan, outputs):
    """Refuses a GGUF or Transformers output the merged model's family has no faithful writer for."""
    from keras_tune.models import families

    if "gguf" not in outputs and "transformers" not in outputs:
        return
    backbone = _abstract_backbone(plan.reference().preset_dir)
    family = families.of_model(backbone)
    if "gguf" in outputs and "--gguf" not in family.exports:
        titles = " or ".join(families.get(n).title for n in families.names() if "--gguf" in families.get(n).exports)
        raise UserError(f"--out {outputs['gguf']}: a GGUF is written for {titles} models; these are {family.title}")
    problem = family.transformers_problem(backbone) if "transformers" in outputs else None
    if problem:
        raise UserError(f"--transformers {outputs['transformers']}: {problem}")


def _write_weights(plan, path, log):
    """Writes the merged `model.weights.h5` in the reference's layout, one block of rows at a time."""
    import h5py

    structure = plan.reference().structure()
    keys = structure.keys()
    started = time.perf_counter()
    with h5py.File(path, "w") as file:
        for name, attrs in structure.groups.items():
            group = file.require_group(name) if name else file
            group.attrs.update(attrs)
        for number, key in enumerate(keys, 1):
            stored = structure.dataset(key)
            dataset = file.create_dataset(key, shape=stored.shape, dtype=stored.dtype)
            dataset.attrs.update(dict(stored.attrs))
            dtype = structure.dtype(key)
            readers = [functools.partial(source.read, key) for source in plan.inputs]
            base = functools.partial(plan.base.read, key) if plan.base is not None else None
            for start, stop, rows in merge_tensor(plan.settings, key, structure.shape(key), readers, base):
                value = rows.astype(dtype)
                value = value.view(stored.dtype) if value.dtype != stored.dtype else value
                if dataset.ndim == 0:
                    dataset[()] = value.reshape(())
                else:
                    dataset[start:stop] = value
            if number % 50 == 0 or number == len(keys):
                log(f"merged {number}/{len(keys)} tensors ({time.perf_counter() - started:.0f}s)")
    if structure is not plan.reference().weights:
        structure.close()


def merge_record(plan):
    """What a merged preset's `merge.json` says: the method, its numbers and each input as the user named it."""
    settings = plan.settings
    return {
        "merge_method": settings.method,
        "base_model": plan.base.label if plan.base is not None else None,
        "models": [{"model": source.label, "weight": weight, "density": density}
                   for source, weight, density in zip(plan.inputs, settings.weights, settings.densities)],
        "parameters": {"t": settings.t, "normalize": settings.normalize, "lambda": settings.scale,
                       "rescale": settings.rescale},
        "seed": settings.seed,
    }


def write_merged_preset(plan, out_dir, log):
    """Writes the merged model as a keras-hub preset directory, atomically (a partial one is removed).

    The reference's config, tokenizer and other preset files are copied; the
    weights are merged tensor by tensor into one `model.weights.h5`; `merge.json`
    records how (`merge_record`).

    Args:
        plan: a `MergePlan` with updates attached.
        out_dir: the directory (absent or empty).
        log: where progress lines go.
    """
    out_dir = Path(out_dir)
    partial = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    try:
        shutil.copytree(plan.reference().preset_dir, partial, ignore=shutil.ignore_patterns(*_WEIGHT_FILES))
        (partial / MERGE_RECORD_FILE).write_text(json.dumps(merge_record(plan), indent=2) + "\n", encoding="utf-8")
        _write_weights(plan, partial / WEIGHTS_FILE, log)
        if out_dir.is_dir():
            out_dir.rmdir()  # refused earlier unless empty
        os.rename(partial, out_dir)
    except OSError as error:
        raise WriteFailed(f"could not write {out_dir}: {error.strerror or error}; nothing was left there") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(out_dir)


def _lora_coefficients(settings):
    """Each adapter's factor in the concatenation: the merge's weight on its update."""
    total = sum(settings.weights)
    if settings.method == "linear":
        if settings.normalize:
            return [weight / total for weight in settings.weights]
        if abs(total - 1) > 1e-6:
            raise UserError(f"--keep-lora: weights sum to {total:g} with normalize false, which scales the base too; "
                            "expected normalize or weights summing to 1")
        return list(settings.weights)
    divisor = total if settings.normalize and abs(total) >= 1e-8 else 1.0
    return [settings.scale * weight / divisor for weight in settings.weights]


def write_concatenated_adapter(plan, path):
    """Writes the linear/task_arithmetic merge of keras_tune adapters as one adapter of their summed rank.

    Each layer's `A` factors are concatenated along the rank and its `B` factors,
    each times its weight and its adapter's alpha/rank, stacked: `A' B' = sum c_i
    s_i A_i B_i`, with alpha = rank (scale 1). A layer an adapter lacks gets zeros.

    Args:
        plan: a `MergePlan` over keras_tune adapters.
        path: the `.npz` to write.

    Returns:
        The adapter's record.
    """
    from keras_tune.lora import ADAPTER_FORMAT, write_adapter_file

    coefficients = _lora_coefficients(plan.settings)
    adapters = [source.adapter for source in plan.inputs]
    layers = sorted({name.rsplit("/", 1)[0] for record, _ in adapters for name in record["variables"]})
    arrays, variables = {}, {}
    for layer in layers:
        left, right = [], []
        shapes = [(record["variables"][f"{layer}/lora_kernel_a"][:-1], record["variables"][f"{layer}/lora_kernel_b"][-1])
                  for record, _ in adapters if f"{layer}/lora_kernel_a" in record["variables"]]
        if any(shape != shapes[0] for shape in shapes):
            raise UserError(f"--keep-lora: the adapters update {layer} of different shapes {shapes}; "
                            "expected adapters of one model")
        (inner, outer), = set((tuple(a), b) for a, b in shapes[:1])
        for (record, own), coefficient in zip(adapters, coefficients):
            rank, scale = record["rank"], record["alpha"] / record["rank"]
            a = own.get(f"{layer}/lora_kernel_a", np.zeros([*inner, rank], np.float32))
            b = own.get(f"{layer}/lora_kernel_b", np.zeros([rank, outer], np.float32))
            left.append(np.asarray(a, np.float32))
            right.append(np.float32(coefficient * scale) * np.asarray(b, np.float32))
        arrays[f"{layer}/lora_kernel_a"], arrays[f"{layer}/lora_kernel_b"] = np.concatenate(left, -1), np.concatenate(right, 0)
        for name in ("lora_kernel_a", "lora_kernel_b"):
            variables[f"{layer}/{name}"] = list(arrays[f"{layer}/{name}"].shape)
    rank = sum(record["rank"] for record, _ in adapters)
    record = {
        "format": ADAPTER_FORMAT, "preset": adapters[0][0]["preset"], "rank": rank, "alpha": float(rank),
        "targets": sorted({target for record, _ in adapters for target in record["targets"]}), "variables": variables,
    }
    write_adapter_file(path, record, arrays)
    return record


def _export_preset(preset_dir, outputs, gguf_dtype, log):
    """Loads the merged preset once and writes its GGUF and Transformers outputs."""
    import keras_hub

    from keras_tune.models.exports.gguf import export_gguf
    from keras_tune.models.exports.transformers import export_transformers

    causal_lm = keras_hub.models.CausalLM.from_preset(str(preset_dir))
    written = {}
    if "gguf" in outputs:
        written["gguf"] = str(export_gguf(causal_lm, outputs["gguf"], dtype=gguf_dtype))
        log(f"GGUF ({gguf_dtype}): {outputs['gguf']}")
    if "transformers" in outputs:
        written["transformers"] = str(export_transformers(causal_lm, outputs["transformers"]))
        log(f"Transformers: {outputs['transformers']}")
    return written


def peak_rss_bytes():
    """This process's peak resident memory so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def merge_models(recipe, out=(), transformers=None, keep_lora=False, gguf_dtype="f16", log=print):
    """Merges models and adapters and writes the result: a preset, a GGUF, a Transformers directory or an adapter.

    Everything that can be refused is refused before a model is built or a
    tensor read: the recipe, the outputs (an existing one), the inputs (missing,
    a missing base, adapters of different presets), then, once preset names and
    run directories are built, architectures, vocabularies and export support.

    Args:
        recipe: a `MergeRecipe`, a dict in mergekit's YAML form, or a YAML file's path.
        out: the output path or paths: a directory (keras-hub preset), `.gguf`, or
            `.npz` (the concatenated adapter, with `keep_lora`).
        transformers: a directory for a Transformers copy, or None.
        keep_lora: write linear/task_arithmetic merges of adapters as one adapter
            of the summed rank.
        gguf_dtype: "f16" or "f32".
        log: where progress lines go.

    Returns:
        A dict: `written` ({kind: path}), `method`, `tensors`, `seconds`, `peak_rss_bytes`.

    Example:

    ```python
    keras_tune.merge_models("merge.yaml", out=["merged/", "merged.gguf"])
    ```
    """
    started = time.perf_counter()
    recipe = read_recipe(recipe)
    check_recipe(recipe)
    if gguf_dtype not in ("f16", "f32"):
        raise UserError(f"--gguf-dtype {gguf_dtype!r}; expected 'f16' or 'f32'")
    outputs = plan_outputs(out, transformers, keep_lora)
    plan, warnings = plan_merge(recipe, keep_lora)
    for warning in warnings:
        log(f"warning: {warning}")
    workdir = tempfile.mkdtemp(prefix="keras_tune_merge_")
    written, tensors = {}, 0
    try:
        if "adapter" in outputs:
            record = write_concatenated_adapter(plan, outputs["adapter"])
            written["adapter"] = outputs["adapter"]
            log(f"adapter of rank {record['rank']}: {outputs['adapter']}")
        if set(outputs) - {"adapter"}:
            build_missing_presets(plan, workdir, log)
            check_same_model_kind(plan)
            check_exports(plan, outputs)
            attach_updates(plan)
            tensors = len(plan.reference().weights.keys())
            log(f"merging {len(plan.inputs)} models ({plan.settings.method}) tensor by tensor: {tensors} tensors")
            preset = outputs.get("preset") or os.path.join(workdir, "merged")
            write_merged_preset(plan, preset, log)
            if "preset" in outputs:
                written["preset"] = preset
                log(f"keras-hub preset: {preset}")
            if "gguf" in outputs or "transformers" in outputs:
                written.update(_export_preset(preset, outputs, gguf_dtype, log))
    finally:
        plan.close()
        shutil.rmtree(workdir, ignore_errors=True)
    peak = peak_rss_bytes()
    seconds = time.perf_counter() - started
    log(f"done in {seconds:.1f}s, peak RSS {peak / 2**30:.2f} GiB")
    return {"written": written, "method": plan.settings.method, "tensors": tensors, "seconds": seconds,
            "peak_rss_bytes": peak}
