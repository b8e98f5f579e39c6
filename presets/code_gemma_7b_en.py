"""CodeGemma 7B base (keras-hub preset `code_gemma_7b_en`): the architecture of `gemma_7b_en`."""

from keras_tune.presets.gemma_7b_en import get_config as base_preset


def get_config():
    config = base_preset()
    config.preset = "code_gemma_7b_en"
    config.description = "CodeGemma 7B base"
    config.model.handle = "kaggle://keras/codegemma/keras/code_gemma_7b_en/3"
    config.model.instruct = False
    return config
