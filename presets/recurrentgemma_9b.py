"""RecurrentGemma 9B base (Griffin; official Flax checkpoint, 8,579,977,216 parameters), with the 2B's recipe."""

from keras_tune.presets.recurrentgemma_2b import get_config as base_preset


def get_config():
    config = base_preset()
    config.preset = "recurrentgemma_9b"
    config.description = "RecurrentGemma 9B base (Griffin)"
    config.model.handle = "kaggle://google/recurrentgemma/flax/9b"
    # The reference's RECURRENT_GEMMA_9B_V1.
    config.model.arch = dict(
        vocabulary_size=256000,
        num_layers=38,
        hidden_dim=4096,
        intermediate_dim=12288,
        num_heads=16,
        lru_width=4096,
        attention_window_size=2048,
        final_logit_soft_cap=30.0,
    )
    return config
