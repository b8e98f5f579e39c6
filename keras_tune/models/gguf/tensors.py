"""llama.cpp's `gemma3` architecture: its constants, tensor names and weight layouts, both directions.

A GGUF tensor's dims are listed fastest-first, so read row-major they are the
PyTorch `[out, in]` layout. keras-hub wants `(heads, hidden, head_dim)` for the
query/key/value kernels, `(heads, head_dim, hidden)` for the attention output
and `[in, out]` for the feed-forward kernels (`to_keras`, `to_gguf`). llama.cpp's
`convert_hf_to_gguf.py` is the reference for the GGUF side.
"""




ARCHITECTURE = "gemma3"


# keras-hub's Gemma3 hard-codes these RoPE bases (local, global); a GGUF asking for
# others cannot be represented and is refused rather than silently mis-loaded.
LOCAL_ROPE_BASE = 10_000.0


GLOBAL_ROPE_BASE = 1_000_000.0


# llama.cpp scales queries by 1/sqrt(hidden/heads) only for the 62-layer Gemma 3
# 27B, by 1/sqrt(head_dim) otherwise; keras-hub's `query_head_dim_normalize`.
LAYERS_SCALED_BY_HIDDEN = 62


def layer_tensors(i):
    """(GGUF name, layer getter, attribute, kind) for decoder block `i`."""
    blk = f"blk.{i}."
    return [
        (blk + "attn_norm.weight", lambda b: b.pre_attention_norm, "scale", "norm"),
        (blk + "post_attention_norm.weight", lambda b: b.post_attention_norm, "scale", "norm"),
        (blk + "attn_q.weight", lambda b: b.attention.query_dense, "kernel", "attn_in"),
        (blk + "attn_k.weight", lambda b: b.attention.key_dense, "kernel", "attn_in"),
        (blk + "attn_v.weight", lambda b: b.attention.value_dense, "kernel", "attn_in"),
        (blk + "attn_q_norm.weight", lambda b: b.attention.query_norm, "scale", "norm"),
        (blk + "attn_k_norm.weight", lambda b: b.attention.key_norm, "scale", "norm"),
        (blk + "attn_output.weight", lambda b: b.attention.output_dense, "kernel", "attn_out"),
        (blk + "ffn_norm.weight", lambda b: b.pre_ffw_norm, "scale", "norm"),
        (blk + "post_ffw_norm.weight", lambda b: b.post_ffw_norm, "scale", "norm"),
        (blk + "ffn_gate.weight", lambda b: b.gating_ffw, "kernel", "ffw"),
        (blk + "ffn_up.weight", lambda b: b.gating_ffw_2, "kernel", "ffw"),
        (blk + "ffn_down.weight", lambda b: b.ffw_linear, "kernel", "ffw"),
    ]


def tensor_map(backbone):
    """List of (GGUF name, layer, attribute, kind) covering every backbone weight."""
    entries = [("token_embd.weight", backbone.get_layer("token_embedding"), "embeddings", "embedding")]
    for i in range(backbone.num_layers):
        block = backbone.get_layer(f"decoder_block_{i}")
        entries += [(name, get(block), attr, kind) for name, get, attr, kind in layer_tensors(i)]
    entries.append(("output_norm.weight", backbone.get_layer("final_normalization"), "scale", "norm"))
    return entries


def expected_gguf_shapes(kwargs):
    """Row-major GGUF shapes each tensor must have for `kwargs`."""
    hidden, heads, kv_heads = kwargs["hidden_dim"], kwargs["num_query_heads"], kwargs["num_key_value_heads"]
    head_dim, ffw = kwargs["head_dim"], kwargs["intermediate_dim"]
    shapes = {"token_embd.weight": (kwargs["vocabulary_size"], hidden), "output_norm.weight": (hidden,)}
    per_layer = {
        "attn_norm": (hidden,),
        "post_attention_norm": (hidden,),
        "attn_q": (heads * head_dim, hidden),
        "attn_k": (kv_heads * head_dim, hidden),
        "attn_v": (kv_heads * head_dim, hidden),
        "attn_q_norm": (head_dim,),
        "attn_k_norm": (head_dim,),
        "attn_output": (hidden, heads * head_dim),
        "ffn_norm": (hidden,),
        "post_ffw_norm": (hidden,),
        "ffn_gate": (ffw, hidden),
        "ffn_up": (ffw, hidden),
        "ffn_down": (hidden, ffw),
    }
    for i in range(kwargs["num_layers"]):
        shapes.update({f"blk.{i}.{name}.weight": shape for name, shape in per_layer.items()})
    return shapes


def to_keras(array, kind, keras_shape):
    """GGUF row-major array → keras-hub layout."""
    if kind == "attn_in":  # (heads * head_dim, hidden) → (heads, hidden, head_dim)
        heads, hidden, head_dim = keras_shape
        return array.reshape(heads, head_dim, hidden).transpose(0, 2, 1)
    if kind == "attn_out":  # (hidden, heads * head_dim) → (heads, head_dim, hidden)
        heads, head_dim, hidden = keras_shape
        return array.reshape(hidden, heads, head_dim).transpose(1, 2, 0)
    if kind == "ffw":  # [out, in] → [in, out]
        return array.T
    return array


def to_gguf(array, kind):
    """keras-hub layout → GGUF row-major array (inverse of `to_keras`)."""
    if kind == "attn_in":
        heads, hidden, head_dim = array.shape
        return array.transpose(0, 2, 1).reshape(heads * head_dim, hidden)
    if kind == "attn_out":
        heads, head_dim, hidden = array.shape
        return array.transpose(2, 0, 1).reshape(hidden, heads * head_dim)
    if kind == "ffw":
        return array.T
    return array
