"""ShieldGemma 27B safety classifier (Gemma 2) (keras-hub preset `shieldgemma_27b_en`): the architecture of `gemma2_27b_en`."""

from keras_tune.presets.gemma2_27b_en import get_config as base_preset


def get_config():
    config = base_preset()
    config.preset = "shieldgemma_27b_en"
    config.description = "ShieldGemma 27B safety classifier (Gemma 2)"
    config.model.handle = "kaggle://google/shieldgemma/keras/shieldgemma_27b_en/2"
    config.model.instruct = True
    return config
