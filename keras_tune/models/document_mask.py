"""Packed rows that do not leak: attention masked to each document.

`pack` batching joins documents into rows. With document masking on (the
default; `data.cross_document_attention=true` turns it off), the pipeline gives
every document its own `<bos>` and sends a *segment id* per position in place of
the 0/1 padding mask: 0 for padding, 1, 2, ... for the documents of the row (a
document continued from the previous row shares segment 1 with the row's leading
`<bos>`). keras-hub's Gemma backbones take only a padding mask, so each decoder
block's attention-mask function is wrapped to keep, on top of keras-hub's own
causal and padding mask (and Gemma 2/3's sliding window, applied afterwards in
the attention layer), only pairs of positions in the same segment.

Positions are not restarted per document: Gemma's rotary embeddings make a
score depend only on the distance between query and key, which masking keeps
inside one document, so a document's logits are the same wherever it sits in a
row (float32 rounding of the rotation angles aside).

A plain 0/1 mask is a single segment, so the wrapped function changes nothing
for unpacked batches, `evaluate_texts` or generation (which passes a cache and
is left alone entirely).

Tested on keras-hub `TESTED_KERAS_HUB` (the private method it wraps goes
through `keras_tune.compat.wrap_attention_mask`).

Example:

```python
from keras_tune.models.document_mask import enable_document_masking
enable_document_masking(causal_lm.backbone)
```
"""

import inspect

from keras_tune import compat

TESTED_KERAS_HUB = ">=0.21,<0.33"


def _same_segment(original):
    parameters = list(inspect.signature(original).parameters)
    cache_index = parameters.index("cache")

    def compute_attention_mask(*args, **kwargs):
        mask = original(*args, **kwargs)
        padding_mask = kwargs.get("padding_mask", args[1] if len(args) > 1 else None)
        cache = kwargs.get("cache", args[cache_index] if len(args) > cache_index else None)
        if padding_mask is None or cache is not None:
            return mask
        from keras import ops

        segments = ops.cast(padding_mask, "int32")
        same = ops.equal(segments[:, :, None], segments[:, None, :])
        return ops.cast(ops.logical_and(ops.cast(mask, "bool"), same), mask.dtype)

    return compute_attention_mask


def enable_document_masking(backbone):
    """Masks attention to the segment ids a packed batch sends as `padding_mask`.

    Idempotent: a block already wrapped is left as it is.

    Args:
        backbone: a keras-hub `GemmaBackbone` (Gemma, Gemma 2) or `Gemma3Backbone`.

    Returns:
        The number of decoder blocks wrapped.
    """
    return sum(compat.wrap_attention_mask(block, _same_segment) for block in backbone.transformer_layers)
