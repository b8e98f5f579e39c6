"""Gemma 2 9B instruction-tuned (keras-hub preset `gemma2_instruct_9b_en`): the architecture of `gemma2_9b_en`."""

from keras_tune.presets.gemma2_9b_en import get_config as base_preset


def get_config():
    config = base_preset()
    config.preset = "gemma2_instruct_9b_en"
    config.description = "Gemma 2 9B instruction-tuned"
    config.model.handle = "kaggle://keras/gemma2/keras/gemma2_instruct_9b_en/4"
    config.model.instruct = True
    return config
