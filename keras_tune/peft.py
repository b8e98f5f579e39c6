"""LoRA adapters in Hugging Face PEFT's layout, for Gemma, Gemma 2 and Gemma 3.

A PEFT adapter directory holds `adapter_config.json` and
`adapter_model.safetensors`, whose tensors are named like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([r, in]) and
`...lora_B.weight` ([out, r]); PEFT adds `lora_B @ lora_A * lora_alpha / r` to
the module's `[out, in]` weight.

Keras' `EinsumDense` LoRA adds `lora_kernel_a @ lora_kernel_b * alpha / rank` to
its kernel. For the 2-D kernels (attention output, MLP) that is one rank-`rank`
matrix, and the PEFT tensors are the transposed Keras ones. The query, key and
value kernels are `(heads, hidden, head_dim)`, and Keras gives each head its own
`lora_kernel_a[h]` while all heads share `lora_kernel_b`: in HF's `[heads *
head_dim, hidden]` layout that update has rank `heads * rank`. So q/k/v are
written with `lora_A` = the heads' A matrices stacked and `lora_B` = `lora_B`
repeated block-diagonally, at rank `heads * rank` and alpha `heads * alpha`
(`rank_pattern`/`alpha_pattern` in the config), which keeps PEFT's scale equal
to Keras' `alpha / rank`.

Example:

```python
keras_tune.apply_lora(causal_lm, rank=8, targets=("query", "value"), alpha=16)
# ... train ...
save_peft_adapter(causal_lm, "run/peft", base_model_name_or_path="google/gemma-3-1b-pt")
# In PyTorch: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(...), "run/peft")
```
"""

import json
import os
import re
from pathlib import Path

import numpy as np

from keras_tune import compat
from keras_tune.errors import UserError
from keras_tune.lora import apply_lora
from keras_tune.rundir import atomic_write

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Keras layer name -> (HF module under `layers.{i}.`, how the Keras kernel maps to HF's [out, in]).
# "heads_in": kernel (heads, hidden, head_dim), HF row = head * head_dim + d.
# "heads_out": kernel (heads, head_dim, hidden), HF column = head * head_dim + d.
# "dense": kernel (in, out), HF weight = kernel.T.
# Same as keras-hub's utils/transformers/export/gemma*.py and convert_gemma*.py.
HF_MODULES = {
    "query": ("self_attn.q_proj", "heads_in"),
    "key": ("self_attn.k_proj", "heads_in"),
    "value": ("self_attn.v_proj", "heads_in"),
    "attention_output": ("self_attn.o_proj", "heads_out"),
    "ffw_gating": ("mlp.gate_proj", "dense"),
    "ffw_gating_2": ("mlp.up_proj", "dense"),
    "ffw_linear": ("mlp.down_proj", "dense"),
    # Gemma 4's per-layer-input gate and projection (E2B, E4B), directly under the decoder layer.
    "per_layer_input_gate": ("per_layer_input_gate", "dense"),
    "per_layer_up_proj": ("per_layer_projection", "dense"),
}
# Gemma 2 is keras-hub's GemmaBackbone too; HF names its modules as Gemma 1 does.
SUPPORTED_BACKBONES = ("GemmaBackbone", "Gemma3Backbone", "Gemma4TextBackbone")
_KERAS_NAME = {module.split(".")[-1]: name for name, (module, _) in HF_MODULES.items()}


def _backbone(model):
    backbone = getattr(model, "backbone", model)
    kind = type(backbone).__name__
    if kind not in SUPPORTED_BACKBONES:
        raise UserError(
            f"PEFT adapter: model {kind} is not supported; expected one of {', '.join(SUPPORTED_BACKBONES)}"
        )
    return backbone


def _prefix(backbone):
    # HF's Gemma3ForConditionalGeneration nests the text model under
    # `model.language_model.`; the text-only causal LMs use `model.` (as
    # keras-hub's export_to_transformers writes them).
    if getattr(backbone, "vision_encoder", None) is not None:
        return "base_model.model.model.language_model.layers."
    return "base_model.model.model.layers."


def _target_layers(backbone):
    """{(block index, keras name): layer} for every adaptable layer of the decoder blocks."""
    found = {}
    for i in range(backbone.num_layers):
        for layer in compat.sublayers(backbone.get_layer(f"decoder_block_{i}")):
            if layer.name in HF_MODULES and hasattr(layer, "enable_lora"):
                found[(i, layer.name)] = layer
    return found


def _heads(layout, kernel_shape):
    return kernel_shape[0] if layout == "heads_in" else 1


def to_peft(lora_a, lora_b, layout):
    """Converts one Keras LoRA pair to PEFT's `(lora_A [r', in], lora_B [out, r'])`.

    Args:
        lora_a: Keras `lora_kernel_a`, shape `kernel.shape[:-1] + (rank,)`.
        lora_b: Keras `lora_kernel_b`, shape `(rank, kernel.shape[-1])`.
        layout: "heads_in", "heads_out" or "dense" (see `HF_MODULES`).

    Returns:
        Two float32 arrays; `r' = heads * rank` for "heads_in", else `rank`.
    """
    lora_a, lora_b = np.asarray(lora_a, "float32"), np.asarray(lora_b, "float32")
    if layout == "dense":
        return lora_a.T.copy(), lora_b.T.copy()
    if layout == "heads_out":
        heads, head_dim, rank = lora_a.shape
        return lora_a.reshape(heads * head_dim, rank).T.copy(), lora_b.T.copy()
    heads, hidden, rank = lora_a.shape
    stacked_a = np.ascontiguousarray(lora_a.transpose(0, 2, 1).reshape(heads * rank, hidden))
    # Head h's rows of the update use only head h's rows of A: one copy of B per head.
    return stacked_a, np.kron(np.eye(heads, dtype="float32"), lora_b.T)


def from_peft(peft_a, peft_b, layout, kernel_shape, rank, name="module"):
    """Inverts `to_peft`: PEFT's pair back to Keras `(lora_kernel_a, lora_kernel_b)`.

    Args:
        peft_a: `lora_A.weight`, [r', in].
        peft_b: `lora_B.weight`, [out, r'].
        layout: "heads_in", "heads_out" or "dense".
        kernel_shape: the Keras base kernel's shape.
        rank: the Keras rank (`r'` divided by the heads for "heads_in").
        name: the module, for error messages.

    Raises:
        UserError: shapes that do not fit the kernel, or a q/k/v update that
            Keras' per-head LoRA cannot express (not block-diagonal with one
            shared block).
    """
    peft_a, peft_b = np.asarray(peft_a, "float32"), np.asarray(peft_b, "float32")
    heads = _heads(layout, kernel_shape)
    if layout == "dense":
        expected_a, expected_b = (heads * rank, kernel_shape[0]), (kernel_shape[1], rank)
    elif layout == "heads_out":
        expected_a, expected_b = (rank, kernel_shape[0] * kernel_shape[1]), (kernel_shape[2], rank)
    else:
        expected_a, expected_b = (heads * rank, kernel_shape[1]), (heads * kernel_shape[2], heads * rank)
    if peft_a.shape != expected_a or peft_b.shape != expected_b:
        raise UserError(
            f"PEFT adapter {name}: lora_A {list(peft_a.shape)}, lora_B {list(peft_b.shape)}; "
            f"expected {list(expected_a)} and {list(expected_b)} for this model at rank {rank}"
        )
    if layout == "dense":
        return peft_a.T.copy(), peft_b.T.copy()
    if layout == "heads_out":
        return peft_a.T.reshape(kernel_shape[0], kernel_shape[1], rank).copy(), peft_b.T.copy()
    head_dim = kernel_shape[2]
    lora_a = peft_a.reshape(heads, rank, kernel_shape[1]).transpose(0, 2, 1).copy()
    blocks = peft_b.reshape(heads, head_dim, heads, rank)
    shared = blocks[0, :, 0, :]
    if not np.array_equal(peft_b, np.kron(np.eye(heads, dtype="float32"), shared)):
        raise UserError(
            f"PEFT adapter {name}: lora_B is not block-diagonal with one block shared by the {heads} heads; "
            "expected an adapter written by keras_tune.peft.save_peft_adapter"
        )
    return lora_a, shared.T.copy()


def _pattern_value(patterns, module, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): the first key that matches
    # the end of the module name, dot-separated, as a regex.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _number(value):
    return int(value) if float(value).is_integer() else float(value)


def _lora_setting(backbone):
    """`(layers, rank, alpha, names)` of the model's LoRA, refusing what PEFT's layout cannot hold."""
    layers = {key: layer for key, layer in _target_layers(backbone).items() if getattr(layer, "lora_enabled", False)}
    others = sorted(
        {layer.name for layer in compat.sublayers(backbone) if getattr(layer, "lora_enabled", False)}
        - {name for _, name in layers}
    )
    if others:
        raise UserError(
            f"PEFT adapter: LoRA on {','.join(others)} has no HF name; expected targets among {','.join(HF_MODULES)}"
        )
    if not layers:
        raise UserError("PEFT adapter: this model has no LoRA layers; expected --lora-rank > 0")
    settings = {(int(layer.lora_rank), float(layer.lora_alpha)) for layer in layers.values()}
    if len(settings) != 1:
        raise UserError(
            f"PEFT adapter: LoRA layers have different (rank, alpha) {sorted(settings)}; expected one setting"
        )
    (rank, alpha), = settings
    names = sorted({name for _, name in layers})
    # Gemma 4's key/value-sharing blocks have no key or value layers of their own.
    present = _target_layers(backbone)
    missing = sorted(f"{name}[{i}]" for (i, name) in present if name in names and (i, name) not in layers)
    if missing:
        raise UserError(
            f"PEFT adapter: no LoRA on {','.join(missing)}; expected every decoder block to have the same targets"
        )
    return layers, rank, alpha, names


def save_peft_adapter(causal_lm, directory, base_model_name_or_path=""):
    """Writes the model's LoRA weights as a Hugging Face PEFT adapter directory.

    Each file is written atomically; the directory is created if needed.

    Args:
        causal_lm: a keras-hub Gemma, Gemma 2 or Gemma 3 CausalLM (or Backbone)
            with LoRA enabled by `keras_tune.apply_lora`.
        directory: where `adapter_config.json` and `adapter_model.safetensors` go.
        base_model_name_or_path: the HF model id or path recorded for PEFT,
            e.g. "google/gemma-3-1b-pt".

    Returns:
        The adapter config dict that was written.
    """
    from safetensors.numpy import save_file

    backbone = _backbone(causal_lm)
    layers, rank, alpha, names = _lora_setting(backbone)
    prefix = _prefix(backbone)
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for (i, name), layer in sorted(layers.items()):
        module, layout = HF_MODULES[name]
        peft_a, peft_b = to_peft(layer.lora_kernel_a.numpy(), layer.lora_kernel_b.numpy(), layout)
        tensors[f"{prefix}{i}.{module}.lora_A.weight"] = peft_a
        tensors[f"{prefix}{i}.{module}.lora_B.weight"] = peft_b
        heads = _heads(layout, tuple(compat.base_kernel(layer).shape))
        if heads != 1:
            short = module.split(".")[-1]
            rank_pattern[short] = heads * rank
            alpha_pattern[short] = _number(heads * alpha)
    hf_names = [HF_MODULES[name][0].split(".")[-1] for name in names]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": _number(alpha),
        # A vision model's tower has q_proj etc. too; the regex keeps PEFT on the text layers.
        "target_modules": (
            rf".*language_model.*\.({'|'.join(hf_names)})" if "language_model" in prefix else hf_names
        ),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "init_lora_weights": True,
        "revision": None,
    }
    os.makedirs(directory, exist_ok=True)
    with atomic_write(Path(directory) / WEIGHTS_FILE) as partial:
        # safetensors 0.8's numpy save_file writes a non-contiguous view's buffer in
        # memory order, not index order: always hand it C-contiguous arrays.
        # PEFT's own files carry format "pt"; loaders check it.
        tensors = {key: np.ascontiguousarray(value) for key, value in tensors.items()}
        save_file(tensors, partial, metadata={"format": "pt"})
    with atomic_write(Path(directory) / CONFIG_FILE) as partial:
        Path(partial).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config


def read_peft_adapter(directory):
    """Reads a PEFT LoRA adapter directory.

    Args:
        directory: a folder holding `adapter_config.json` and `adapter_model.safetensors`.

    Returns:
        `(config, arrays)`: the config dict and {tensor name: numpy array}.

    Raises:
        UserError: a missing or unreadable file, or an adapter other than plain LoRA.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config_path, weights_path = Path(directory) / CONFIG_FILE, Path(directory) / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise UserError(f"PEFT adapter {directory}: no {path.name}; expected a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        arrays = load_file(str(weights_path))
    except (OSError, ValueError, SafetensorError) as error:
        raise UserError(
            f"PEFT adapter {directory}: unreadable ({type(error).__name__}); "
            f"expected {CONFIG_FILE} and {WEIGHTS_FILE} as PEFT writes them"
        )
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "LORA":
        raise UserError(f"PEFT adapter {directory}: peft_type {peft_type!r}; expected 'LORA'")
    return config, arrays


def _peft_pairs(backbone, arrays, directory):
    """{(block, keras name): {"A": lora_A, "B": lora_B}}, refusing unknown or incomplete tensors."""
    prefix = _prefix(backbone)
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.(?:(self_attn|mlp)\.)?(\w+)\.lora_([AB])\.weight$")
    pairs = {}
    for key, value in arrays.items():
        match = pattern.match(key)
        known = match and match.group(3) in _KERAS_NAME
        if not known or (match.group(2) or "") != HF_MODULES[_KERAS_NAME[match.group(3)]][0].rpartition(".")[0]:
            raise UserError(
                f"PEFT adapter {directory}: tensor {key}; "
                f"expected {prefix}<i>.self_attn|mlp.<q,k,v,o,gate,up,down>_proj.lora_A|B.weight"
            )
        pairs.setdefault((int(match.group(1)), _KERAS_NAME[match.group(3)]), {})[match.group(4)] = value
    if not pairs:
        raise UserError(f"PEFT adapter {directory}: no LoRA tensors; expected lora_A and lora_B weights")
    names = sorted({name for _, name in pairs})
    expected = {key for key in _target_layers(backbone) if key[1] in names}
    beyond = sorted(set(pairs) - expected)
    if beyond:
        raise UserError(
            f"PEFT adapter {directory}: tensors for block {beyond[0][0]}; expected blocks 0..{backbone.num_layers - 1} only"
        )
    incomplete = sorted((expected - set(pairs)) | {key for key, pair in pairs.items() if len(pair) != 2})
    if incomplete:
        raise UserError(
            f"PEFT adapter {directory}: block {incomplete[0][0]} {incomplete[0][1]} lacks lora_A or lora_B; "
            f"expected both for {','.join(names)} in all {backbone.num_layers} blocks"
        )
    return pairs


def _keras_pairs(backbone, pairs, config, directory):
    """Converts every PEFT pair to Keras `(lora_kernel_a, lora_kernel_b)` at rank `config["r"]`."""
    rank, alpha = config["r"], float(config.get("lora_alpha") or config["r"])
    prefix = _prefix(backbone)
    layers = _target_layers(backbone)
    keras_scale = alpha / rank
    converted = {}
    for (i, name), pair in sorted(pairs.items()):
        module, layout = HF_MODULES[name]
        layer = layers[(i, name)]
        shape = tuple(compat.base_kernel(layer).shape)
        short = module.split(".")[-1]
        hf_module = f"{prefix}{i}.{module}".removeprefix("base_model.model.")
        module_rank = int(_pattern_value(config.get("rank_pattern"), hf_module, rank))
        module_alpha = float(_pattern_value(config.get("alpha_pattern"), hf_module, alpha))
        heads = _heads(layout, shape)
        if module_rank % heads:
            raise UserError(
                f"PEFT adapter {directory}: {short} rank {module_rank}; expected a multiple of its {heads} heads"
            )
        lora_a, lora_b = from_peft(
            pair["A"], pair["B"], layout, shape, module_rank // heads, name=f"{prefix}{i}.{module}"
        )
        if lora_a.shape[-1] != rank:
            raise UserError(
                f"PEFT adapter {directory}: {short} rank {module_rank}; expected {heads} x r = {heads * rank}"
            )
        scale = module_alpha / (np.sqrt(module_rank) if config.get("use_rslora") else module_rank)
        if scale != keras_scale:
            lora_b = lora_b * np.float32(scale / keras_scale)  # Keras has one alpha/rank for all layers
        converted[(i, name)] = (lora_a, lora_b)
    return converted


def load_peft_adapter(causal_lm, directory):
    """Enables LoRA as a PEFT adapter says and loads its weights, all or nothing.

    Reads adapters written by `save_peft_adapter`, and PEFT-trained ones whose
    q/k/v updates fit Keras' per-head LoRA (in practice: o_proj and MLP targets).

    Args:
        causal_lm: a keras-hub Gemma, Gemma 2 or Gemma 3 CausalLM, without LoRA
            or with the same rank, alpha and targets.
        directory: the adapter directory.

    Returns:
        The adapter config dict.

    Raises:
        UserError: an adapter this model cannot take; nothing is changed then.
    """
    config, arrays = read_peft_adapter(directory)
    backbone = _backbone(causal_lm)
    for key, allowed in (("bias", ("none", None)), ("fan_in_fan_out", (False, None)), ("use_dora", (False, None))):
        if config.get(key) not in allowed:
            raise UserError(f"PEFT adapter {directory}: {key} {config.get(key)!r}; expected {allowed[0]!r}")
    if config.get("modules_to_save"):
        raise UserError(
            f"PEFT adapter {directory}: modules_to_save {config['modules_to_save']}; expected none (only LoRA weights load)"
        )
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise UserError(f"PEFT adapter {directory}: r {config.get('r')!r}; expected a positive integer")
    rank, alpha = config["r"], float(config.get("lora_alpha") or config["r"])
    pairs = _peft_pairs(backbone, arrays, directory)
    names = sorted({name for _, name in pairs})
    # Convert everything before touching the model, so a bad tensor changes nothing.
    converted = _keras_pairs(backbone, pairs, config, directory)
    layers = _target_layers(backbone)
    enabled = [layer for layer in compat.sublayers(backbone) if getattr(layer, "lora_enabled", False)]
    if not enabled:
        apply_lora(causal_lm, rank, tuple(names), alpha)
    else:
        mine = (int(enabled[0].lora_rank), float(enabled[0].lora_alpha), sorted({layer.name for layer in enabled}))
        if mine != (rank, alpha, names):
            raise UserError(
                f"PEFT adapter {directory}: rank, alpha, targets {(rank, alpha, names)} do not match "
                f"the model's {mine}; expected the same LoRA setting"
            )
    for key, (lora_a, lora_b) in converted.items():
        layers[key].lora_kernel_a.assign(lora_a)
        layers[key].lora_kernel_b.assign(lora_b)
    return config


# ---------------------------------------------------------------------------
# An adapter's updates without a model (what `keras_tune.merging` adds to full weights)

# Both layouts `_prefix` names (text-only causal LMs, Gemma 3's multimodal model); modules under self_attn or mlp,
# or directly under the layer (Gemma 4's per-layer inputs).
_ANY_TEXT_LAYER = re.compile(
    r"^base_model\.model\.(model\.(?:language_model\.)?layers\.(\d+)\.(?:(?:self_attn|mlp)\.)?(\w+))\.lora_([AB])\.weight$"
)


def read_peft_updates(directory):
    """A PEFT LoRA adapter's weight updates, read without a model.

    Unlike `load_peft_adapter`, every update PEFT can hold is read, including
    q/k/v updates Keras' per-head LoRA cannot express: a merge adds them to full
    weights (`keras_update_factors` puts them in the Keras kernel's layout).

    Args:
        directory: a PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`).

    Returns:
        `(config, updates)`: the adapter config and `{(block, Keras layer name):
        (lora_A [r, in], lora_B [out, r], scale)}`; the HF module's `[out, in]`
        weight changes by `scale * lora_B @ lora_A` (PEFT's `lora_alpha / r`,
        `rank_pattern`, `alpha_pattern` and `use_rslora` applied).

    Raises:
        UserError: an unreadable adapter, settings a plain LoRA update cannot
            honour (bias, DoRA, fan_in_fan_out, modules_to_save), an unknown
            tensor name, or a rank that differs from the config's.
    """
    config, arrays = read_peft_adapter(directory)
    for key, allowed in (("bias", ("none", None)), ("fan_in_fan_out", (False, None)), ("use_dora", (False, None))):
        if config.get(key) not in allowed:
            raise UserError(f"PEFT adapter {directory}: {key} {config.get(key)!r}; expected {allowed[0]!r}")
    if config.get("modules_to_save"):
        raise UserError(f"PEFT adapter {directory}: modules_to_save {config['modules_to_save']}; expected none")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise UserError(f"PEFT adapter {directory}: r {config.get('r')!r}; expected a positive integer")
    pairs = {}
    for key, value in arrays.items():
        match = _ANY_TEXT_LAYER.match(key)
        if not match or match.group(3) not in _KERAS_NAME:
            raise UserError(
                f"PEFT adapter {directory}: tensor {key}; "
                "expected base_model.model.model.layers.<i>.self_attn|mlp.<q,k,v,o,gate,up,down>_proj.lora_A|B.weight"
            )
        module, block, short, side = match.groups()
        pairs.setdefault((int(block), _KERAS_NAME[short], module), {})[side] = np.asarray(value, "float32")
    if not pairs:
        raise UserError(f"PEFT adapter {directory}: no LoRA tensors; expected lora_A and lora_B weights")
    updates = {}
    for (block, name, module), pair in sorted(pairs.items()):
        if len(pair) != 2:
            raise UserError(f"PEFT adapter {directory}: {module} lacks lora_A or lora_B; expected both")
        rank = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha") or config["r"]))
        if pair["A"].shape[0] != rank or pair["B"].shape[1] != rank:
            raise UserError(
                f"PEFT adapter {directory}: {module} lora_A {list(pair['A'].shape)}, lora_B {list(pair['B'].shape)}; "
                f"expected rank {rank} as adapter_config.json says"
            )
        scale = alpha / (np.sqrt(rank) if config.get("use_rslora") else rank)
        updates[(block, name)] = (pair["A"], pair["B"], float(scale))
    return config, updates


def keras_update_factors(peft_a, peft_b, layout, kernel_shape, name="module"):
    """Factors `(a, b)` whose `numpy.matmul(a, b)` is `lora_B @ lora_A` in the Keras kernel's layout.

    The low-rank product is never formed: the factors are reshaped the way
    keras-hub's Transformers importers reshape a full HF weight
    (`convert_gemma.py`, `convert_gemma3.py`). For "heads_in" both factors
    have a leading heads axis (`a` a broadcast view), so `matmul` pairs them
    head by head.

    Args:
        peft_a: `lora_A.weight`, [r, in].
        peft_b: `lora_B.weight`, [out, r].
        layout: "heads_in", "heads_out" or "dense" (see `HF_MODULES`).
        kernel_shape: the Keras kernel's shape.
        name: the module, for error messages.

    Raises:
        UserError: shapes that do not fit the kernel.
    """
    peft_a, peft_b = np.asarray(peft_a, "float32"), np.asarray(peft_b, "float32")
    rank = peft_a.shape[0]
    if layout == "dense":
        expected_a, expected_b = (rank, kernel_shape[0]), (kernel_shape[1], rank)
    elif layout == "heads_out":
        expected_a, expected_b = (rank, kernel_shape[0] * kernel_shape[1]), (kernel_shape[2], rank)
    else:
        expected_a, expected_b = (rank, kernel_shape[1]), (kernel_shape[0] * kernel_shape[2], rank)
    if peft_a.shape != expected_a or peft_b.shape != expected_b:
        raise UserError(
            f"PEFT adapter {name}: lora_A {list(peft_a.shape)}, lora_B {list(peft_b.shape)}; "
            f"expected {list(expected_a)} and {list(expected_b)} for a Keras kernel of shape {list(kernel_shape)}"
        )
    if layout == "dense":
        return peft_a.T, peft_b.T
    if layout == "heads_out":
        return peft_a.T.reshape(kernel_shape[0], kernel_shape[1], rank), peft_b.T
    heads, hidden, head_dim = kernel_shape
    return (np.broadcast_to(peft_a.T, (heads, hidden, rank)),
            peft_b.reshape(heads, head_dim, rank).transpose(0, 2, 1))
