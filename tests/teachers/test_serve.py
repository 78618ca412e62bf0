import asyncio
import math

import httpx
import pytest

from kdistill.errors import KDistillError
from kdistill.teachers.serve import ServeLimits
from kdistill.teachers.serve import serve as serve_fn


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
    from kdistill.teachers.serve import load_served_lm

    with pytest.raises(KDistillError, match="smollm2-135m"):
        load_served_lm("smollm2-135")


def test_serve_has_no_loader_of_its_own():
    """One loading path: serve goes through teachers.lm.load_causal_lm (no second copy in serve.py)."""
    import kdistill.teachers.serve as srv

    assert not hasattr(srv, "load_causal_lm") and not hasattr(srv, "ZOO_LMS")


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


# ---- a bad request never fails the other requests of its batch (defect: seed >= 2**63 -> 500 for all)


def _concurrent(h, bodies):
    async def go():
        async with httpx.AsyncClient(base_url=h.base_url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/completions", json=b) for b in bodies))

    return asyncio.run(go())


def _body(prompt, **kw):
    return {"model": "tiny-llama", "prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 2, **kw}


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1, 2**64, 10**30, -(2**63) - 1])
def test_out_of_range_seed_is_400_and_spares_its_batch(serve, seed):
    h = serve(limits=ServeLimits(batch_wait_ms=300))
    good = [_body(p) for p in ("a dog", "oak", "bread is")]
    rs = _concurrent(h, [good[0], _body("a cat", seed=seed, temperature=1.0), good[1], good[2]])
    bad = rs[1]
    assert bad.status_code == 400, bad.text
    msg = bad.json()["error"]["message"]
    assert "seed" in msg and "2**63" in msg and "Value error" not in msg
    assert [r.status_code for r in (rs[0], rs[2], rs[3])] == [200, 200, 200], [r.text for r in rs]


@pytest.mark.parametrize("seed", [0, 2**63 - 1, -(2**63), -1])
def test_seed_range_edges_are_served_with_n_copies(serve, seed):
    """seed + i for the n copies may pass 2**63 - 1; the generator wraps it instead of failing."""
    h = serve()
    body = {"model": "tiny-llama", "prompt": "a cat", "max_tokens": 3, "temperature": 1.0, "seed": seed, "n": 3}
    a = httpx.post(h.base_url + "/completions", json=body, timeout=30)
    assert a.status_code == 200, a.text
    b = httpx.post(h.base_url + "/completions", json=body, timeout=30)
    assert [c["text"] for c in a.json()["choices"]] == [c["text"] for c in b.json()["choices"]]


def test_a_failing_request_gets_its_error_and_the_rest_of_its_batch_completes(serve):
    """A request whose decoding fails (here: poisoned by seed 666) among good ones sent together: only it
    gets a 500; the others get the same answers as when sent alone."""
    h = serve(limits=ServeLimits(batch_wait_ms=300))
    gen = h.app.state.engine.gen
    real = gen.generate
    seen = []

    def generate(reqs):
        seen.append(len(reqs))
        if any(r.seed == 666 for r in reqs):
            raise RuntimeError("poisoned request")
        return real(reqs)

    gen.generate = generate
    prompts = ["a dog", "bread is a food made from flour", "oak"]
    alone = [httpx.post(h.base_url + "/completions", json=_body(p), timeout=30).json() for p in prompts]
    rs = _concurrent(h, [_body(prompts[0]), _body(prompts[1]), _body("cheese", seed=666), _body(prompts[2])])
    assert max(seen) >= 2  # the poisoned request really shared a batch with good ones
    assert rs[2].status_code == 500 and "poisoned request" in rs[2].json()["error"]["message"]
    ok = [rs[0], rs[1], rs[3]]
    assert [r.status_code for r in ok] == [200, 200, 200], [r.text for r in rs]
    for a, b in zip(alone, ok, strict=True):
        assert a["choices"][0]["text"] == b.json()["choices"][0]["text"]
        la, lb = a["choices"][0]["logprobs"]["token_logprobs"], b.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert all(abs(x - y) < 1e-4 for x, y in zip(la, lb, strict=True))
    st = httpx.get(h.base_url + "/stats").json()
    assert st["failed_batches"] >= 1 and st["failed_sequences"] == 1
    # the worker is still alive and batches again
    assert httpx.post(h.base_url + "/completions", json=_body("oak"), timeout=30).status_code == 200


# ---- options are checked before anything loads (defect: --port 99999 -> traceback after loading)


@pytest.fixture
def no_load(monkeypatch):
    """Make any model load fail the test: the checks must come first."""
    import kdistill.teachers.lm as lm
    import kdistill.teachers.serve as srv

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    for name in ("load_served_lm", "load_causal_lm"):  # raising=False: also guards an older serve.py
        monkeypatch.setattr(srv, name, boom, raising=False)
    monkeypatch.setattr(lm, "load_causal_lm", boom)


@pytest.mark.parametrize("kw,names", [
    ({"port": 99999}, ["port", "65535"]),
    ({"port": 0}, ["port"]),
    ({"port": -1}, ["port"]),
    ({"max_tokens_limit": -5}, ["max_tokens_limit", "--max-tokens-limit", "-5"]),
    ({"max_prompt_tokens": 0}, ["max_prompt_tokens"]),
    ({"max_request_bytes": -1}, ["max_request_bytes"]),
    ({"max_batch_size": 0}, ["max_batch_size"]),
    ({"threads": 0}, ["threads"]),
    ({"host": ""}, ["host"]),
    ({"port": 70000, "max_tokens_limit": -5, "threads": -2}, ["port", "max_tokens_limit", "threads"]),
])
def test_api_serve_checks_options_before_loading(no_load, kw, names):
    from kdistill import api

    with pytest.raises(KDistillError) as e:
        api.serve("smollm2-135m", **kw)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in names), msg


def test_engine_options_are_checked_too(no_load):
    for kw in ({"batch_wait_ms": -1}, {"max_queue": 0}, {"dtype": "float64"}, {"log_level": "loud"}):
        with pytest.raises(KDistillError, match=next(iter(kw))):
            serve_fn("smollm2-135m", **kw)


def test_taken_port_fails_before_loading(no_load):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        with pytest.raises(KDistillError, match="cannot listen on 127.0.0.1") as e:
            serve_fn("smollm2-135m", port=s.getsockname()[1])
        assert "--port" in str(e.value)
    finally:
        s.close()


def test_background_serve_loads_through_the_one_loader(tiny_lm_dir):
    h = serve_fn(str(tiny_lm_dir), port=0, background=True, max_tokens_limit=4)
    try:
        assert h.model_name == "tiny-llama" and h.port > 0
        assert httpx.get(h.base_url + "/models").json()["data"][0]["id"] == "tiny-llama"
        r = httpx.post(h.base_url + "/completions", json={"model": "tiny-llama", "prompt": "dog", "max_tokens": 5})
        assert r.status_code == 400 and "<= 4" in r.json()["error"]["message"]
    finally:
        h.stop()


def _one_line_error(result):
    out = result.output.strip()
    assert result.exit_code == 2, result.output
    assert out.startswith("error:") and "\n" not in out and "Traceback" not in out, out
    return out


@pytest.mark.parametrize("args,word", [
    (["--port", "99999"], "port"),
    (["--port", "0"], "port"),
    (["--max-tokens-limit", "-5"], "max-tokens-limit"),
    (["--max-prompt-tokens", "0"], "max-prompt-tokens"),
    (["--max-request-bytes", "-1"], "max-request-bytes"),
    (["--max-batch-size", "0"], "max-batch-size"),
    (["--threads", "0"], "threads"),
])
def test_cli_serve_bad_option_is_one_line_exit_2(no_load, args, word):
    from typer.testing import CliRunner

    from kdistill.cli import app

    out = _one_line_error(CliRunner().invoke(app, ["serve", "smollm2-135m", *args]))
    assert word in out


def test_cli_serve_wrong_model_name_is_one_line_exit_2():
    from typer.testing import CliRunner

    from kdistill.cli import app

    out = _one_line_error(CliRunner().invoke(app, ["serve", "smolm2-135m", "--port", "8123"]))
    assert "smolm2-135m" in out and "smollm2-135m" in out


def test_echo_scores_the_prompt_like_a_local_forward(serve, tiny_lm_dir):
    """echo + logprobs + max_tokens 0: every prompt token's log-prob and the top-k of each distribution equal
    log_softmax of a local forward of the same model; the prompt may be token ids."""
    import torch

    from kdistill.teachers.serve import load_served_lm

    h = serve()
    lm, tok, _ = load_served_lm(str(tiny_lm_dir))
    ids = tok("a dog barks at the cat and the oak", add_special_tokens=True)["input_ids"]
    body = {"model": "tiny-llama", "prompt": ids, "echo": True, "logprobs": 5, "max_tokens": 0,
            "return_tokens_as_token_ids": True}
    r = httpx.post(h.base_url + "/completions", json=body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == [f"token_id:{i}" for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        local = torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    for j in range(1, len(ids)):
        assert abs(lp["token_logprobs"][j] - float(local[j - 1, ids[j]])) < 1e-4
        v, k = torch.topk(local[j - 1], 5)
        got = sorted(((int(t.split(":")[1]), x) for t, x in lp["top_logprobs"][j].items()), key=lambda t: -t[1])
        assert [t for t, _ in got] == k.tolist()
        assert max(abs(x - float(y)) for (_, x), y in zip(got, v, strict=True)) < 1e-4
    assert lp["text_offset"][0] == 0 and len(lp["text_offset"]) == len(ids)
    # text prompt: tokens as text, the prompt echoed, generated tokens appended after it
    d = httpx.post(h.base_url + "/completions", json={"model": "tiny-llama", "prompt": "a dog", "echo": True,
                                                      "logprobs": 2, "max_tokens": 2, "temperature": 0}).json()
    c = d["choices"][0]
    assert c["text"].startswith("a dog") and c["logprobs"]["token_logprobs"][0] is None
    assert len(c["logprobs"]["tokens"]) == len(tok("a dog")["input_ids"]) + d["usage"]["completion_tokens"]


def test_echo_limits_and_errors(serve):
    h = serve(limits=ServeLimits(max_prompt_tokens=16))

    def post(**kw):
        return httpx.post(h.base_url + "/completions", json={"model": "tiny-llama", "echo": True, "max_tokens": 0,
                                                             "logprobs": 2, "prompt": [1, 5, 7], **kw})

    assert post().status_code == 200
    r = post(logprobs=21)
    assert r.status_code == 400 and "0..20" in r.json()["error"]["message"]
    r = post(prompt=list(range(3, 40)))
    assert r.status_code == 400 and "at most 16" in r.json()["error"]["message"]
    r = post(prompt=[1, 99999])
    assert r.status_code == 400 and "99999" in r.json()["error"]["message"]
    r = post(echo=False)
    assert r.status_code == 400 and "echo=true" in r.json()["error"]["message"]
    r = post(prompt=[[1, 5], [7, 8, 9]])
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
