"""Gemma 2 27B instruction-tuned (keras-hub preset `gemma2_instruct_27b_en`): the architecture of `gemma2_27b_en`."""

from keras_tune.presets.gemma2_27b_en import get_config as base_preset


def get_config():
    config = base_preset()
    config.preset = "gemma2_instruct_27b_en"
    config.description = "Gemma 2 27B instruction-tuned"
    config.model.handle = "kaggle://keras/gemma2/keras/gemma2_instruct_27b_en/3"
    config.model.instruct = True
    return config
