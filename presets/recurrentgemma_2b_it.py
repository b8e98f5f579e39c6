"""RecurrentGemma 2B instruction-tuned (official Flax checkpoint): the architecture and recipe of `recurrentgemma_2b`."""

from keras_tune.presets.recurrentgemma_2b import get_config as base_preset


def get_config():
    config = base_preset()
    config.preset = "recurrentgemma_2b_it"
    config.description = "RecurrentGemma 2B instruction-tuned (Griffin)"
    config.model.handle = "kaggle://google/recurrentgemma/flax/2b-it"
    config.model.instruct = True
    return config
