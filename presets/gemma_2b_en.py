"""Gemma 2B base (keras-hub preset `gemma_2b_en`, 2,506,172,416 parameters)."""

from keras_tune.config import base_config


def get_config():
    config = base_config()
    config.preset = "gemma_2b_en"
    config.description = "Gemma 2B base"
    config.model.family = "gemma"
    config.model.source = "kaggle"
    config.model.handle = "kaggle://keras/gemma/keras/gemma_2b_en/3"
    # keras-hub backbone arguments; the total matches keras-hub's published count.
    config.model.arch = dict(
        vocabulary_size=256000,
        num_layers=18,
        num_query_heads=8,
        num_key_value_heads=1,
        hidden_dim=2048,
        intermediate_dim=32768,
        head_dim=256,
    )
    config.distribution.layout = "gemma_tp"
    config.data.seq_len = 256
    config.data.batch_size = 8
    config.train.precision = "bfloat16"
    return config
