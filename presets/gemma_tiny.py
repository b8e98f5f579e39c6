"""A tiny random-init Gemma (v1 architecture) for tests and laptops: builds in seconds, no download."""

from keras_tune.config import base_config


def get_config():
    config = base_config()
    config.preset = "gemma_tiny"
    config.description = "Tiny random-init Gemma (2 layers, 1024-piece offline tokenizer)"
    config.model.family = "gemma"
    config.model.source = "tiny"
    config.model.arch = dict(
        vocabulary_size=1024,
        num_layers=2,
        num_query_heads=8,
        num_key_value_heads=8,
        hidden_dim=64,
        # keras-hub's GemmaBackbone halves this, as in the published presets.
        intermediate_dim=256,
        head_dim=16,
    )
    config.distribution.layout = "gemma_tp"
    config.lora.rank = 4
    config.optimizer.learning_rate = 1e-3
    config.data.seq_len = 64
    config.data.batch_size = 8
    config.train.precision = "float32"
    return config
