"""Gemma 4's mixture of experts, computing only the experts each token is routed to.

keras-hub's `Gemma4MoEBlock` runs every token through every expert (an
`[experts, tokens, intermediate]` tensor, 16 times the active work of the
26B-A4B) and zeroes what the router did not pick. Here the router picks each
token's top-k experts, the `[tokens x k]` assignments are sorted by expert, and
each expert multiplies only its own rows (`keras_tune.models.gemma4.grouped`);
the outputs are weighted and summed back per token. The weights, their names
and shapes are keras-hub's (`gate_proj`, `up_proj` `[E, H, I]`, `down_proj`
`[E, I, H]`, `per_expert_scale` `[E]`; the router's `proj` and
`per_dim_scale`), so keras-hub presets and Transformers checkpoints load as they are.

Under a mesh, each device dispatches its own tokens (the batch axis) to the
experts it holds: expert weights split over an axis (`experts`, or `model`)
are never gathered, a split of the intermediate width is summed after the down
projection (`jax.shard_map`, one `psum`): expert parallelism without an
all-to-all, since every device of an expert axis sees the same tokens.

`SparseExperts.enable_lora` adds per-expert low-rank factors to the three
expert matrices (LoRA target `moe_expert_bank`). Under `--quantize` the bank
stays in floating point (Keras quantizes 2-D kernels), and so does the router
(`FloatDense`): rounding it could send a token to other experts.

Example:

```python
router, experts = TopKRouter(num_experts=8, num_experts_per_token=2), SparseExperts(8, 64, 32)
indices, weights, probabilities = router(hidden)          # [T, k], [T, k], [T, E]
out = experts(normed_hidden, indices, weights)            # [T, H]
```
"""

import dataclasses

import keras
from keras import ops

from keras_tune import compat

# Names of the expert matrices, in keras-hub's order, with their LoRA factors' roles.
EXPERT_MATRICES = ("gate_proj", "up_proj", "down_proj")


@keras.saving.register_keras_serializable(package="keras_tune")
class FloatDense(keras.layers.Dense):
    """A `Dense` that stays in floating point when the model is quantized (the router's projection)."""

    def quantize(self, mode=None, type_check=True, config=None):
        """Leaves the layer as it is: a router rounded to int8 may pick other experts."""


@keras.saving.register_keras_serializable(package="keras_tune")
class TopKRouter(keras.layers.Layer):
    """Gemma 4's router: RMS-normalized input (no learned scale) times `per_dim_scale / sqrt(H)`, a projection to the experts, softmax, top-k, renormalized.

    The same weights as keras-hub's `Gemma4Router` (`proj`, `per_dim_scale`);
    it returns the top-k experts and weights themselves instead of a dense
    `[tokens, experts]` dispatch matrix, and the probabilities for the
    load-balancing loss.

    Args:
        num_experts: experts in the bank.
        num_experts_per_token: k.
        layer_norm_epsilon: the RMS norm's epsilon.
    """

    def __init__(self, num_experts, num_experts_per_token, layer_norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.num_experts_per_token = num_experts_per_token
        self.layer_norm_epsilon = layer_norm_epsilon
        self.proj = FloatDense(num_experts, use_bias=False, dtype=self.dtype_policy, name="proj")

    def build(self, input_shape):
        hidden = input_shape[-1]
        self.proj.build((None, hidden))
        self.per_dim_scale = self.add_weight(name="per_dim_scale", shape=(hidden,), initializer="ones",
                                             dtype=self.variable_dtype)
        self.built = True

    def call(self, x):
        """`(indices [T, k] int32, weights [T, k], probabilities [T, E] float32)` of `x` `[..., H]`."""
        hidden = ops.shape(x)[-1]
        flat = ops.cast(ops.reshape(x, (-1, hidden)), "float32")
        normed = flat * ops.power(ops.mean(ops.square(flat), axis=-1, keepdims=True) + self.layer_norm_epsilon, -0.5)
        normed = ops.cast(normed, self.compute_dtype) * ops.cast(float(hidden) ** -0.5, self.compute_dtype)
        normed = normed * ops.cast(self.per_dim_scale, self.compute_dtype)
        probabilities = ops.softmax(ops.cast(self.proj(normed), "float32"), axis=-1)
        # keras-hub and Transformers pick among the probabilities in the compute dtype.
        picked_from = ops.cast(probabilities, x.dtype)
        _, indices = ops.top_k(picked_from, k=self.num_experts_per_token)
        weights = ops.take_along_axis(picked_from, indices, axis=-1)
        weights = weights / ops.maximum(ops.sum(weights, axis=-1, keepdims=True), ops.cast(1e-9, weights.dtype))
        return ops.cast(indices, "int32"), weights, probabilities

    def compute_output_spec(self, x):
        tokens = None if None in x.shape[:-1] else int(ops.prod(x.shape[:-1]))
        return (keras.KerasTensor((tokens, self.num_experts_per_token), dtype="int32"),
                keras.KerasTensor((tokens, self.num_experts_per_token), dtype=x.dtype),
                keras.KerasTensor((tokens, self.num_experts), dtype="float32"))

    def get_config(self):
        config = super().get_config()
        config.update(num_experts=self.num_experts, num_experts_per_token=self.num_experts_per_token,
                      layer_norm_epsilon=self.layer_norm_epsilon)
        return config


def routing_statistics(probabilities, indices, token_mask, num_experts):
    """`[E + 1]` float32: each expert's share of the top-k assignments, then the load-balancing loss.

    The loss is Switch Transformer's `E * sum_e f_e * P_e` (`f_e` the share of
    assignments, `P_e` the mean router probability), 1 when the load is even;
    padding positions count in neither.

    Args:
        probabilities: `[T, E]` float32 router probabilities.
        indices: `[T, k]` chosen experts.
        token_mask: `[T]`, 1 for real tokens.
        num_experts: E.
    """
    mask = ops.cast(token_mask, "float32")
    tokens = ops.maximum(ops.sum(mask), 1.0)
    picked = ops.sum(ops.one_hot(indices, num_experts, dtype="float32") * mask[:, None, None], axis=(0, 1))
    share = picked / (tokens * ops.cast(ops.shape(indices)[1], "float32"))
    mean_probability = ops.sum(probabilities * mask[:, None], axis=0) / tokens
    loss = ops.cast(num_experts, "float32") * ops.sum(share * mean_probability)
    return ops.concatenate([share, loss[None]], axis=0)


@keras.saving.register_keras_serializable(package="keras_tune")
class SparseExperts(keras.layers.Layer):
    """Gemma 4's bank of gated-GELU experts, each applied to the tokens routed to it only.

    `expert(x) = down(gelu_tanh(x @ gate) * (x @ up)) * per_expert_scale`, and
    a token's output is its k experts' outputs weighted by the router. The
    weights are keras-hub's `Gemma4MoEBlock`'s.

    Args:
        num_experts: E.
        hidden_dim: H.
        expert_intermediate_dim: I.
    """

    def __init__(self, num_experts, hidden_dim, expert_intermediate_dim, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.expert_intermediate_dim = expert_intermediate_dim
        self.lora_enabled = False
        self.lora_rank = 0
        self.lora_alpha = 0.0

    def build(self, _):
        experts, hidden, inner = self.num_experts, self.hidden_dim, self.expert_intermediate_dim
        for name, shape in (("gate_proj", (experts, hidden, inner)), ("up_proj", (experts, hidden, inner)),
                            ("down_proj", (experts, inner, hidden))):
            setattr(self, name, self.add_weight(name=name, shape=shape, initializer="glorot_uniform",
                                                dtype=self.variable_dtype))
        self.per_expert_scale = self.add_weight(name="per_expert_scale", shape=(experts,), initializer="ones",
                                                dtype=self.variable_dtype)
        self.built = True

    # -- LoRA ---------------------------------------------------------------

    def enable_lora(self, rank, lora_alpha=None, a_initializer="he_uniform", b_initializer="zeros"):
        """Adds per-expert factors `A_e [in, rank]`, `B_e [rank, out]` to each expert matrix; freezes the bank.

        The update of expert `e`'s matrix is `(lora_alpha / rank) A_e B_e`, as
        Keras' own LoRA scales it.

        Args:
            rank: the factors' rank.
            lora_alpha: the scale's numerator (default: `rank`).
            a_initializer: initializer of the A factors.
            b_initializer: initializer of the B factors (zeros: the update starts at 0).
        """
        if self.lora_enabled:
            raise ValueError("LoRA is already enabled on this layer")
        factors = []
        with compat.adding_variables(self):
            for name in EXPERT_MATRICES:
                base = getattr(self, name)
                inputs, outputs = base.shape[1], base.shape[2]
                factors.append(self.add_weight(name=f"{name}_lora_a", shape=(self.num_experts, inputs, rank),
                                               initializer=a_initializer, dtype=self.variable_dtype))
                factors.append(self.add_weight(name=f"{name}_lora_b", shape=(self.num_experts, rank, outputs),
                                               initializer=b_initializer, dtype=self.variable_dtype))
        object.__setattr__(self, "lora_variables", factors)  # tracked already, by add_weight
        for variable in self._base_variables():
            variable.trainable = False
        self.lora_enabled, self.lora_rank, self.lora_alpha = True, int(rank), float(lora_alpha or rank)

    def _base_variables(self):
        return [getattr(self, name) for name in (*EXPERT_MATRICES, "per_expert_scale")]

    def lora_factors(self, name):
        """`(A, B)` of an expert matrix, or None without LoRA."""
        if not self.lora_enabled:
            return None
        index = EXPERT_MATRICES.index(name)
        return self.lora_variables[2 * index], self.lora_variables[2 * index + 1]

    def merged_matrix(self, name):
        """An expert matrix with its LoRA update added (float): what `merge_lora` stores and exports write."""
        import numpy as np

        matrix = np.asarray(ops.convert_to_numpy(getattr(self, name)), np.float32)
        factors = self.lora_factors(name)
        if factors:
            a, b = (np.asarray(ops.convert_to_numpy(f), np.float32) for f in factors)
            matrix = matrix + (self.lora_alpha / self.lora_rank) * np.einsum("eir,ero->eio", a, b)
        return matrix

    def merge_lora(self):
        """Folds the LoRA factors into the expert matrices (float banks) and zeroes the B factors."""
        if not self.lora_enabled:
            return
        for name in EXPERT_MATRICES:
            getattr(self, name).assign(self.merged_matrix(name))
            b = self.lora_factors(name)[1]
            b.assign(ops.zeros(b.shape, b.dtype))

    # -- saving -------------------------------------------------------------

    def save_own_variables(self, store):
        """Writes keras-hub's four variables: gate, up and down (LoRA folded in) and the per-expert scale.

        As Keras' `Dense` writes its kernel with the LoRA update added: a saved
        bank (a merged preset) is keras-hub's `Gemma4MoEBlock`'s, with no factors.
        """
        for index, name in enumerate(EXPERT_MATRICES):
            variable = getattr(self, name)
            store[str(index)] = ops.cast(self.merged_matrix(name), variable.dtype) if self.lora_enabled else variable
        store[str(len(EXPERT_MATRICES))] = self.per_expert_scale

    def load_own_variables(self, store):
        """Reads the four variables `save_own_variables` writes; with LoRA enabled, its B factors restart at 0.

        Args:
            store: Keras' weights store of this layer.
        """
        base = self._base_variables()
        if len(store.keys()) != len(base):
            raise ValueError(f"Layer {self.name!r} expected {len(base)} variables (gate_proj, up_proj, down_proj, "
                             f"per_expert_scale), but received {len(store.keys())}")
        for index, variable in enumerate(base):
            variable.assign(store[str(index)])
        if self.lora_enabled:  # the saved matrices hold the update already
            for name in EXPERT_MATRICES:
                b = self.lora_factors(name)[1]
                b.assign(ops.zeros(b.shape, b.dtype))

    # -- the computation ----------------------------------------------------

    def call(self, x, indices, weights):
        """`[T, H]`: each token's k experts' outputs, weighted by `weights`.

        Args:
            x: `[T, H]` normalized hidden states.
            indices: `[T, k]` int32 experts.
            weights: `[T, k]` router weights.
        """
        import jax

        operands, specs = self._operands()
        partition = _expert_partition(self.gate_proj)
        setting = ExpertSetting(trainable=tuple(v.trainable for v in self._matrix_variables()),
                                lora_scale=(self.lora_alpha / self.lora_rank) if self.lora_enabled else 0.0)
        if partition is None:
            return expert_outputs(x, indices, weights, operands, setting)
        mesh, batch_axis, expert_axis, inner_axis = partition
        summed = tuple(axis for axis in dict.fromkeys((expert_axis, inner_axis)) if axis)
        local = dataclasses.replace(setting, expert_axis=expert_axis, summed_axes=summed)
        spec = jax.sharding.PartitionSpec
        token_spec = spec(batch_axis, None)
        operand_specs = [spec(*(expert_axis if s == "E" else inner_axis if s == "I" else None for s in shape))
                         for shape in specs]
        sharded = jax.shard_map(lambda x, i, w, *tensors: expert_outputs(x, i, w, list(tensors), local), mesh=mesh,
                                in_specs=(token_spec, token_spec, token_spec, *operand_specs), out_specs=token_spec)
        # Under jit, XLA lays the inputs out as the specs say (an eager call would insist they already are).
        return jax.jit(sharded)(x, indices, weights, *operands)

    def _matrix_variables(self):
        return [getattr(self, name) for name in EXPERT_MATRICES]

    def _operands(self):
        """The tensors the computation reads, and each one's axes ("E" experts, "I" intermediate, "-" other)."""
        operands = [getattr(self, n) for n in EXPERT_MATRICES] + [self.per_expert_scale]
        specs = ["E-I", "E-I", "EI-", "E"]
        if self.lora_enabled:
            operands += list(self.lora_variables)
            specs += ["E--", "E-I", "E--", "E-I", "EI-", "E--"]
        return [ops.convert_to_tensor(v) for v in operands], specs

    def compute_output_spec(self, x, indices, weights):
        return keras.KerasTensor(x.shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(num_experts=self.num_experts, hidden_dim=self.hidden_dim,
                      expert_intermediate_dim=self.expert_intermediate_dim)
        return config


def _expert_partition(variable):
    """`(jax mesh, batch axis, expert axis, intermediate axis)` for sharded experts under the active distribution, or None.

    An axis is kept only where it splits the bank and is not the batch axis
    (a bank split over the batch axis is gathered, as FSDP does).
    """
    import math

    distribution = keras.distribution.distribution()
    mesh = getattr(distribution, "device_mesh", None)
    if mesh is None or math.prod(mesh.shape) == 1:
        return None
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    batch_axis = getattr(distribution, "batch_dim_name", None)
    axes = distribution.get_variable_layout(variable).axes or (None, None, None)

    def kept(axis):
        return axis if axis and axis != batch_axis and sizes.get(axis, 1) > 1 else None

    batch = batch_axis if sizes.get(batch_axis, 1) > 1 else None
    return mesh.backend_mesh, batch, kept(axes[0]), kept(axes[2])


@dataclasses.dataclass(frozen=True)
class ExpertSetting:
    """How `expert_outputs` computes: what is trained, the LoRA scale and, inside `shard_map`, the mesh axes.

    Attributes:
        trainable: whether gate, up and down need weight gradients.
        lora_scale: alpha / rank of the LoRA factors (0: none).
        expert_axis: the mesh axis the experts are split over (None: all here).
        summed_axes: mesh axes to sum the partial outputs over.
    """

    trainable: tuple = (True, True, True)
    lora_scale: float = 0.0
    expert_axis: str = None
    summed_axes: tuple = ()


def expert_outputs(x, indices, weights, operands, setting):
    """The weighted sum of each token's experts, over the experts in `operands` (a device's share under a mesh).

    Args:
        x: `[T, H]`.
        indices: `[T, k]` global expert ids.
        weights: `[T, k]` router weights.
        operands: `SparseExperts._operands()`'s tensors (local shards inside `shard_map`).
        setting: an `ExpertSetting`.
    """
    import jax
    import jax.numpy as jnp

    from keras_tune.models.gemma4.grouped import grouped_matmul, stable_order

    gate, up, down, scale = operands[:4]
    factors = operands[4:]
    local_experts = gate.shape[0]
    expert_axis, summed_axes, trainable = setting.expert_axis, setting.summed_axes, setting.trainable
    offset = jax.lax.axis_index(expert_axis) * local_experts if expert_axis else 0
    tokens, k = indices.shape
    flat = indices.reshape(-1) - offset
    mine = (flat >= 0) & (flat < local_experts)
    key = jnp.where(mine, flat, local_experts)  # others sort last, outside every group
    order = stable_order(key)
    sizes = jnp.bincount(key, length=local_experts + 1)[:local_experts]
    owner = order // k
    rows = x[owner]
    dtype = x.dtype

    def product(inputs, index, matrix):
        out = grouped_matmul(inputs, matrix, sizes, weights_trainable=trainable[index])
        if factors:
            a, b = factors[2 * index], factors[2 * index + 1]
            low = grouped_matmul(inputs, a.astype(dtype), sizes)
            out = out + grouped_matmul(low, b.astype(dtype), sizes) * jnp.asarray(setting.lora_scale, dtype)
        return out

    gated = product(rows, 0, gate)
    hidden = jax.nn.gelu(gated.astype(jnp.float32), approximate=True).astype(dtype) * product(rows, 1, up)
    out = product(hidden, 2, down)
    expert_scale = jnp.take(scale, jnp.minimum(key[order], local_experts - 1)).astype(dtype)
    # Assignments to other devices' experts are rows outside every group (0 already); their weight is 0 too.
    combine = weights.reshape(-1)[order].astype(dtype) * expert_scale * mine[order].astype(dtype)
    out = out * combine[:, None]
    result = jnp.zeros((tokens, x.shape[1]), dtype).at[owner].add(out)
    if summed_axes:
        result = jax.lax.psum(result, summed_axes)
    return result
