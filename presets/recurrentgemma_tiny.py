"""A tiny random-init RecurrentGemma (Griffin: recurrent, recurrent, local attention) for tests: no download."""

from keras_tune.config import base_config


def get_config():
    config = base_config()
    config.preset = "recurrentgemma_tiny"
    config.description = "Tiny random-init RecurrentGemma (3 blocks, attention window 16, 1024-piece offline tokenizer)"
    config.model.family = "recurrentgemma"
    config.model.source = "tiny"
    config.model.arch = dict(
        vocabulary_size=1024,
        num_layers=3,
        hidden_dim=64,
        intermediate_dim=192,
        num_heads=4,
        lru_width=64,
        # Shorter than the sequences, so training and generation cross the window.
        attention_window_size=16,
        final_logit_soft_cap=30.0,
    )
    config.distribution.layout = "recurrentgemma_tp"
    config.lora.rank = 4
    config.lora.targets = ("query", "value", "linear_x", "linear_y")
    config.optimizer.learning_rate = 1e-3
    config.optimizer.beta_2 = 0.96
    config.optimizer.epsilon = 1e-8
    config.optimizer.weight_decay = 0.1
    config.optimizer.exclude_embeddings_from_decay = True
    config.data.seq_len = 64
    config.data.batch_size = 8
    config.train.precision = "float32"
    return config
