"""The OpenAI-compatible server (``python -m casa_jax.serve``) as its users meet it: a real uvicorn process
on 127.0.0.1 serving the session's tiny CASA model, driven by the official ``openai`` client. Chat,
streaming, the safety fields and policies, request errors, a concurrent load whose batched answers
equal the unbatched ones, and SIGTERM finishing the request in flight."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from casa_jax.casa.config import DEFAULT_REFUSAL  # noqa: E402
from casa_jax.train.mixtures import split_examples  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "tiny-casa"
ONE_DEVICE = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_casa_model):
    """(process, base URL) of a server over the tiny CASA checkpoint; it is stopped at the end (the last
    test SIGTERMs it on purpose)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "casa_jax.serve", f"--ckpt_dir={tiny_casa_model / 'checkpoint'}",
                             f"--port={port}", f"--model_name={MODEL}", "--max_tokens=32", "--max_batch=4",
                             "--max_wait_ms=150"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=ONE_DEVICE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.3)
    if proc.poll() is not None:
        pytest.fail(f"the server exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
    yield proc, url
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key="unused", max_retries=0, timeout=240)


@pytest.fixture(scope="module")
def prompts():
    """Held-out harmful and benign prompts (the split training never saw)."""
    _, heldout = split_examples(["harmful_advbench"], ["benign_freshqa", "benign_mtbench"], 300, 40,
                                DEFAULT_REFUSAL, 120, 0)
    return ([e.prompt for e in heldout if e.harmful][:4], [e.prompt for e in heldout if not e.harmful][:4])


def _health(url) -> dict:
    import json
    with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
        return json.loads(r.read())


def _ask(client, prompt, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=kwargs.pop("max_tokens", 12), temperature=0, **kwargs)


def test_models_and_chat_with_the_safety_verdict(client, prompts):
    assert [m.id for m in client.models.list().data] == [MODEL]
    harmful, benign = prompts
    bad, good = _ask(client, harmful[0]), _ask(client, benign[0])
    for reply, verdict in ((bad, "unsafe"), (good, "safe")):
        choice = reply.choices[0]
        safety = choice.model_extra["safety"]
        assert safety["verdict"] == verdict, (verdict, safety)
        assert safety["rule"] == ">=" and 0 < safety["threshold"] < 1  # the threshold calibrated in training
        assert (safety["p_unsafe"] >= safety["threshold"]) == (verdict == "unsafe")
        assert choice.message.role == "assistant" and "<|" not in choice.message.content
        assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
    assert bad.choices[0].message.content.startswith("I'm sorry")  # the model's own refusal (policy "model")
    assert good.choices[0].finish_reason in ("stop", "length")


def test_streaming_sends_the_verdict_first_and_the_same_text(client, prompts):
    whole = _ask(client, prompts[1][1])
    chunks = list(_ask(client, prompts[1][1], stream=True))
    assert chunks[0].choices[0].model_extra["safety"] == whole.choices[0].model_extra["safety"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1


def test_unsafe_policies_template_and_error(client, prompts):
    harmful = prompts[0][1]
    templated = _ask(client, harmful, extra_body={"safety_policy": "template"})
    assert templated.choices[0].message.content == DEFAULT_REFUSAL
    assert templated.choices[0].finish_reason == "content_filter"
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, harmful, extra_body={"safety_policy": "error"})
    error = e.value.body
    assert error["code"] == "unsafe_request" and error["safety"]["verdict"] == "unsafe"
    benign = _ask(client, prompts[1][1], extra_body={"safety_policy": "error"})  # control: safe passes
    assert benign.choices[0].model_extra["safety"]["verdict"] == "safe"


@pytest.mark.parametrize("kwargs,param,error", [
    ({"model": "gpt-4o"}, "model", openai.BadRequestError),
    ({"temperature": 5}, "temperature", openai.BadRequestError),
    ({"max_tokens": 0}, "max_tokens", openai.BadRequestError),
    ({"max_tokens": 33}, "max_tokens", openai.BadRequestError),
    ({"top_p": 1.5, "temperature": 0.7}, "top_p", openai.BadRequestError),
    ({"n": 2}, "n", openai.BadRequestError),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", openai.UnprocessableEntityError),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages", openai.BadRequestError),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, "messages", openai.BadRequestError),
])
def test_bad_requests_name_the_field(client, kwargs, param, error):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **kwargs}
    with pytest.raises(error) as e:
        client.chat.completions.create(**request)
    assert e.value.body["param"] == param, e.value.body
    assert param.split(".")[0] in e.value.body["message"]


def test_malformed_body_and_health(server):
    url = server[1]
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=b"{not json", method="POST",
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 422 and b"invalid_request_error" in e.value.read()
    assert _health(url)["status"] == "ok"


def test_concurrent_clients_are_batched_and_answer_as_unbatched(client, server, prompts):
    """Eight concurrent clients: every response arrives complete, equal (text and verdict) to the same
    request sent alone, and the server really batched them (its largest batch > 1: the control)."""
    asks = [p for pair in zip(*prompts) for p in pair]  # harmful and benign, interleaved
    alone = [_ask(client, p, max_tokens=8 + i % 3) for i, p in enumerate(asks)]
    before = _health(server[1])
    together = [None] * len(asks)

    def worker(i):
        together[i] = _ask(client, asks[i], max_tokens=8 + i % 3)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    after = _health(server[1])
    assert all(t is not None for t in together)
    for a, b in zip(alone, together):
        assert b.choices[0].message.content == a.choices[0].message.content
        assert b.choices[0].model_extra["safety"]["verdict"] == a.choices[0].model_extra["safety"]["verdict"]
        assert b.usage.completion_tokens == a.usage.completion_tokens <= 10
    assert after["requests"] - before["requests"] == len(asks)
    assert after["batches"] - before["batches"] < len(asks) and after["largest_batch"] > 1


def test_sigterm_finishes_the_request_in_flight(server, client, prompts):
    """Runs last in this module: SIGTERM while a request is being served; it still gets its full answer,
    the server says nothing was left in flight and exits, and a request after that finds no server."""
    proc, url = server
    result = {}

    def worker():
        result["reply"] = _ask(client, prompts[1][3], max_tokens=32)
    t = threading.Thread(target=worker)
    t.start()
    deadline = time.time() + 60  # its decode length (32) was never compiled: it is in flight for seconds
    while time.time() < deadline and _health(url)["in_flight"] < 1:
        time.sleep(0.05)
    assert _health(url)["in_flight"] == 1
    proc.send_signal(signal.SIGTERM)
    t.join(240)
    assert result["reply"].choices[0].message.content is not None
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught, so the parent sees the signal
    assert proc.wait(120) in (0, -signal.SIGTERM)
    log = proc.stdout.read()
    assert "none left in flight" in log and "Traceback" not in log, log[-3000:]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=5)
