"""The device table: peak FLOP/s and memory of one JAX device, by its `device_kind`.

One row a device family, first match wins. The planner reads the memory
(`known_device_memory`), the MFU estimate the peak (`peak_tflops_per_device`).
A TPU v2/v3 device is one core (half a chip); v4 and later expose one device a
chip. Peaks are dense bfloat16 (float16 where a device has no bfloat16 units).

Example:

```python
from keras_tune.memory import devices
devices.peak_tflops_per_device("TPU v5 lite")        # 197.0
devices.known_device_memory("NVIDIA H100 80GB HBM3")  # 80 GiB in bytes
```
"""

import re

from keras_tune.errors import UserError

GIB = 1024**3


# (pattern on device_kind, peak dense TFLOP/s, memory GiB; None where unknown)
DEVICES = (
    (r"TPU v2", 22.5, 8),
    (r"TPU v3", 61.5, 16),
    (r"TPU v4", 275.0, 32),
    (r"TPU v5 ?(lite|e)", 197.0, 16),
    (r"TPU v5", 459.0, 95),  # v5p
    (r"TPU v6", 918.0, 32),  # v6e (Trillium)
    (r"H100.*PCIe", 756.0, 80),
    (r"H200", 989.0, 141),
    (r"H100|GH200", 989.0, 80),
    (r"A100.*80", 312.0, 80),
    (r"A100", 312.0, 40),
    (r"L40S", 362.0, 48),
    (r"\bL4\b", 121.0, 24),
    (r"\bT4\b", 65.0, 16),  # float16: a T4 has no bfloat16 units
    (r"V100", 125.0, None),  # float16
)

_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


def _row(device_kind):
    for pattern, tflops, gib in DEVICES:
        if re.search(pattern, device_kind or "", flags=re.IGNORECASE):
            return tflops, gib
    return 0.0, None


def peak_tflops_per_device(device_kind):
    """Dense bf16 peak TFLOP/s of a device from its `device_kind`, or 0.0 if unknown.

    Args:
        device_kind: `jax.devices()[0].device_kind`, e.g. "TPU v4" or "NVIDIA H100 80GB HBM3".
    """
    return _row(device_kind)[0]


def known_device_memory(device_kind):
    """Bytes of memory of one device from the table, or None if the kind is unknown.

    Args:
        device_kind: `jax.devices()[0].device_kind`, e.g. "TPU v5 lite" or "NVIDIA H100 80GB HBM3".
    """
    gib = _row(device_kind)[1]
    return None if gib is None else gib * GIB


def parse_memory_size(text, flag="--device-memory"):
    """Bytes in a size such as "16GiB", "80GB", "24 G" or "1.5TiB".

    GB/MB are decimal (10^9), GiB/MiB and a bare G/M binary (2^30).

    Args:
        text: the size as the user wrote it.
        flag: the flag named in the error message.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise UserError(
            f"{flag} '{text}': expected a size with a unit such as 16GiB, 80GB or 24G (GiB/G binary, GB decimal)"
        )
    size = float(match.group(1)) * _UNITS[unit]
    if size < 2**20:
        raise UserError(f"{flag} '{text}': expected at least 1MiB of device memory, e.g. 16GiB")
    return int(size)


def _jax_device(device):
    # A keras mesh holds "platform:id" strings; memory_stats needs the JAX device.
    if not isinstance(device, str):
        return device
    import jax

    platform, _, index = device.partition(":")
    try:
        return next(d for d in jax.devices(platform) if str(d.id) == index)
    except (RuntimeError, StopIteration):  # no such backend here: keep the name
        return device


def device_memory(config, devices=None):
    """Memory of one device and where the figure comes from.

    In order: `train.device_memory`; the device's own `memory_stats()`
    "bytes_limit" (what JAX may use); the table of known devices. CPU devices
    have no figure.

    Args:
        config: the run config.
        devices: the mesh's devices (default: none looked at).

    Returns:
        `(bytes or None, source)`, the source a few words for the report.
    """
    if config.train.device_memory:
        return parse_memory_size(config.train.device_memory), f"--device-memory {config.train.device_memory}"
    if not devices:
        return None, "unknown (no devices; pass --device-memory 16GiB)"
    device = _jax_device(devices[0])
    kind = getattr(device, "device_kind", str(device))
    if getattr(device, "platform", str(device).split(":")[0]) == "cpu":
        return None, f"unknown for CPU devices ({kind}); pass --device-memory 16GiB to plan for an accelerator"
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # some backends do not implement memory_stats
        limit = None
    if limit:
        return int(limit), f"{kind} (memory_stats bytes_limit)"
    known = known_device_memory(kind)
    if known:
        return known, f"{kind} (device table)"
    return None, f"unknown for '{kind}'; pass --device-memory"
