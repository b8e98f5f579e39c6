"""Gemma 7B instruction-tuned (keras-hub preset `gemma_instruct_7b_en`): the architecture of `gemma_7b_en`."""

from keras_tune.presets.gemma_7b_en import get_config as base_preset


def get_config():
    config = base_preset()
    config.preset = "gemma_instruct_7b_en"
    config.description = "Gemma 7B instruction-tuned"
    config.model.handle = "kaggle://keras/gemma/keras/gemma_instruct_7b_en/4"
    config.model.instruct = True
    return config
