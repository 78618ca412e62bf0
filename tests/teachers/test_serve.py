import asyncio
import math

import httpx
import pytest

from kdistill.errors import KDistillError
from kdistill.teachers.serve import ServeLimits, serve as serve_fn


def chat(h, **kw):
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "a dog is"}], "max_tokens": 3, **kw}
    return httpx.post(h.base_url + "/chat/completions", json=body, timeout=30)


def test_models_and_chat_with_logprobs(serve):
    h = serve()
    assert h.host == "127.0.0.1"
    assert httpx.get(h.base_url + "/models").json()["data"][0]["id"] == "tiny-llama"
    r = chat(h, temperature=0, logprobs=True, top_logprobs=4)
    assert r.status_code == 200, r.text
    d = r.json()
    content = d["choices"][0]["logprobs"]["content"]
    assert 1 <= len(content) <= 3 and d["usage"]["completion_tokens"] == len(content)
    for item in content:
        tops = item["top_logprobs"]
        assert len(tops) == 4
        assert tops[0]["logprob"] >= tops[-1]["logprob"]
        # greedy: the chosen token is the most likely one and its log-prob is reported as such
        assert math.isclose(item["logprob"], tops[0]["logprob"], abs_tol=1e-6)
        assert sum(math.exp(t["logprob"]) for t in tops) <= 1.0 + 1e-5
    assert d["choices"][0]["message"]["content"] == "".join(i["token"] for i in content)


def test_completions_logprobs_seed_and_n(serve):
    h = serve()
    body = {"model": "tiny-llama", "prompt": "a cat", "max_tokens": 4, "temperature": 1.0, "seed": 7, "logprobs": 2,
            "n": 2}
    a = httpx.post(h.base_url + "/completions", json=body).json()
    b = httpx.post(h.base_url + "/completions", json=body).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # seeded sampling repeats
    lp = a["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert all(len(t) <= 2 for t in lp["top_logprobs"])
    assert len(a["choices"]) == 2


def test_batched_requests_match_single_requests(serve):
    """Left-padded batching must not change a request's log-probs."""
    h = serve(limits=ServeLimits(batch_wait_ms=200))
    prompts = ["a dog", "bread is a food made from flour", "oak"]

    def body(p):
        return {"model": "tiny-llama", "prompt": p, "max_tokens": 2, "temperature": 0, "logprobs": 5}

    single = [httpx.post(h.base_url + "/completions", json=body(p)).json() for p in prompts]
    assert httpx.get(h.base_url + "/stats").json()["max_batch"] == 1

    async def together():
        async with httpx.AsyncClient(base_url=h.base_url) as c:
            return await asyncio.gather(*(c.post("/completions", json=body(p)) for p in prompts))

    batched = [r.json() for r in asyncio.run(together())]
    assert httpx.get(h.base_url + "/stats").json()["max_batch"] >= 2
    for s, b in zip(single, batched, strict=True):
        ls = s["choices"][0]["logprobs"]["top_logprobs"][0]
        lb = b["choices"][0]["logprobs"]["top_logprobs"][0]
        assert set(ls) == set(lb)
        for k in ls:
            assert abs(ls[k] - lb[k]) < 1e-4


def test_limits_give_4xx_that_say_why(serve):
    h = serve(limits=ServeLimits(max_tokens=8, max_request_bytes=2000, max_prompt_tokens=64))
    r = chat(h, max_tokens=9)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"] and "8" in r.json()["error"]["message"]
    r = httpx.post(h.base_url + "/completions", json={"model": "tiny-llama", "prompt": "x" * 5000})
    assert r.status_code == 413 and "2000" in r.json()["error"]["message"]
    r = httpx.post(h.base_url + "/completions", json={"model": "tiny-llama", "prompt": "dog cat " * 100})
    assert r.status_code == 400 and "prompt is" in r.json()["error"]["message"]
    r = httpx.post(h.base_url + "/completions", json={"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404 and "tiny-llama" in r.json()["error"]["message"]
    r = httpx.post(h.base_url + "/completions", json={"model": "tiny-llama"})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = chat(h, stream=True)
    assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
    r = chat(h, logprobs=True, top_logprobs=50)
    assert r.status_code == 400 and "top_logprobs" in r.json()["error"]["message"]


def test_bearer_token(serve):
    h = serve(api_key="s3cret")
    assert httpx.get(h.base_url + "/models").status_code == 401
    assert httpx.get(h.base_url + "/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(h.base_url + "/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_serve_refuses_unset_api_key_env(monkeypatch):
    monkeypatch.delenv("KD_TEST_UNSET_KEY", raising=False)
    with pytest.raises(KDistillError, match="KD_TEST_UNSET_KEY"):
        serve_fn("smollm2-135m", api_key_env="KD_TEST_UNSET_KEY")


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(KDistillError, match="smollm2-135m"):
        from kdistill.teachers.serve import load_causal_lm

        load_causal_lm("smollm2-135")


def test_bounded_load_200_requests_8_concurrent(serve):
    """Every request is answered (200) or refused with a clear status (503 + Retry-After); none is lost."""
    h = serve(limits=ServeLimits(max_tokens=4, max_batch_size=4, max_queue=6))

    async def load():
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=h.base_url, timeout=60) as c:
            async def one(i):
                async with sem:
                    return await c.post("/completions", json={"model": "tiny-llama", "prompt": f"dog {i}",
                                                              "max_tokens": 2, "temperature": 0})
            return await asyncio.gather(*(one(i) for i in range(200)))

    rs = asyncio.run(load())
    codes = [r.status_code for r in rs]
    ok = codes.count(200)
    refused = [r for r in rs if r.status_code == 503]
    assert ok + len(refused) == 200, sorted(set(codes))
    assert ok > 0
    for r in refused:
        assert "busy" in r.json()["error"]["message"] and r.headers["retry-after"] == "1"
    for r in rs:
        if r.status_code == 200:
            assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    st = httpx.get(h.base_url + "/stats").json()
    assert st["by_path"]["/v1/completions"] == 200
    assert st["by_status"].get("200", 0) == ok and st["by_status"].get("503", 0) == len(refused)
    assert st["batched_sequences"] == ok and st["max_batch"] >= 2
    print({"answered": ok, "refused_503": len(refused), "batches": st["batches"], "max_batch": st["max_batch"]})


def test_kdistill_serve_cli_subprocess(tiny_lm_dir):
    """`kdistill serve <model dir>` as a real process on a loopback port; SIGTERM stops it."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "kdistill.cli", "serve", str(tiny_lm_dir), "--port", str(port),
                          "--max-tokens-limit", "4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(url + "/models", timeout=1)
                break
            except httpx.TransportError:
                assert p.poll() is None and time.monotonic() < deadline, p.stdout.read() if p.poll() is not None else ""
                time.sleep(0.2)
        assert r.json()["data"][0]["id"] == "tiny-llama"
        r = httpx.post(url + "/completions", json={"model": "tiny-llama", "prompt": "dog", "max_tokens": 5})
        assert r.status_code == 400 and "<= 4" in r.json()["error"]["message"]
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=20)
