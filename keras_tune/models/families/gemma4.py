"""Gemma 4 (text): E2B, E4B, 26B-A4B (mixture of experts) and 31B, as keras_tune's text-only model.

keras-hub 0.32 ships Gemma 4, but builds its vision and audio encoders into
every model, runs all 128 experts of the 26B-A4B for every token, and reads
int8 feed-forward kernels without their scales. keras_tune tunes its own
`Gemma4TextBackbone` (`keras_tune.models.gemma4`): keras-hub's layers and
weight names, text only, with sparse top-k experts. Weights come from keras-hub
presets (`kaggle://`) or a local keras-hub preset or Transformers checkpoint
directory (`model.source local`), text tensors only.

What it adds to the Gemma families: LoRA targets for the per-layer-embedding
projections and the experts (`moe_expert_bank`, per-expert factors); its own
segment-id masking and per-document positions; the planner's reading of
per-layer widths, shared keys and values, per-layer embeddings and experts
(`gemma4_shapes`); its chat turn markers; a Transformers export whose config
Transformers reads (`keras_tune.models.gemma4.transformers`); a llama.cpp
`gemma4` GGUF (`keras_tune.models.gemma4.gguf`).
"""

import math
import re

from keras_tune.models.families.base import GEMMA_LORA_TARGETS, Family

# Layers Gemma 4 adds that LoRA can adapt: the per-layer-input gate and projection
# (E2B, E4B), the per-layer-embedding model projection, and the expert bank (per-expert factors).
GEMMA4_LORA_TARGETS = ("per_layer_input_gate", "per_layer_up_proj", "per_layer_model_projection", "moe_expert_bank")


class Gemma4(Family):
    """Gemma 4 text models: E2B, E4B (per-layer embeddings), 26B-A4B (128 experts, top 8), 31B; base and instruct."""

    name = "gemma4"
    title = "Gemma 4"
    description = "Gemma 4 text (keras_tune's Gemma4TextBackbone: keras-hub's layers, sparse experts)"
    lora_targets = GEMMA_LORA_TARGETS + GEMMA4_LORA_TARGETS
    exports = ("--peft", "--transformers", "--gguf", "--keras-preset")
    document_masking = False  # the backbone masks segments and restarts positions itself

    def classes(self):
        import keras_hub

        from keras_tune.models.gemma4 import Gemma4TextBackbone, Gemma4TextCausalLM

        return Gemma4TextBackbone, keras_hub.models.Gemma4CausalLMPreprocessor, Gemma4TextCausalLM

    def owns_config(self, class_name, backbone_config):
        # keras_tune's merged presets save its text backbone; Kaggle's hold keras-hub's whole model.
        return class_name in ("Gemma4TextBackbone", "Gemma4Backbone")

    def tokenizer(self, proto):
        import keras_hub

        return keras_hub.models.Gemma4Tokenizer(proto=proto, has_vision_tokens=False, has_audio_tokens=False,
                                                has_video_tokens=False)

    def tiny_user_symbols(self):
        return ("<|turn>", "<turn|>")

    def context_length(self, arch):
        # E2B and E4B (per-layer embeddings) were trained at 128K tokens, 26B-A4B and 31B at 256K.
        return 131072 if int(arch.get("hidden_size_per_layer_input") or 0) > 0 else 262144

    def backbone_kwargs(self, config):
        if config.model.source == "local":
            from keras_tune.models.gemma4.source import local_arguments

            return local_arguments(config.model.handle)
        return super().backbone_kwargs(config)

    def attention_span(self, backbone, seq_len):
        """Every block attends; a sliding-window block over at most its window, a global one at its wider heads.

        The span is the mean over blocks of the keys a query sees, weighted by
        the block's head width relative to `head_dim` (what the FLOPs count multiplies).
        """
        spans = []
        for block in backbone.transformer_layers:
            keys = min(seq_len, block.sliding_window_size) if block.attention.use_sliding_window_attention else seq_len
            spans.append(keys * block.attention.head_dim / backbone.head_dim)
        return len(spans), int(round(sum(spans) / max(1, len(spans))))

    def planner_shapes(self, plan, arch):
        return gemma4_shapes(plan, arch)

    def after_transformers_export(self, backbone, directory):
        """Nothing to mend: `Gemma4TextCausalLM.export_to_transformers` writes Transformers' config itself."""

    def export_gguf(self, causal_lm, path, *, dtype="f32", context_length=None, name=None):
        """Writes the (merged) model as a llama.cpp `gemma4` GGUF (`keras_tune.models.gemma4.gguf`).

        Args:
            causal_lm: a `Gemma4TextCausalLM` with its preprocessor.
            path: output `.gguf` path.
            dtype: "f32" or "f16".
            context_length: `gemma4.context_length`; None: the family's (`context_length`).
            name: `general.name`; defaults to the file's stem.
        """
        from keras_tune.models.gemma4.gguf import export_gemma4_gguf

        if context_length is None:
            context_length = self.context_length(causal_lm.backbone.get_config())
        return export_gemma4_gguf(causal_lm, path, dtype=dtype, context_length=context_length, name=name)

    def decode_cache(self, causal_lm, batch_size, length):
        """keras-hub's Gemma 4 cache `[batch, layers, 2, length, heads, max(head_dim, global_head_dim)]`."""
        import jax.numpy as jnp

        backbone = causal_lm.backbone
        head_dim = max(backbone.head_dim, backbone.global_head_dim or 0)
        shape = (batch_size, backbone.num_layers, 2, length, backbone.num_key_value_heads, head_dim)
        return jnp.zeros(shape, dtype=causal_lm.compute_dtype)


def _blocks(plan):
    """{block index: {sub-path: Placement}} of the plan's decoder blocks."""
    blocks = {}
    for placement in plan.placements:
        match = re.match(r"decoder_block_(\d+)/(.*)", placement.path)
        if match:
            blocks.setdefault(int(match.group(1)), {})[match.group(2)] = placement
    return dict(sorted(blocks.items()))


def gemma4_shapes(plan, arch):  # long: one reading per kind of block, each a ModelShapes of its own
    """The planner's view of a Gemma 4 model: one `ModelShapes` per kind of block, in `layer_groups`.

    Blocks differ in head width and key/value heads (sliding or global), in
    owning keys and values (the last `num_kv_shared_layers` reuse earlier
    ones), in MLP width (double on those with `use_double_wide_mlp`), in
    per-layer inputs and experts; blocks alike are counted together. The top
    level carries the embedding, the vocabulary and the first block's numbers.

    Args:
        plan: a `ShardingPlan` of the abstract model (LoRA included).
        arch: the backbone arguments.
    """
    from keras_tune.memory import shapes

    sizes = plan.mesh_sizes
    model_axis = sizes.get("model", 1)
    embedding = next(p for p in plan.placements if p.path.endswith("/token_embedding/embeddings")
                     or p.path == "token_embedding/embeddings")

    def split(block, name, dim):
        placement = block.get(name)
        if placement is None or placement.axes[dim] is None:
            return 1
        return sizes.get(placement.axes[dim], 1)

    groups = {}
    for block in _blocks(plan).values():
        heads, hidden, head_dim = block["attention/query/kernel"].shape
        owns_kv = "attention/key/kernel" in block
        kv_heads = block["attention/key/kernel"].shape[0] if owns_kv else 0
        ffw = block["ffw_gating/kernel"].shape[1]
        experts = block.get("moe_expert_bank/gate_proj")
        widths = {"attention_output": heads * head_dim, "ffw_linear": ffw, "per_layer_up_proj": 0}
        if "per_layer_input_gate/kernel" in block:
            widths["per_layer_up_proj"] = block["per_layer_input_gate/kernel"].shape[1]
        trained, lora_width = shapes.trained_layers(block, hidden, widths)
        kv_split = split(block, "attention/key/kernel", 0) if owns_kv else 1
        group = shapes.ModelShapes(
            layers=1, hidden=hidden,
            heads=math.ceil(heads / split(block, "attention/query/kernel", 0)),
            kv_heads=math.ceil(kv_heads / kv_split) if owns_kv else 0, head_dim=head_dim,
            ffw=ffw // split(block, "ffw_gating/kernel", 1), vocab=0,
            splits={
                "residual": max(split(block, f"attention/{n}/kernel", 1) for n in ("query", "key", "value")),
                "attention_output": split(block, "attention/attention_output/kernel", 2),
                "ffw_output": split(block, "ffw_linear/kernel", 1),
                "ffw_input": split(block, "ffw_gating/kernel", 0),
            },
            trained=trained, lora_width=lora_width, post_norms=True, qk_norm=True,
            attention_soft_cap=bool(arch.get("attention_logit_soft_cap")), final_soft_cap=False,
            embeddings_trained=False, head_on_batch_axis=False, value_norm=owns_kv,
            experts=experts.shape[0] // split(block, "moe_expert_bank/gate_proj", 0) if experts else 0,
            experts_per_token=int(arch.get("num_experts_per_token") or 0) if experts else 0,
            expert_ffw=experts.shape[2] // split(block, "moe_expert_bank/gate_proj", 2) if experts else 0,
            per_layer_width=widths["per_layer_up_proj"],
        )
        key = (group.heads, group.kv_heads, group.head_dim, group.ffw, group.experts, group.per_layer_width,
               group.trained, group.lora_width)
        count, _ = groups.get(key, (0, group))
        groups[key] = (count + 1, group)
    layer_groups = tuple((count, group) for count, group in groups.values())
    first = layer_groups[0][1]
    return shapes.ModelShapes(
        layers=sum(count for count, _ in layer_groups), hidden=first.hidden, heads=first.heads,
        kv_heads=first.kv_heads, head_dim=first.head_dim, ffw=first.ffw,
        vocab=embedding.shape[0] // (model_axis if embedding.axes[0] == "model" else 1),
        splits=first.splits, trained=first.trained, lora_width=first.lora_width, post_norms=True, qk_norm=True,
        attention_soft_cap=first.attention_soft_cap, final_soft_cap=bool(arch.get("final_logit_soft_cap")),
        embeddings_trained=embedding.trainable, head_on_batch_axis="batch" in embedding.axes,
        layer_groups=layer_groups,
    )
