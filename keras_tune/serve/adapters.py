"""Several LoRA adapters over one frozen base: per-layer tables a decode step indexes by request.

The base model is built once. Every adapter's A and B matrices are stacked into
one table a LoRA layer (`[adapters + 1, ...]`, row 0 all zeros: the base
itself), and the engine hands each request its adapter's rows in place of the
layer's LoRA variables; the layer computes `W + (alpha / rank) A B` as in
training. The adapters may differ in targets (a layer an adapter does not
adapt gets zeros), rank and alpha: with one rank and alpha for all, the layers
keep them and the sum is computed exactly as a model with that adapter loaded
computes it; otherwise the layers take the largest rank at a scale of 1, each
adapter's B is scaled by its own alpha / rank and zero-padded (equal up to float
rounding).

Example:

```python
specs = parse_adapter_specs(["fr=runs/fr/adapter.npz", "code=runs/code/adapter.npz"], "gemma3_270m_offline")
read = read_adapters(specs, preset="gemma3_270m_offline")   # before the model is built
adapters = attach_adapters(causal_lm, "gemma3_270m_offline", read)
adapters.index("fr")                                        # 1; the preset name is 0
```
"""

import dataclasses
import os

import numpy as np

from keras_tune import compat
from keras_tune.errors import UserError
from keras_tune.lora import apply_lora, read_adapter


@dataclasses.dataclass
class AdapterSet:
    """The models a server answers for: the base (index 0) and its adapters.

    Attributes:
        names: model names by index; `names[0]` is the base preset's name.
        variables: the model's LoRA variables, `(lora_kernel_a, lora_kernel_b)` a layer.
        tables: `(A table, B table)` a layer, numpy arrays `[len(names), *variable shape]`.
        paths: adapter files by name.
    """

    names: tuple
    variables: list
    tables: list
    paths: dict

    def index(self, name):
        """The index of model `name`, or None when the server has no such model.

        Args:
            name: a request's `model` field.
        """
        return self.names.index(name) if name in self.names else None

    def table_bytes(self):
        """Bytes the adapter tables hold (the base weights are not among them)."""
        return int(sum(a.nbytes + b.nbytes for a, b in self.tables))


def parse_adapter_specs(items, preset):
    """Turns repeated `--adapter NAME=PATH` flags into `[(name, path)]`, refusing bad ones.

    Args:
        items: the flag values (None: no adapters).
        preset: the base preset's name (the base's model name; an adapter may not take it).
    """
    specs, seen = [], {preset}
    for item in items or ():
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise UserError(f"--adapter {item}: expected NAME=PATH, e.g. --adapter french=runs/fr/adapter.npz")
        if name in seen:
            what = "the base preset's name" if name == preset else "given twice"
            raise UserError(f"--adapter {item}: the name '{name}' is {what}; expected a new name for each adapter")
        if not os.path.isfile(path):
            raise UserError(f"--adapter {item}: no such file {path}; expected an adapter .npz written by keras_tune.fit")
        seen.add(name)
        specs.append((name, path))
    return specs


def read_adapters(specs, preset):
    """Reads every adapter file and checks it was trained on `preset`: cheap, before the model is built.

    Args:
        specs: `[(name, path)]` from `parse_adapter_specs`.
        preset: the base preset's name.

    Returns:
        `[(name, path, metadata, arrays)]`.
    """
    read = []
    for name, path in specs:
        metadata, arrays = read_adapter(path)
        if metadata["preset"] != preset:
            raise UserError(
                f"--adapter {name}={path} was trained on preset {metadata['preset']} but the server's base is "
                f"{preset}; expected adapters of the same base model"
            )
        read.append((name, path, metadata, arrays))
    return read


def lora_layers(causal_lm):
    """The model's LoRA-enabled layers, in the order of its sublayers."""
    return [layer for layer in compat.sublayers(causal_lm.backbone) if getattr(layer, "lora_enabled", False)]


def attach_adapters(causal_lm, preset, read):
    """Adds LoRA layers for every adapter in `read` to the frozen base and stacks their weights.

    Args:
        causal_lm: the base CausalLM, without LoRA.
        preset: the base preset's name (model index 0).
        read: `read_adapters`' result (may be empty: the base alone).

    Returns:
        An `AdapterSet`.
    """
    names = (preset,) + tuple(name for name, _, _, _ in read)
    paths = {name: path for name, path, _, _ in read}
    if not read:
        return AdapterSet(names, [], [], paths)
    if lora_layers(causal_lm):
        raise UserError("the base model already has LoRA layers; expected a base without an adapter and --adapter NAME=PATH")
    shapes = {(int(m["rank"]), float(m["alpha"])) for _, _, m, _ in read}
    rank = max(r for r, _ in shapes)
    alpha = next(iter(shapes))[1] if len(shapes) == 1 else float(rank)  # mixed: scale 1, folded into B
    targets = tuple(sorted({t for _, _, m, _ in read for t in m["targets"]}))
    apply_lora(causal_lm, rank, targets, alpha)
    layers = lora_layers(causal_lm)
    variables = [(layer.lora_kernel_a, layer.lora_kernel_b) for layer in layers]
    tables = []
    for a_var, b_var in variables:
        a_table = np.zeros((len(names),) + tuple(a_var.shape), np.float32)
        b_table = np.zeros((len(names),) + tuple(b_var.shape), np.float32)
        for row, (name, path, metadata, arrays) in enumerate(read, start=1):
            if a_var.path not in arrays:
                continue  # this adapter leaves the layer as the base has it
            a, b = arrays[a_var.path], arrays[b_var.path]
            if a.shape[:-1] != tuple(a_var.shape[:-1]) or b.shape[1:] != tuple(b_var.shape[1:]):
                raise UserError(
                    f"--adapter {name}={path}: {a_var.path} has shape {list(a.shape)}, not the model's "
                    f"{list(a_var.shape[:-1])} + [rank]; expected an adapter of the same base model"
                )
            scale = 1.0 if len(shapes) == 1 else float(metadata["alpha"]) / int(metadata["rank"])
            a_table[row, ..., : a.shape[-1]] = a
            b_table[row, : b.shape[0]] = b * scale if scale != 1.0 else b
        tables.append((a_table, b_table))
    return AdapterSet(names, variables, tables, paths)
