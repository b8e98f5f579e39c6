"""RecurrentGemma 9B instruction-tuned (official Flax checkpoint): the architecture and recipe of `recurrentgemma_9b`."""

from keras_tune.presets.recurrentgemma_9b import get_config as base_preset


def get_config():
    config = base_preset()
    config.preset = "recurrentgemma_9b_it"
    config.description = "RecurrentGemma 9B instruction-tuned (Griffin)"
    config.model.handle = "kaggle://google/recurrentgemma/flax/9b-it"
    config.model.instruct = True
    return config
