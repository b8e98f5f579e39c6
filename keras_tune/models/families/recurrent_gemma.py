"""RecurrentGemma (Griffin): keras_tune's own Keras model, from the official Flax checkpoints or at random.

keras-hub has no RecurrentGemma (`keras_tune.models.recurrent_gemma` builds it).
Its residual blocks alternate two recurrent blocks and one local-attention block;
its recurrent blocks add LoRA targets (`linear_x`, `linear_y`, `linear_out`), its
backbone reads packed rows' segment ids itself, and its only export is a merged
keras-hub preset (neither keras-hub, Transformers' exporter nor llama.cpp's
Gemma converter knows Griffin).
"""

import math

from keras_tune.models.families.base import GEMMA_LORA_TARGETS, Family


class RecurrentGemma(Family):
    """RecurrentGemma 2B and 9B (base and instruction-tuned)."""

    name = "recurrentgemma"
    title = "RecurrentGemma"
    description = "RecurrentGemma (Griffin; keras_tune's own Keras model)"
    sources = ("flax", "tiny", "local")
    lora_targets = GEMMA_LORA_TARGETS + ("linear_x", "linear_y", "linear_out")
    document_masking = False  # its blocks restart at every segment id on their own
    selective_remat = False

    def classes(self):
        from keras_tune.models import recurrent_gemma

        return (recurrent_gemma.RecurrentGemmaBackbone, recurrent_gemma.RecurrentGemmaCausalLMPreprocessor,
                recurrent_gemma.RecurrentGemmaCausalLM)

    def check_source(self, config):
        if config.model.source == "flax":
            from keras_tune.models.recurrent_gemma import source

            source.check_source(config.model.handle)

    def load(self, config):
        if config.model.source != "flax":
            return super().load(config)
        from keras_tune.models.recurrent_gemma import source

        return source.load_causal_lm(config)

    def attention_span(self, backbone, seq_len):
        """Only its local-attention blocks attend, each query over at most its window and itself."""
        layers, pattern = int(backbone.num_layers), tuple(backbone.block_types)
        attending = sum(1 for index in range(layers) if pattern[index % len(pattern)] == "attention")
        return attending, min(seq_len, int(backbone.attention_window_size) + 1)

    def planner_shapes(self, plan, arch):
        return griffin_shapes(plan, arch)


def _first_block(plan, temporal):
    # The first residual block whose temporal block is `temporal` ("recurrent" or "attention"), by sub-path.
    blocks = {}
    for p in plan.placements:
        index, _, rest = p.path.partition("/")
        if index.startswith("decoder_block_"):
            blocks.setdefault(int(index.rsplit("_", 1)[1]), {})[rest] = p
    return next((block for _, block in sorted(blocks.items()) if any(k.startswith(f"{temporal}/") for k in block)), {})



def griffin_shapes(plan, arch):
    """`model_shapes` of a RecurrentGemma (Griffin) model: recurrent and local-attention residual blocks.

    Dense kernels are `(inputs, outputs)`: query `(D, heads x h)`, key/value
    `(D, h)` (one key/value head), linear_x/linear_y `(D, lru)`. A head split
    over more devices than there are heads leaves a whole head a device.

    Args:
        plan: a `ShardingPlan` of the model (LoRA included).
        arch: the backbone arguments (`num_heads`).
    """
    from keras_tune.memory import shapes

    model_axis = plan.mesh_sizes.get("model", 1)
    recurrent, attention = _first_block(plan, "recurrent"), _first_block(plan, "attention")
    either = recurrent or attention
    embedding = next(p for p in plan.placements if p.path.endswith("token_embedding/embeddings"))

    def split(block, name, dim):
        return model_axis if name in block and block[name].axes[dim] == "model" else 1

    hidden, ffw = either["mlp/ffw_gating/kernel"].shape
    heads = int(arch.get("num_heads", 1))
    head_dim = attention["attention/query/kernel"].shape[1] // heads if attention else hidden // heads
    lru = recurrent["recurrent/linear_x/kernel"].shape[1] if recurrent else 0
    widths = {"attention_output": heads * head_dim, "ffw_linear": ffw, "linear_out": lru}
    trained, lora_width = shapes.trained_layers({**recurrent, **attention}, hidden, widths)
    paths = {p.path for p in plan.placements}
    layers = [path.split("/")[0] for path in paths if path.endswith("/temporal_pre_norm/scale")]
    return shapes.ModelShapes(
        layers=len(layers),
        hidden=hidden,
        heads=math.ceil(heads / split(attention, "attention/query/kernel", 1)),
        kv_heads=1,
        head_dim=head_dim,
        ffw=ffw // split(either, "mlp/ffw_gating/kernel", 1),
        vocab=embedding.shape[0] // (model_axis if embedding.axes[0] == "model" else 1),
        splits={
            "residual": max(split(attention, f"attention/{n}/kernel", 0) for n in ("query", "key", "value")),
            "attention_output": split(attention, "attention/attention_output/kernel", 1),
            "ffw_output": split(either, "mlp/ffw_linear/kernel", 1),
            "ffw_input": split(either, "mlp/ffw_gating/kernel", 0),
            "recurrent_input": max(split(recurrent, f"recurrent/linear_{n}/kernel", 0) for n in "xy"),
        },
        trained=trained,
        lora_width=lora_width,
        post_norms=False,
        qk_norm=False,
        attention_soft_cap=False,
        final_soft_cap=bool(arch.get("final_logit_soft_cap")),
        embeddings_trained=embedding.trainable,
        head_on_batch_axis="batch" in embedding.axes,
        recurrent_layers=sum(f"{layer}/recurrent/linear_x/kernel" in paths for layer in layers),
        lru=lru // split(recurrent, "recurrent/linear_x/kernel", 1),
    )
