"""The OpenAI-compatible server, driven by the official `openai` client.

A tiny Gemma 3 with two adapters (different ranks and targets) is served
in-process on a 2x4 mesh (4 slots split over the batch axis, weights over the
model axis) and compared with the same models outside the server:
greedy answers equal keras-hub's `generate` (through
`keras_tune.decoding.generate_texts`), `echo` log-probabilities sum to
`keras_tune.scoring.evaluate_texts`' NLL, concurrent clients (more than the
slots, mixing adapters) each get what they would alone. The command-line
server (a subprocess) answers 429 on a full queue, frees a slot when a client
goes away, and drains on SIGTERM with exit code 0.
"""

import json
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from helpers import REPO, free_port, random_adapter, serve_in_thread, subprocess_env, wait_until

PRESET = "gemma3_tiny"
MESH = "2x4"
CONTEXT = 96
SLOTS = 4
PROMPTS = ["the model learns", "a tiny corpus and every step makes the loss go", "while the data", "small words"]


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return {
        "a": random_adapter(PRESET, folder / "a.npz", seed=1, rank=4, targets=("query", "value")),
        "b": random_adapter(PRESET, folder / "b.npz", seed=2, rank=2, targets=("query", "key", "ffw_linear")),
    }


def _config(adapter=None):
    from keras_tune import config as config_lib

    overrides = {"distribution.mesh": MESH}
    if adapter:
        overrides["model.adapter"] = adapter
    return config_lib.load_config(PRESET, overrides=overrides)


@pytest.fixture(scope="module")
def references(adapter_paths):
    """The same models outside the server: the base and each adapter loaded the usual way."""
    from keras_tune.models.loader import build_model

    found = {PRESET: build_model(_config()).causal_lm}
    for name, path in adapter_paths.items():
        found[name] = build_model(_config(path)).causal_lm
    for causal_lm in found.values():
        causal_lm.compile(sampler="greedy")
    return found


@pytest.fixture(scope="module")
def served(adapter_paths):
    """`(openai client, base url, service)` of the in-process server."""
    import openai

    from keras_tune.serve.app import create_app
    from keras_tune.serve.loading import ServeLimits, build_service

    items = [f"{name}={path}" for name, path in adapter_paths.items()]
    service = build_service(_config(), items, ServeLimits(slots=SLOTS, context=CONTEXT, max_queue=16))
    port = free_port()
    stop = serve_in_thread(create_app(service), port)
    url = f"http://127.0.0.1:{port}"
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120), url, service
    stop()


def _generate(causal_lm, prompts, max_length, chat=False):
    """keras-hub's greedy answers; a chat answer's `<end_of_turn>` (kept by keras-hub, not a special token) dropped."""
    from keras_tune.decoding import generate_texts

    texts = generate_texts(causal_lm, causal_lm.preprocessor, prompts, max_length, chat=chat)
    return [text.removesuffix("<end_of_turn>") if chat else text for text in texts]


def _prompt_tokens(causal_lm, text):
    return 1 + int(np.asarray(causal_lm.preprocessor.tokenizer(text)).size)


def test_models_lists_the_base_and_each_adapter(served):
    client, _, _ = served
    assert [m.id for m in client.models.list().data] == [PRESET, "a", "b"]
    assert client.models.retrieve("a").id == "a"


@pytest.mark.parametrize("model", [PRESET, "a", "b"])
def test_greedy_completion_equals_generate(served, references, model):
    client, _, _ = served
    prompt, max_length = PROMPTS[1], 60  # past the sliding window (32): the window's mask is exercised
    expected = _generate(references[model], [prompt], max_length)[0]
    answer = client.completions.create(model=model, prompt=prompt, temperature=0,
                                       max_tokens=max_length - _prompt_tokens(references[model], prompt))
    assert answer.choices[0].text == expected
    assert answer.usage.prompt_tokens == _prompt_tokens(references[model], prompt)
    assert answer.usage.completion_tokens == answer.usage.total_tokens - answer.usage.prompt_tokens > 0


def test_two_adapters_answer_differently(served):
    client, _, _ = served
    texts = {model: client.completions.create(model=model, prompt=PROMPTS[0], temperature=0, max_tokens=12).choices[0].text
             for model in (PRESET, "a", "b")}
    assert len(set(texts.values())) == 3, texts


def test_chat_folds_the_system_message_into_the_first_user_turn(served, references):
    client, _, _ = served
    expected = _generate(references["a"], ["Be brief.\n\nwhile the data"], 64, chat=True)[0]
    answer = client.chat.completions.create(
        model="a", temperature=0, max_tokens=64 - _prompt_tokens(references["a"], _chat("Be brief.\n\nwhile the data")),
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "while the data"}],
    )
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected


def _chat(text):
    from keras_tune.decoding import chat_prompt

    return chat_prompt(text)


def test_streamed_chat_pieces_join_to_the_unstreamed_answer(served):
    client, _, _ = served
    request = dict(model="b", temperature=0, max_tokens=40,
                   messages=[{"role": "user", "content": "the model learns"}, {"role": "assistant", "content": "words"},
                             {"role": "user", "content": "and every step"}])
    whole = client.chat.completions.create(**request)
    pieces, reasons, usage = [], [], None
    for chunk in client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert len(pieces) > 3
    assert "".join(pieces) == whole.choices[0].message.content
    assert [r for r in reasons if r] == [whole.choices[0].finish_reason]
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


@pytest.mark.parametrize("model", [PRESET, "b"])
def test_echo_logprobs_sum_to_evaluate_nll(served, references, model):
    from keras_tune.scoring import evaluate_texts

    client, _, _ = served
    text = "the model learns small words from a tiny corpus"
    answer = client.completions.create(model=model, prompt=text, max_tokens=0, echo=True, logprobs=3)
    logprobs = answer.choices[0].logprobs
    expected = evaluate_texts(references[model], [text], sequence_length=64)
    assert answer.choices[0].text == text
    assert "".join(logprobs.tokens) == text
    assert len(logprobs.token_logprobs) == expected["tokens"]
    assert sum(logprobs.token_logprobs) == pytest.approx(-expected["nll"] * expected["tokens"], rel=1e-5)
    assert all(len(top) == 3 and max(top.values()) >= lp - 1e-5 for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))


def test_seeded_sampling_repeats_and_n_choices_differ(served):
    client, _, _ = served
    request = dict(model="a", prompt=PROMPTS[2], max_tokens=16, temperature=1.0, top_p=0.95, seed=5, n=2,
                   extra_body={"top_k": 50})
    first, again = client.completions.create(**request), client.completions.create(**request)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text
    greedy = client.completions.create(model="a", prompt=PROMPTS[2], max_tokens=16, temperature=0).choices[0].text
    top1 = client.completions.create(model="a", prompt=PROMPTS[2], max_tokens=16, temperature=1.0, seed=1,
                                     extra_body={"top_k": 1}).choices[0].text
    assert top1 == greedy


def test_stop_strings_end_the_text_and_chat_logprobs_list_alternatives(served):
    client, _, _ = served
    whole = client.completions.create(model="a", prompt=PROMPTS[0], temperature=0, max_tokens=30).choices[0].text
    stop = whole[10:13]
    cut = client.completions.create(model="a", prompt=PROMPTS[0], temperature=0, max_tokens=30, stop=[stop])
    assert cut.choices[0].text == whole[: whole.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model="a", temperature=0, max_tokens=5, logprobs=True, top_logprobs=4,
                                          messages=[{"role": "user", "content": "hello"}])
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 4 for e in entries)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5) for e in entries)  # greedy: the likeliest


def test_sixteen_concurrent_streaming_clients_over_four_slots_get_their_own_answers(served, references):
    """More clients than slots, three models mixed: each stream equals its model's batch `generate`."""
    client, _, service = served
    models = [PRESET, "a", "b"]
    prompts = [f"{PROMPTS[i % 4]} {'step ' * (i % 5)}".strip() for i in range(16)]
    max_length = 56
    expected = {}
    for model in models:
        mine = [p for i, p in enumerate(prompts) if models[i % 3] == model]
        expected.update(zip([(model, p) for p in mine], _generate(references[model], mine, max_length, chat=True)))
    results, errors = {}, []

    def run(i):
        model, prompt = models[i % 3], prompts[i]
        try:
            pieces = []
            stream = client.chat.completions.create(
                model=model, temperature=0, stream=True, messages=[{"role": "user", "content": prompt}],
                max_tokens=max_length - _prompt_tokens(references[model], _chat(prompt)))
            for chunk in stream:
                pieces += [c.delta.content or "" for c in chunk.choices]
            results[i] = "".join(pieces)
        except Exception as error:  # reported below with the client's index
            errors.append((i, repr(error)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors
    assert {i: results[i] for i in range(16)} == {i: expected[(models[i % 3], prompts[i])] for i in range(16)}
    assert service.batcher.stats()["busy"] == 0


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (2.0, 0, 0.7),
                                                      (1.0, 4, 0.8)])
def test_sampling_draws_from_the_truncated_distribution(temperature, top_k, top_p):
    """Frequencies of 20000 draws against the distribution top-k, then top-p (renormalized), keep."""
    import jax
    import jax.numpy as jnp

    from keras_tune.serve.sampling import sample

    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
    draws = 20000
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(draws))
    tokens = np.asarray(sample(jnp.tile(logits, (draws, 1)), jnp.full(draws, temperature), jnp.full(draws, top_k),
                               jnp.full(draws, top_p), keys))
    probabilities = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    order = np.argsort(-probabilities)
    keep = np.zeros(len(logits), bool)
    keep[order[: top_k or len(logits)]] = True
    kept = np.where(keep, probabilities, 0) / np.where(keep, probabilities, 0).sum()
    cumulative = np.cumsum(kept[order])
    nucleus = order[: int(np.searchsorted(cumulative, top_p - 1e-9)) + 1]
    expected = np.zeros(len(logits))
    expected[nucleus] = kept[nucleus] / kept[nucleus].sum()
    frequencies = np.bincount(tokens, minlength=len(logits)) / draws
    assert set(np.flatnonzero(frequencies)) <= set(nucleus)
    assert np.abs(frequencies - expected).max() < 0.015, (frequencies.round(3), expected.round(3))


def test_text_stream_holds_back_what_may_change_and_cuts_at_stop_strings():
    from keras_tune.serve.text import TextStream

    pieces = {1: "Hel", 2: "lo", 3: " wo", 4: "rld", 5: "\n\n", 6: "\ufffd", 7: "é", 8: "!"}

    def detokenize(ids):
        text = "".join(pieces[int(i)] for i in ids)
        return text.replace("\ufffd\u00e9", "\u00e9")  # a character whose bytes took two tokens

    stream = TextStream(detokenize, stop=("\n\nX", "rld!"))
    sent = [stream.add(t) for t in (1, 2, 3, 4)]
    assert sent == ["Hel", "lo", " wo", ""]  # "rld" may be the start of "rld!"
    assert stream.add(5) == "rld"  # it was not; "\n\n" may start "\n\nX"
    assert stream.add(6) == ""  # an incomplete character waits, and "\n\n" with it
    assert stream.add(7) == "\n\né"
    assert stream.finish() == "" and not stream.stopped
    stopped = TextStream(detokenize, stop=("rld!",))
    assert [stopped.add(t) for t in (1, 2, 3, 4, 8)] == ["Hel", "lo", " wo", "", ""]
    assert stopped.stopped and stopped.finish() == "" and stopped.sent == "Hello wo"


def _post(url, path, body, raw=None):
    import httpx2 as httpx

    content = raw if raw is not None else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=60)


@pytest.mark.parametrize("path, body, raw, status, fragment", [
    ("/v1/completions", None, "{not json", 400, "not valid JSON"),
    ("/v1/completions", None, "[1, 2]", 400, "a JSON list; expected a JSON object"),
    ("/v1/completions", {"model": PRESET, "prompt": "x", "max_tokens": "5"}, None, 400,
     'max_tokens: received "5"; expected a valid integer'),
    ("/v1/completions", {"model": PRESET, "prompt": 5}, None, 400, "prompt: received 5; expected a string or a list"),
    ("/v1/completions", {"model": PRESET, "prompt": "x", "temprature": 0.5}, None, 400, "unknown field 'temprature'"),
    ("/v1/completions", {"prompt": "x"}, None, 400, "'model' is missing"),
    ("/v1/completions", {"model": PRESET, "prompt": "x", "temperature": 3}, None, 400,
     "temperature: received 3; expected less than or equal to 2"),
    ("/v1/completions", {"model": PRESET, "prompt": "x", "presence_penalty": 0.5}, None, 400, "penalties are not implemented"),
    ("/v1/completions", {"model": PRESET, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, None, 400, "expected at most 4"),
    ("/v1/completions", {"model": PRESET, "prompt": "x", "max_tokens": 0}, None, 400, "0 only with echo"),
    ("/v1/completions", {"model": PRESET, "prompt": "x", "max_tokens": CONTEXT}, None, 400,
     f"context is {CONTEXT} tokens; the prompt takes 2 and max_tokens asks for {CONTEXT} more; expected max_tokens at most {CONTEXT - 2}"),
    ("/v1/completions", {"model": PRESET, "prompt": "word " * CONTEXT}, None, 400,
     f"expected a prompt of at most {CONTEXT - 1} tokens"),
    ("/v1/completions", {"model": PRESET, "prompt": ["x", "y"], "n": 16}, None, 400,
     f"the request makes 32 sequences (n times prompts); expected at most {SLOTS + 16}"),
    ("/v1/completions", {"model": "c", "prompt": "x"}, None, 404, f"model 'c': no such model here; expected one of {PRESET}, a, b"),
    ("/v1/chat/completions", {"model": "a", "messages": []}, None, 400, "messages: received []"),
    ("/v1/chat/completions", {"model": "a", "messages": [{"role": "robot", "content": "x"}]}, None, 400,
     "messages[0].role: received"),
    ("/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "x"},
                                                        {"role": "assistant", "content": "y"}]}, None, 400,
     "expected the conversation to end with a user message"),
    ("/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 30}, None, 400,
     "top_logprobs: received 30; expected less than or equal to 20"),
    ("/v1/embeddings", {"model": "a", "input": "x"}, None, 404, "expected one of GET /v1/models"),
])
def test_refusals_say_what_was_wrong_and_the_server_keeps_serving(served, path, body, raw, status, fragment):
    client, url, _ = served
    response = _post(url, path, body, raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"], error["message"]
    assert "\n" not in error["message"] and error["type"]
    assert client.completions.create(model=PRESET, prompt="x", max_tokens=2, temperature=0).choices[0].finish_reason


def test_the_base_weights_exist_once_whatever_the_adapters(adapter_paths):
    """Serving two adapters adds their small tables, not another copy of the base."""
    import gc

    import jax

    from keras_tune.serve.loading import ServeLimits, build_service

    def live_bytes():
        gc.collect()
        return sum(array.nbytes for array in jax.live_arrays())

    limits = ServeLimits(slots=SLOTS, context=CONTEXT, warm_up=False)
    before = live_bytes()
    alone = build_service(_config(), [], limits)
    with_base = live_bytes() - before
    items = [f"{name}={path}" for name, path in adapter_paths.items()]
    both = build_service(_config(), items, limits)
    with_adapters = live_bytes() - before - with_base
    base_bytes = sum(int(np.prod(v.shape)) * 4 for v in alone.batcher.engine.causal_lm.backbone.weights)
    lora_bytes = both.adapters.table_bytes() + sum(int(np.prod(v.shape)) * 4 for pair in both.adapters.variables for v in pair)
    assert with_base >= base_bytes
    assert with_adapters <= with_base + 2 * lora_bytes  # the same base and cache, plus the adapters
    assert with_adapters < with_base + base_bytes / 2


@pytest.mark.parametrize("preset", ["gemma_tiny", "gemma2_tiny"])
def test_gemma_1_and_2_decode_per_slot_as_generate_does(preset):
    """The engine (no HTTP) on Gemma 1 and 2: two prompts of different lengths decoded together, each as alone."""
    import queue

    from keras_tune import config as config_lib
    from keras_tune.serve.batcher import Done, Sequence, Token
    from keras_tune.serve.loading import ServeLimits, build_service

    service = build_service(config_lib.load_config(preset), [], ServeLimits(slots=2, context=64, warm_up=False))
    causal_lm = service.batcher.engine.causal_lm
    causal_lm.compile(sampler="greedy")
    expected = _generate(causal_lm, PROMPTS[:2], 48)
    events = queue.Queue()
    sequences = [Sequence(service.encode(p), 0, 48 - len(service.encode(p)), lambda e, i=i: events.put((i, e)),
                          stop_ids=service.completion_stop_ids) for i, p in enumerate(PROMPTS[:2])]
    service.batcher.start()
    service.batcher.submit(sequences)
    texts, done = ["", ""], 0
    while done < 2:
        index, event = events.get(timeout=120)
        if isinstance(event, (Token, Done)):
            texts[index] += event.text
        done += isinstance(event, Done)
    service.batcher.close()
    assert service.batcher.join(30)
    assert texts == expected


def test_unservable_family_and_bad_flags_are_one_line_before_any_model(no_model, capsys):
    from keras_tune.serve.__main__ import main

    port = str(free_port())
    cases = [
        (["--preset", "recurrentgemma_tiny", "--port", port], "RecurrentGemma models cannot be served"),
        (["--preset", PRESET, "--adapter", "no-equals-sign", "--port", port], "expected NAME=PATH"),
        (["--preset", PRESET, "--adapter", f"{PRESET}=x.npz", "--port", port], "is the base preset's name"),
        (["--preset", PRESET, "--adapter", "a=/nonexistent.npz", "--port", port], "no such file /nonexistent.npz"),
        (["--preset", PRESET, "--mesh", "2x4", "--slots", "3", "--port", port], "expected a multiple of the batch axis (2)"),
        (["--preset", PRESET, "--port", "70000"], "expected a TCP port"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], (argv, lines)


def _stream_lines(response):
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


def test_full_queue_disconnect_and_sigterm_on_the_command_line_server(tmp_path):
    """One slot, no queue: a second request is 429; a client that leaves frees the slot; SIGTERM drains, exit 0."""
    import httpx2 as httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    command = [sys.executable, "-m", "keras_tune.serve", "--preset", PRESET, "--port", str(port), "--slots", "1",
               "--max-queue", "0", "--context", "2048", "--no-warmup"]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())
    try:
        def health():
            try:
                return httpx.get(url + "/health", timeout=5).json()
            except httpx.HTTPError:
                return None

        assert wait_until(lambda: health() or server.poll() is not None, 180) and server.poll() is None, log_path.read_text()
        long = {"model": PRESET, "prompt": "the", "max_tokens": 2000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=long, timeout=120) as first:
            lines = _stream_lines(first)  # kept: a dropped line iterator closes the response
            next(lines)
            assert health()["busy"] == 1
            refused = _post(url, "/v1/completions", {"model": PRESET, "prompt": "x", "max_tokens": 2})
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
            assert "the queue is full" in refused.json()["error"]["message"]
            next(lines)
        # The client left mid-stream: its slot is free again, and the server answers.
        assert wait_until(lambda: (health() or {}).get("busy") == 0, 30), health()
        assert health()["cancelled"] >= 1
        assert _post(url, "/v1/completions", {"model": PRESET, "prompt": "x", "max_tokens": 2}).status_code == 200

        received_after_signal, reasons = 0, []
        with httpx.stream("POST", url + "/v1/completions", timeout=120,
                          json=dict(long, max_tokens=400)) as draining:
            chunks = _stream_lines(draining)
            next(chunks)
            server.send_signal(signal.SIGTERM)
            for chunk in chunks:
                received_after_signal += 1
                reasons += [c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]]
        assert received_after_signal > 10 and reasons == ["length"]  # the answer in flight was finished
        assert server.wait(60) == 0, log_path.read_text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
        assert "Traceback" not in log_path.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_sixteen_streaming_clients_on_the_real_270m_with_two_adapters(tmp_path):
    """The offline Gemma 3 270M on one device, two adapters over it: 16 concurrent streams all finish,
    and the base weights are in memory once."""
    import gc

    import jax
    import openai

    from keras_tune import config as config_lib
    from keras_tune.serve.app import create_app
    from keras_tune.serve.loading import ServeLimits, build_service

    preset = "gemma3_270m_offline"
    paths = [random_adapter(preset, tmp_path / f"{name}.npz", seed=seed) for name, seed in (("x", 1), ("y", 2))]
    gc.collect()
    before = sum(array.nbytes for array in jax.live_arrays())
    config = config_lib.load_config(preset, overrides={"distribution.mesh": "1x1"})
    service = build_service(config, [f"x={paths[0]}", f"y={paths[1]}"], ServeLimits(slots=16, context=128, warm_up=False),
                            devices=jax.devices()[:1])
    gc.collect()
    held = sum(array.nbytes for array in jax.live_arrays()) - before
    base = sum(int(np.prod(v.shape)) * 4 for v in service.batcher.engine.causal_lm.backbone.weights)
    assert held < 1.2 * base  # the weights (with LoRA and the cache), not three copies of them
    port = free_port()
    stop = serve_in_thread(create_app(service), port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        finished, errors = [], []

        def run(i):
            try:
                stream = client.completions.create(model=(preset, "x", "y")[i % 3], prompt=f"def function_{i}(x):",
                                                   max_tokens=16, temperature=0, stream=True)
                reasons = [c.finish_reason for chunk in stream for c in chunk.choices if c.finish_reason]
                finished.append(reasons)
            except Exception as error:  # reported below
                errors.append(repr(error))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        assert not errors and len(finished) == 16 and all(len(r) == 1 for r in finished), (errors, finished)
        assert service.batcher.stats()["finished"] == 16
    finally:
        stop()
