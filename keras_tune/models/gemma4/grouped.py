"""Grouped matrix products: rows sorted by group, each group multiplied by its own matrix.

The experts of a mixture-of-experts layer see only the tokens routed to them.
With the `[tokens x top_k]` assignments sorted by expert, expert `e`'s rows are
one contiguous run of `sizes[e]` rows, and the layer's work is one product per
run: `rows[run_e] @ weights[e]` (a "grouped GEMM"). Nothing of shape
`[experts, tokens, ...]` exists.

On TPU and GPU, XLA has a ragged product (`jax.lax.ragged_dot`). Elsewhere
(the CPU) JAX lowers `ragged_dot` to a dense product over every group, masked,
so here the runs are padded to whole tiles of `tile` rows and a loop multiplies
one tile by its group's matrix at a time; its gradient is a loop of the same
kind (`_tiled_product`), never a dense tensor either.

Example:

```python
rows = jnp.ones((10, 4)); weights = jnp.ones((3, 4, 5))
grouped_matmul(rows, weights, jnp.array([6, 0, 4]))   # rows 0-5 by expert 0, rows 6-9 by expert 2
```
"""

import functools
import math

# Fewest and most rows a tile of the CPU loop holds.
MIN_TILE, MAX_TILE = 8, 256


def tile_rows(rows, groups):
    """Rows a tile of the CPU loop: about a quarter of an even group's share, a power of two in [8, 256].

    A group pads to whole tiles: about half a tile a group is wasted work, so a
    tile a quarter of a group's rows keeps that near 1/8 of the work, while
    larger tiles mean fewer, larger products.

    Args:
        rows: rows to multiply (tokens x top_k).
        groups: groups (experts).
    """
    share = max(1, rows // max(1, 4 * groups))
    return int(min(MAX_TILE, max(MIN_TILE, 2 ** int(math.log2(share)))))


def use_ragged_dot():
    """Whether `jax.lax.ragged_dot` computes only the given groups here (TPU, GPU) rather than all of them."""
    import jax

    return jax.default_backend() in ("tpu", "gpu")


def grouped_matmul(rows, weights, sizes, weights_trainable=True, tile=None):
    """`out[run_e] = rows[run_e] @ weights[e]` for the runs of `sizes` rows, in order; rows after the last run give 0.

    Args:
        rows: `[n, k]`, sorted by group.
        weights: `[groups, k, m]`.
        sizes: `[groups]` int32, rows of each group (their sum at most `n`).
        weights_trainable: the weights need a gradient (False for a frozen base: the loop skips it).
        tile: rows a tile of the CPU loop (default: `tile_rows`).

    Returns:
        `[n, m]` in the rows' dtype.
    """
    import jax
    import jax.numpy as jnp

    n = rows.shape[0]
    groups = weights.shape[0]
    if use_ragged_dot():
        out = jax.lax.ragged_dot(rows, weights.astype(rows.dtype), sizes.astype(jnp.int32))
        covered = jnp.arange(n) < jnp.sum(sizes)
        return jnp.where(covered[:, None], out, jnp.zeros((), out.dtype))
    tile = tile or tile_rows(n, groups)
    sizes = sizes.astype(jnp.int32)
    padded = -(-sizes // tile) * tile  # each run rounded up to whole tiles
    padded_ends = jnp.cumsum(padded)
    padded_starts = padded_ends - padded
    starts = jnp.cumsum(sizes) - sizes
    group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(n), side="right")  # each row's group
    inside = group < groups
    group = jnp.minimum(group, groups - 1)
    capacity = -(-(n + groups * (tile - 1)) // tile) * tile  # rows of the padded layout, at most
    destination = jnp.where(inside, padded_starts[group] + jnp.arange(n) - starts[group], capacity)
    # Scatter-add and gather (not set and select): linear in the rows, their gradients keep only the indices.
    laid_out = jnp.zeros((capacity, rows.shape[1]), rows.dtype).at[destination].add(rows, mode="drop")
    tile_group = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(capacity // tile) * tile, side="right"),
                             groups - 1).astype(jnp.int32)
    active = (padded_ends[-1] // tile).astype(jnp.int32)
    product = _tiled_product(tile, bool(weights_trainable))
    out = product(laid_out, weights.astype(rows.dtype), tile_group, active)
    return out.at[destination].get(mode="fill", fill_value=0)  # rows outside every group: 0


def _varying(*values):
    """The manual mesh axes (inside `jax.shard_map`) that any of `values` varies over."""
    import jax

    axes = set()
    for value in values:
        manual = getattr(jax.typeof(value), "manual_axis_type", None)
        axes |= set(getattr(manual, "varying", ()) or ())
    return tuple(sorted(axes))


def _varying_as(value, axes):
    """`value` marked as varying over `axes` too (a loop's carry must vary as its body's result does)."""
    import jax

    missing = tuple(axis for axis in axes if axis not in _varying(value))
    return jax.lax.pcast(value, missing, to="varying") if missing else value


def stable_order(keys):
    """`argsort(keys)`, stable, marked varying over the mesh axes the keys vary over.

    Inside `jax.shard_map`, JAX 0.10's `argsort` of device-varying keys returns
    an index typed as the same on every device, so a gather by it is not
    summed over the devices in the backward pass (wrong gradients); sorting
    the keys with an index marked as they are keeps the type right.

    Args:
        keys: a 1-D integer array.
    """
    import jax
    import jax.numpy as jnp

    index = _varying_as(jnp.arange(keys.shape[0], dtype=jnp.int32), _varying(keys))
    return jax.lax.sort((keys, index), num_keys=1, is_stable=True)[1]


def _like_primal(cotangent, primal):
    """A cotangent summed over the mesh axes it varies over and its primal does not (a replicated input's gradient)."""
    import jax

    extra = tuple(axis for axis in _varying(cotangent) if axis not in _varying(primal))
    return jax.lax.psum(cotangent, extra) if extra else cotangent


@functools.lru_cache(maxsize=None)
def _tiled_product(tile, weights_trainable):
    """`(laid_out [c, k], weights [g, k, m], tile_group [c / tile], active) -> [c, m]`, a tile at a time, with its gradient.

    Tiles from `active` on are not computed (left 0). The backward pass is the
    same loop: a tile's input gradient against its group's matrix, and (when
    `weights_trainable`) the group's weight gradient accumulated in place.
    """
    import jax
    import jax.numpy as jnp

    def tile_of(array, t):
        return jax.lax.dynamic_slice_in_dim(array, t * tile, tile, axis=0)

    def forward_loop(laid_out, weights, tile_group, active):
        def body(t, out):
            product = tile_of(laid_out, t) @ weights[tile_group[t]]
            return jax.lax.dynamic_update_slice_in_dim(out, product.astype(out.dtype), t * tile, axis=0)

        out = jnp.zeros((laid_out.shape[0], weights.shape[2]), laid_out.dtype)
        out = _varying_as(out, _varying(laid_out, weights, tile_group, active))
        return jax.lax.fori_loop(0, active, body, out)

    @jax.custom_vjp
    def product(laid_out, weights, tile_group, active):
        return forward_loop(laid_out, weights, tile_group, active)

    def forward(laid_out, weights, tile_group, active):
        # Frozen weights need no rows in the backward pass: keep an empty slice (their type) only.
        kept = laid_out if weights_trainable else laid_out[:0]
        return forward_loop(laid_out, weights, tile_group, active), (kept, weights, tile_group, active)

    def backward(residuals, d_out):
        laid_out, weights, tile_group, active = residuals

        def body(t, carry):
            d_rows, d_weights = carry
            group, d_tile = tile_group[t], tile_of(d_out, t)
            d_in = d_tile @ weights[group].T
            d_rows = jax.lax.dynamic_update_slice_in_dim(d_rows, d_in.astype(d_rows.dtype), t * tile, axis=0)
            if weights_trainable:
                grad = (tile_of(laid_out, t).T @ d_tile).astype(d_weights.dtype)
                d_weights = d_weights.at[group].add(grad)
            return d_rows, d_weights

        axes = _varying(laid_out, weights, tile_group, active, d_out)
        d_rows = _varying_as(jnp.zeros((d_out.shape[0], laid_out.shape[1]), laid_out.dtype), axes)
        d_weights = _varying_as(jnp.zeros(weights.shape, jnp.float32), axes) if weights_trainable else None
        d_rows, d_weights = jax.lax.fori_loop(0, active, body, (d_rows, d_weights))
        d_rows = _like_primal(d_rows, laid_out)
        if not weights_trainable:
            return d_rows, jnp.zeros_like(weights), None, None
        return d_rows, _like_primal(d_weights, weights).astype(weights.dtype), None, None

    product.defvjp(forward, backward)
    return product
