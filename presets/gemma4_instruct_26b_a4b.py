"""Gemma 4 26B-A4B instruction-tuned (keras-hub preset `gemma4_instruct_26b_a4b`, text only): the architecture of `gemma4_26b_a4b`."""

from keras_tune.presets.gemma4_26b_a4b import get_config as base_preset


def get_config():
    config = base_preset()
    config.preset = "gemma4_instruct_26b_a4b"
    config.description = "Gemma 4 26B-A4B instruction-tuned (text)"
    config.model.handle = "kaggle://keras/gemma4/keras/gemma4_instruct_26b_a4b/2"
    config.model.instruct = True
    return config
