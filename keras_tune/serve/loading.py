"""Putting a server together from a run config: checks first, then the model, adapters, engine and batcher.

Everything a user can get wrong (the slot count against the mesh, the context,
adapter names and files, a family that cannot be served) is refused before any
weights are loaded.

Example:

```python
config = keras_tune.load_config("gemma3_tiny")
service = build_service(config, ["fr=runs/fr/adapter.npz"], ServeLimits(slots=4, context=256))
app = keras_tune.serve.app.create_app(service)
```
"""

import dataclasses

from keras_tune.errors import UserError


@dataclasses.dataclass
class ServeLimits:
    """How much the server holds at once.

    Attributes:
        slots: sequences decoded together (a multiple of the mesh's batch axis).
        context: positions a sequence may take, prompt included.
        max_queue: sequences that may wait for a slot before requests get 429.
        warm_up: compile every step before serving (else on first use).
    """

    slots: int = 8
    context: int = 1024
    max_queue: int = 64
    warm_up: bool = True


def check_limits(config, limits):
    """Refuses slot counts and contexts the server cannot use, before anything is built.

    Args:
        config: a validated run config.
        limits: `ServeLimits`.
    """
    if limits.slots < 1:
        raise UserError(f"--slots {limits.slots}: expected at least 1")
    if limits.context < 2:
        raise UserError(f"--context {limits.context}: expected at least 2 tokens (a prompt token and an answer)")
    if limits.max_queue < 0:
        raise UserError(f"--max-queue {limits.max_queue}: expected 0 or more")
    mesh = config.distribution.mesh
    batch_axis = 1 if mesh == "auto" else int(mesh.split("x")[0])
    if limits.slots % batch_axis:
        raise UserError(f"--slots {limits.slots} with --mesh {mesh}: expected a multiple of the batch axis "
                        f"({batch_axis}), which splits the slots")


def check_address(host, port):
    """Refuses an address the server could not listen on, before the model is built.

    Args:
        host: the address to bind.
        port: the TCP port.
    """
    import socket

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: expected a TCP port, 0 to 65535")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({error.strerror}); expected a free "
                        "port on an address of this machine") from None


def check_servable(config):
    """Refuses a family the server cannot decode, from the model's shapes alone (no weights).

    Args:
        config: a validated run config.
    """
    from keras_tune.models import families
    from keras_tune.models.loader import abstract_model
    from keras_tune.serve.engine import cache_spec

    family = families.get(config.model.family)
    if cache_spec(family, abstract_model(config, lora=False), "float32") is None:
        raise UserError(f"preset {config.preset}: {family.title} models cannot be served (keras_tune.serve needs a "
                        "per-slot key/value cache); expected a Gemma, Gemma 2 or Gemma 3 preset")


def build_service(config, adapter_items, limits, log=None, devices=None):
    """The model (built once, sharded by the config's mesh), its adapters, the engine, batcher and service.

    Args:
        config: a validated run config without `model.adapter` (adapters come in `adapter_items`).
        adapter_items: `NAME=PATH` strings (`--adapter`), or None.
        limits: `ServeLimits`.
        log: where progress lines go (None: quiet).
        devices: the devices of the config's mesh (default: all).

    Returns:
        A `keras_tune.serve.app.Service` whose batcher starts with the application.
    """
    from keras_tune.decoding import stop_token_ids
    from keras_tune.models.loader import build_model
    from keras_tune.serve.adapters import attach_adapters, parse_adapter_specs, read_adapters
    from keras_tune.serve.app import Service
    from keras_tune.serve.batcher import Batcher
    from keras_tune.serve.engine import DecodeEngine

    log = log or (lambda line: None)
    if config.model.adapter:
        raise UserError("model.adapter is set; expected the server's adapters as --adapter NAME=PATH")
    check_limits(config, limits)
    read = read_adapters(parse_adapter_specs(adapter_items, config.preset), config.preset)
    check_servable(config)
    built = build_model(config, devices=devices)
    log(f"model {config.preset} loaded in {built.seconds:.1f}s")
    adapters = attach_adapters(built.causal_lm, config.preset, read)
    for name, path, metadata, _ in read:
        log(f"adapter {name}: {path} (rank {metadata['rank']}, targets {','.join(metadata['targets'])})")
    engine = DecodeEngine(built.causal_lm, adapters, limits.slots, limits.context)
    if limits.warm_up:
        engine.warm_up(log)
    tokenizer = built.causal_lm.preprocessor.tokenizer
    batcher = Batcher(engine, tokenizer.detokenize, limits.max_queue)
    return Service(batcher, adapters, tokenizer, limits.context, stop_token_ids(tokenizer, chat=False),
                   stop_token_ids(tokenizer, chat=True))
