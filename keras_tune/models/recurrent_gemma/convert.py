"""The official RecurrentGemma checkpoint format <-> the Keras backbone's weights.

The official checkpoints (Kaggle `google/recurrentgemma/flax/<variation>`) are
Orbax PyTree checkpoints of the reference implementation's Flax parameter tree:
`embedder/input_embedding`, `final_norm/scale` and per block `blocks.<i>/...`
with `recurrent_block` (`linear_x`, `linear_y`, `linear_out`, `conv_1d`,
`rg_lru`) or `attention_block` (`proj_q`, `proj_k`, `proj_v`, `proj_final`),
`mlp_block` (`ffw_up` holding both MLP expansions stacked, `ffw_down`) and two
RMSNorm scales. The tree may sit under a `params` key (the reference's
`save_parameters` writes it so). Kernels keep their layout; only `ffw_up` is
split into Keras' `ffw_gating` and `ffw_gating_2`.

Example:

```python
params = read_checkpoint("recurrentgemma/2b")          # numpy, host memory
load_params(causal_lm.backbone, params)                 # every variable, shapes checked
write_checkpoint(backbone_params(causal_lm.backbone), "out/2b")
```
"""

import os

import numpy as np

from keras_tune.errors import UserError

# (official path under `blocks.<i>`, Keras path under `decoder_block_<i>`)
_SHARED = (
    ("temporal_pre_norm/scale", "temporal_pre_norm/scale"),
    ("channel_pre_norm/scale", "channel_pre_norm/scale"),
    ("mlp_block/ffw_down/kernel", "mlp/ffw_linear/kernel"),
    ("mlp_block/ffw_down/bias", "mlp/ffw_linear/bias"),
)
_RECURRENT = tuple(
    (f"recurrent_block/{layer}/{name}", f"recurrent/{layer}/{name}")
    for layer in ("linear_x", "linear_y", "linear_out")
    for name in ("kernel", "bias")
) + (
    ("recurrent_block/conv_1d/w", "recurrent/conv_1d/kernel"),
    ("recurrent_block/conv_1d/b", "recurrent/conv_1d/bias"),
    ("recurrent_block/rg_lru/a_param", "recurrent/rg_lru/a_param"),
    ("recurrent_block/rg_lru/input_gate/w", "recurrent/rg_lru/input_gate_kernel"),
    ("recurrent_block/rg_lru/input_gate/b", "recurrent/rg_lru/input_gate_bias"),
    ("recurrent_block/rg_lru/a_gate/w", "recurrent/rg_lru/a_gate_kernel"),
    ("recurrent_block/rg_lru/a_gate/b", "recurrent/rg_lru/a_gate_bias"),
)
_ATTENTION = (
    ("attention_block/proj_q/kernel", "attention/query/kernel"),
    ("attention_block/proj_k/kernel", "attention/key/kernel"),
    ("attention_block/proj_v/kernel", "attention/value/kernel"),
    ("attention_block/proj_final/kernel", "attention/attention_output/kernel"),
    ("attention_block/proj_final/bias", "attention/attention_output/bias"),
)
_MLP_UP = ("mlp_block/ffw_up/w", "mlp_block/ffw_up/b")


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _nest(flat):
    tree = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def params_to_weights(params):
    """Maps an official parameter tree to `{keras variable path: array}`.

    Args:
        params: the nested dict of a checkpoint (with or without a `params` key).
    """
    flat = _flatten(params.get("params", params))
    weights = {
        "token_embedding/embeddings": flat.pop("embedder/input_embedding"),
        "final_normalization/scale": flat.pop("final_norm/scale"),
    }
    index = 0
    while f"blocks.{index}/temporal_pre_norm/scale" in flat:
        official, ours = f"blocks.{index}/", f"decoder_block_{index}/"
        kind = _RECURRENT if f"{official}recurrent_block/linear_x/kernel" in flat else _ATTENTION
        for source, target in _SHARED + kind:
            weights[ours + target] = flat.pop(official + source)
        up, up_bias = (np.asarray(flat.pop(official + name)) for name in _MLP_UP)
        weights[ours + "mlp/ffw_gating/kernel"], weights[ours + "mlp/ffw_gating_2/kernel"] = up[0], up[1]
        weights[ours + "mlp/ffw_gating/bias"] = up_bias[0].reshape(-1)
        weights[ours + "mlp/ffw_gating_2/bias"] = up_bias[1].reshape(-1)
        index += 1
    if flat:
        raise UserError(
            f"official checkpoint: unexpected parameters {sorted(flat)[:3]}; expected a RecurrentGemma parameter tree"
        )
    return weights


def backbone_params(backbone):
    """The official parameter tree (numpy, float32) of a `RecurrentGemmaBackbone`'s weights.

    Args:
        backbone: a `RecurrentGemmaBackbone` (LoRA, if any, not merged).
    """
    weights = {v.path: np.asarray(v.numpy(), dtype=np.float32) for v in backbone.weights if "lora_" not in v.path}
    flat = {
        "embedder/input_embedding": weights.pop("token_embedding/embeddings"),
        "final_norm/scale": weights.pop("final_normalization/scale"),
    }
    for index, block in enumerate(backbone.transformer_layers):
        official, ours = f"blocks.{index}/", f"decoder_block_{index}/"
        kind = _RECURRENT if block.block_type == "recurrent" else _ATTENTION
        for source, target in _SHARED + kind:
            flat[official + source] = weights.pop(ours + target)
        gates = [weights.pop(f"{ours}mlp/{name}/kernel") for name in ("ffw_gating", "ffw_gating_2")]
        biases = [weights.pop(f"{ours}mlp/{name}/bias") for name in ("ffw_gating", "ffw_gating_2")]
        flat[official + _MLP_UP[0]] = np.stack(gates)
        flat[official + _MLP_UP[1]] = np.stack(biases)[:, None, None, :]
    return _nest(flat)


def load_params(backbone, params):
    """Assigns an official parameter tree to every weight of `backbone`, all shapes checked first.

    Args:
        backbone: a `RecurrentGemmaBackbone` built with the checkpoint's architecture.
        params: the checkpoint's nested dict (numpy or JAX arrays, any float dtype).
    """
    weights = params_to_weights(params)
    variables = {v.path: v for v in backbone.weights if "lora_" not in v.path}
    for path in sorted(set(variables) | set(weights)):
        if path not in weights or path not in variables:
            raise UserError(
                f"official checkpoint: {path} is {'missing' if path not in weights else 'not in the model'}; "
                "expected a checkpoint of the preset's architecture (model.arch)"
            )
        if tuple(np.shape(weights[path])) != tuple(variables[path].shape):
            raise UserError(
                f"official checkpoint: {path} has shape {tuple(np.shape(weights[path]))} but the model's is "
                f"{tuple(variables[path].shape)}; expected a checkpoint of the preset's architecture (model.arch)"
            )
    for path, variable in variables.items():
        variable.assign(np.asarray(weights.pop(path), dtype=np.float32))  # cast to the variable dtype by keras


def read_checkpoint(path):
    """Reads an Orbax PyTree checkpoint into numpy arrays in host memory.

    Args:
        path: the checkpoint directory.
    """
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(os.path.abspath(path))
    # Orbax >= 0.9 wraps the tree in a step- and a tree-metadata object.
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(os.path.abspath(path), restore_args=restore_args)


def write_checkpoint(params, path):
    """Writes a parameter tree as the official format: an Orbax PyTree checkpoint.

    Args:
        params: an official parameter tree (`backbone_params`).
        path: a directory that must not exist yet.
    """
    import orbax.checkpoint as ocp

    ocp.PyTreeCheckpointer().save(os.path.abspath(path), params)
