"""Gemma (1): keras-hub's `GemmaBackbone` with Gemma 1's architecture (also CodeGemma, ShieldGemma bases).

The planner's reading of a keras-hub Gemma decoder stack (`transformer_shapes`)
serves Gemma 2 and Gemma 3 too; so does the class, which they extend.
"""

import os
import re

from keras_tune.models.families.base import Family

# Gemma 2 features keras-hub's GemmaBackbone carries; a Gemma 1 model has none of them.
GEMMA2_FEATURES = (
    "use_post_ffw_norm",
    "use_post_attention_norm",
    "final_logit_soft_cap",
    "attention_logit_soft_cap",
    "use_sliding_window_attention",
)


class Gemma(Family):
    """Gemma 1: `GemmaBackbone` without Gemma 2's norms, soft caps and sliding window."""

    name = "gemma"
    title = "Gemma"
    description = "Gemma 1 (keras-hub GemmaBackbone)"
    exports = ("--peft", "--transformers", "--keras-preset")

    def classes(self):
        import keras_hub

        return (keras_hub.models.GemmaBackbone, keras_hub.models.GemmaCausalLMPreprocessor,
                keras_hub.models.GemmaCausalLM)

    def owns(self, backbone):
        return type(backbone) is self.classes()[0] and not any(getattr(backbone, f, None) for f in GEMMA2_FEATURES)

    def owns_config(self, class_name, backbone_config):
        return class_name == self.classes()[0].__name__ and not any(backbone_config.get(f) for f in GEMMA2_FEATURES)

    def planner_shapes(self, plan, arch):
        return transformer_shapes(plan, arch)

    def after_transformers_export(self, backbone, directory):
        _rewrite_gemma1_attention(backbone, directory)

    def decode_cache(self, causal_lm, batch_size, length):
        """`GemmaCausalLM.call_with_cache`'s one tensor `[batch, layers, 2 (key, value), length, heads, head_dim]`."""
        import jax.numpy as jnp

        backbone = causal_lm.backbone
        shape = (batch_size, backbone.num_layers, 2, length, backbone.num_key_value_heads, backbone.head_dim)
        return jnp.zeros(shape, dtype=causal_lm.compute_dtype)


def transformer_shapes(plan, arch):
    """Reads a keras-hub Gemma decoder stack and its per-device split off a sharding plan.

    Args:
        plan: a `ShardingPlan` of the model (LoRA included).
        arch: the backbone arguments (for the soft caps).
    """
    from keras_tune.memory import shapes

    model_axis = plan.mesh_sizes.get("model", 1)
    block = {p.path.split("/", 1)[1]: p for p in plan.placements if p.path.startswith("decoder_block_0/")}
    embedding = next(p for p in plan.placements if p.path.endswith("token_embedding/embeddings"))

    def split(name, dim):
        return model_axis if block[name].axes[dim] == "model" else 1

    heads, hidden, head_dim = block["attention/query/kernel"].shape
    ffw = block["ffw_gating/kernel"].shape[1]
    widths = {"attention_output": heads * head_dim, "ffw_linear": ffw}
    trained, lora_width = shapes.trained_layers(block, hidden, widths)
    residual = max(split(f"attention/{name}/kernel", 1) for name in ("query", "key", "value"))
    return shapes.ModelShapes(
        layers=sum(1 for p in plan.placements if re.fullmatch(r"decoder_block_\d+/pre_attention_norm/scale", p.path)),
        hidden=hidden,
        heads=heads // split("attention/query/kernel", 0),
        kv_heads=block["attention/key/kernel"].shape[0] // split("attention/key/kernel", 0),
        head_dim=head_dim,
        ffw=ffw // split("ffw_gating/kernel", 1),
        vocab=embedding.shape[0] // (model_axis if embedding.axes[0] == "model" else 1),
        splits={
            "residual": residual,
            "attention_output": split("attention/attention_output/kernel", 2),
            "ffw_output": split("ffw_linear/kernel", 1),
            "ffw_input": split("ffw_gating/kernel", 0),
        },
        trained=trained,
        lora_width=lora_width,
        post_norms="post_attention_norm/scale" in block,
        qk_norm="attention/query_norm/scale" in block,
        attention_soft_cap=bool(arch.get("attention_logit_soft_cap")),
        final_soft_cap=bool(arch.get("final_logit_soft_cap")),
        embeddings_trained=embedding.trainable,
        head_on_batch_axis="batch" in embedding.axes,
    )


def _hf_projection(kernel):
    """A keras `(heads, hidden, head_dim)` kernel as HF's `[heads * head_dim, hidden]` weight."""
    import numpy as np

    heads, hidden, head_dim = kernel.shape
    return np.ascontiguousarray(np.transpose(kernel, (0, 2, 1)).reshape(heads * head_dim, hidden))


def _rewrite_gemma1_attention(backbone, directory):
    """Rewrites q/k/v_proj of a keras-hub Gemma 1 export with the right values.

    keras-hub 0.32 writes k_proj/v_proj from key/value head 0 only and reshapes
    the query kernel as if heads x head_dim were the hidden size, which is right
    for Gemma 2B alone (one key/value head, 8 x 256 = 2048); Gemma 7B and any
    other shape came out wrong. The exporter is otherwise correct, so only these
    three tensors a layer are replaced.
    """
    import numpy as np
    from keras import ops
    from safetensors.numpy import load_file, save_file

    from keras_tune.rundir import atomic_write

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    for index in range(backbone.num_layers):
        attention = backbone.get_layer(f"decoder_block_{index}").attention
        for module, layer in (("q_proj", attention.query_dense), ("k_proj", attention.key_dense),
                              ("v_proj", attention.value_dense)):
            name = f"model.layers.{index}.self_attn.{module}.weight"
            kernel = np.asarray(ops.convert_to_numpy(layer.kernel))
            tensors[name] = _hf_projection(kernel).astype(tensors[name].dtype)
    with atomic_write(path, suffix=".safetensors") as partial:
        save_file(tensors, partial, metadata={"format": "pt"})
