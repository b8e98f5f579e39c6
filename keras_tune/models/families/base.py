"""The interface every model family implements: what the rest of keras_tune may ask of a family.

A family is one object (`Family` subclass instance) registered by name in
`keras_tune.models.families`. Its attributes are data (sources, LoRA targets,
exports, switches); its methods build or read models. The defaults here are the
common case; a family overrides what differs. Nothing outside
`models/families/` compares a family name: it asks the family.

Example:

```python
from keras_tune.models import families
family = families.get("gemma3")
backbone_cls, preprocessor_cls, causal_lm_cls = family.classes()
print(family.sources, family.lora_targets, family.layout("fsdp"))
```
"""

from keras_tune.errors import UserError

# keras-hub's attention and feed-forward layer names inside a Gemma decoder block.
GEMMA_LORA_TARGETS = ("query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear")
# Where a run can take its weights from (a family supports some of them).
GENERIC_SOURCES = ("kaggle", "local", "tiny")
# Every output `python -m keras_tune.export` knows, by its flag.
EXPORT_FORMATS = {
    "--gguf": "GGUF",
    "--transformers": "Transformers",
    "--peft": "PEFT",
    "--keras-preset": "a merged keras-hub preset, as generate --merge writes",
}


def saved_backbone(directory):
    """`(class name, constructor arguments)` of the backbone a keras-hub preset directory holds.

    Args:
        directory: a folder written by `save_to_preset` (config.json, model.weights.h5, ...).

    Raises:
        UserError: no readable config.json there.
    """
    import json
    import os

    path = os.path.join(directory, "config.json")
    try:
        with open(path) as file:
            saved = json.load(file)
        arguments = {k: v for k, v in saved["config"].items() if k not in ("name", "trainable", "dtype")}
        return saved["class_name"], arguments
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{directory}: not a keras-hub preset directory (no readable config.json); expected a folder "
                        "written by save_to_preset: a full-weight run's model/, or export --keras-preset") from None


class Family:
    """A model family: its keras-hub classes, sources, LoRA targets, layouts, exports and planner view.

    Attributes:
        name: the `model.family` value presets use.
        title: how people write it ("Gemma 3"), for messages.
        description: a few words for listings.
        sources: the `model.source` values it loads from (`GENERIC_SOURCES`
            are handled by the loader; others by `check_source`/`load`).
        lora_targets: layer names `--lora-targets` may name.
        exports: the `python -m keras_tune.export` flags it has writers for.
        document_masking: packed rows' segment ids become an attention mask
            (`keras_tune.models.document_mask`); a family whose model reads
            segment ids itself sets False.
        selective_remat: `train.keep_activations=matmuls` applies to its blocks.
    """

    name = ""
    title = ""
    description = ""
    sources = GENERIC_SOURCES
    lora_targets = GEMMA_LORA_TARGETS
    exports = ("--keras-preset",)
    document_masking = True
    selective_remat = True

    def classes(self):
        """`(backbone class, preprocessor class, causal LM class)` (keras-hub's or our own)."""
        raise NotImplementedError(f"family {self.name} names no classes")

    def owns(self, backbone):
        """Whether `backbone` (a built or abstract one) is a model of this family.

        Args:
            backbone: a keras-hub (or keras_tune) backbone.
        """
        return type(backbone) is self.classes()[0]

    def owns_config(self, class_name, backbone_config):
        """Whether a saved backbone (a keras-hub preset directory's config.json) is of this family.

        Args:
            class_name: the saved backbone's class name.
            backbone_config: its constructor arguments.
        """
        return class_name == self.classes()[0].__name__

    def backbone_kwargs(self, config):
        """The backbone's constructor arguments for `config`: `model.arch`, its vocabulary the tokenizer's.

        A model trained from scratch with its own tokenizer (`model.tokenizer`)
        has as many embedding rows as the tokenizer has pieces.

        Args:
            config: a validated run config.
        """
        if config.model.source == "local":  # a keras-hub preset directory says its own architecture
            return saved_backbone(config.model.handle)[1]
        kwargs = dict(config.model.arch)
        if config.model.get("tokenizer"):
            from keras_tune.models.sentencepiece import vocabulary_size

            kwargs["vocabulary_size"] = vocabulary_size(config.model.tokenizer)
        return kwargs

    def tokenizer(self, proto):
        """The family's keras-hub tokenizer around a serialized SentencePiece model (the tiny presets').

        Args:
            proto: a serialized SentencePiece `ModelProto`.
        """
        import keras_hub

        return keras_hub.models.GemmaTokenizer(proto=proto)

    def tiny_user_symbols(self):
        """Pieces the tiny offline tokenizer keeps whole for this family: its chat turn markers (Gemma's by default)."""
        return ("<start_of_turn>", "<end_of_turn>")

    def layout(self, style="tp"):
        """The shipped layout of a style ("tp" or "fsdp"): a name in `layouts/` or a path to a `.json`.

        Args:
            style: "tp" (tensor parallel over the model axis) or "fsdp" (also over the batch axis).
        """
        return f"{self.name}_{style}"

    def context_length(self, arch):
        """Tokens the pretrained models of this family were trained on (for the `--seq-len` warning).

        Args:
            arch: the backbone arguments.
        """
        return 8192

    def check_source(self, config):
        """Cheap checks that a family-specific source's weights can be reached (not `GENERIC_SOURCES`).

        Args:
            config: a validated run config.
        """

    def load(self, config):
        """Builds the CausalLM of a family-specific source under the active distribution.

        Args:
            config: a validated run config whose source is not in `GENERIC_SOURCES`.
        """
        raise UserError(f"model.source {config.model.source}: {self.name} models do not load from it; "
                        f"expected one of {', '.join(self.sources)}")

    def attention_span(self, backbone, seq_len):
        """`(blocks that attend, keys a query attends over)`, for the FLOPs estimate.

        Args:
            backbone: the model's backbone.
            seq_len: tokens per training sequence.
        """
        return int(getattr(backbone, "num_layers", 0)), seq_len

    def planner_shapes(self, plan, arch):
        """The memory planner's view of the model (`keras_tune.memory.shapes.ModelShapes`), or None.

        None means the planner does not cover this family.

        Args:
            plan: a `ShardingPlan` of the abstract model (LoRA included).
            arch: the backbone arguments.
        """
        return None

    def transformers_problem(self, backbone):
        """Why a Transformers export of this backbone would be wrong, or None.

        Args:
            backbone: the model's backbone (an abstract one works).
        """
        if "--transformers" not in self.exports:
            return (f"Transformers export is not implemented for {self.name} models; "
                    "use the keras-hub preset instead")
        return None

    def after_transformers_export(self, backbone, directory):
        """Mends what keras-hub's Transformers exporter writes wrong for this family (default: nothing).

        Args:
            backbone: the exported model's backbone.
            directory: the Transformers directory keras-hub wrote.
        """

    def decode_cache(self, causal_lm, batch_size, length):
        """An empty key/value cache for `causal_lm.call_with_cache`; None: not servable.

        Every leaf holds rows on axis 0 and `[..., heads, head_dim]` last (the server
        places rows over the mesh's batch axis and heads over the model axis).

        `keras_tune.serve` decodes each row at its own position through the
        model's own `call_with_cache`; a family whose CausalLM has none (the
        default) is refused by the server with one line.

        Args:
            causal_lm: the family's built CausalLM.
            batch_size: rows (the server's slots).
            length: positions a row holds (the server's context).
        """
        return None
