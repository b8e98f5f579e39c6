"""Gemma 2: keras-hub's `GemmaBackbone` with post-norms, logit soft caps and sliding-window attention.

keras-hub builds Gemma 2 with the Gemma classes; what tells the two apart is
the backbone's Gemma 2 features. keras-hub 0.32 would export a Gemma 2 to
Transformers as a Gemma 1 model (dropping those features), so that export is
refused; the PEFT adapter keeps Gemma's module names, which HF's Gemma 2 shares.
"""

from keras_tune.models.families.gemma import GEMMA2_FEATURES, Gemma


class Gemma2(Gemma):
    """Gemma 2 (2B, 9B, 27B and the ShieldGemma models built on them)."""

    name = "gemma2"
    title = "Gemma 2"
    description = "Gemma 2 (keras-hub GemmaBackbone with Gemma 2 features)"
    exports = ("--peft", "--keras-preset")

    def owns(self, backbone):
        return type(backbone) is self.classes()[0] and any(getattr(backbone, f, None) for f in GEMMA2_FEATURES)

    def owns_config(self, class_name, backbone_config):
        return class_name == self.classes()[0].__name__ and any(backbone_config.get(f) for f in GEMMA2_FEATURES)

    def transformers_problem(self, backbone):
        used = [name for name in GEMMA2_FEATURES if getattr(backbone, name, None)]
        return (
            "keras-hub exports a GemmaBackbone as Hugging Face model_type 'gemma' (Gemma 1), which would drop "
            f"this Gemma 2 model's {', '.join(used)}; use the keras-hub preset instead"
        )

    def after_transformers_export(self, backbone, directory):
        """Nothing: a Gemma 2 is never exported to Transformers."""
