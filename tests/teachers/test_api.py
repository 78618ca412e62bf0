import socket

import httpx
import pytest

from kdistill.errors import KDistillError
from kdistill.teachers.api import APITeacher
from kdistill.teachers.serve import Faults, ServeLimits
from kdistill.teachers.store import ResponseStore


def reqs(n, **kw):
    return [{"prompt": f"dog {i}", "max_tokens": 2, "temperature": 0, **kw} for i in range(n)]


def gen_count(h):
    return httpx.get(h.base_url + "/stats").json()["by_path"].get("/v1/completions", 0)


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_chat_and_top_logprobs_as_soft_targets(serve):
    h = serve()
    t = APITeacher(h.base_url, "tiny-llama")
    rep = t.chat([{"role": "user", "content": "a dog is"}], max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    assert rep.ok and not rep.cached and rep.attempts == 1
    assert len(rep.tokens) == len(rep.top_logprobs) == len(rep.token_logprobs) >= 1
    assert all(1 <= len(d) <= 3 for d in rep.top_logprobs)
    assert rep.usage["completion_tokens"] == len(rep.tokens)
    c = t.complete("a cat", max_tokens=2, logprobs=2)
    assert c.ok and len(c.top_logprobs) == len(c.tokens)


def test_store_means_no_second_request(serve, tmp_path):
    h = serve()
    store = ResponseStore(tmp_path / "s.sqlite")
    first = APITeacher(h.base_url, "tiny-llama", store=store).run(reqs(10))
    assert gen_count(h) == 10 and len(store) == 10
    t2 = APITeacher(h.base_url, "tiny-llama", store=ResponseStore(tmp_path / "s.sqlite"))
    second = t2.run(reqs(10))
    assert gen_count(h) == 10  # nothing re-sent
    assert all(r.cached for r in second) and [r.text for r in second] == [r.text for r in first]
    assert t2.cost()["requests_sent"] == 0 and t2.cost()["cached"] == 10


def test_identical_requests_in_one_run_are_sent_once(serve):
    h = serve()
    t = APITeacher(h.base_url, "tiny-llama", concurrency=4)
    out = t.run(reqs(3) * 4)
    assert gen_count(h) == 3 and all(r.ok for r in out)
    assert t.cost()["deduplicated"] == 9
    assert [r.text for r in out[3:6]] == [r.text for r in out[:3]]


def test_500s_and_malformed_bodies_are_retried(serve):
    h = serve(faults=Faults(error_every=3, malformed_every=5))
    # Almost half of all request slots fail; with concurrent retries one request can draw many failing slots in
    # a row, so the retry budget must make running out practically impossible (0.47^31 per request).
    t = APITeacher(h.base_url, "tiny-llama", backoff_base=0.01, backoff_max=0.05, max_retries=30)
    out = t.run(reqs(20))
    assert all(r.ok for r in out), [(r.status, r.error) for r in out if not r.ok]
    c = t.cost()
    assert c["retries"] > 0 and c["http_statuses"]["500"] > 0 and c["responses_ok"] == 20
    assert c["requests_sent"] == 20 + c["retries"]


def test_timeouts_are_retried(serve):
    h = serve(faults=Faults(delay_every=3, delay_s=6.0))
    # see test_500s_and_malformed_bodies_are_retried
    t = APITeacher(h.base_url, "tiny-llama", timeout=2.0, backoff_base=0.01, backoff_max=0.05, max_retries=30)
    out = t.run(reqs(6))
    assert all(r.ok for r in out)
    assert t.cost()["retries"] >= 1


def test_exhausted_retries_and_4xx_do_not_stop_the_job(serve):
    h = serve(faults=Faults(error_every=2), limits=ServeLimits(max_tokens=4))
    t = APITeacher(h.base_url, "tiny-llama", backoff_base=0.001, max_retries=1)
    out = t.run(reqs(4) + [{"prompt": "x", "max_tokens": 100}])
    assert [r.status for r in out].count("error") >= 1
    bad = out[-1]
    # the 4xx is not retried (or only when it collided with an injected 500) and its reason is kept
    assert bad.status == "error" and ("max_tokens" in bad.error or "500" in bad.error)
    assert sum(r.ok for r in out) >= 1


def test_budget_stops_cleanly(serve):
    h = serve()
    t = APITeacher(h.base_url, "tiny-llama", concurrency=2, max_requests=5)
    out = t.run(reqs(12))
    assert [r.status for r in out].count("ok") == 5
    assert [r.status for r in out].count("skipped_budget") == 7
    assert gen_count(h) == 5
    t2 = APITeacher(h.base_url, "tiny-llama", concurrency=1, max_tokens_budget=1)
    out = t2.run(reqs(4))
    assert [r.status for r in out].count("ok") == 1 and gen_count(h) == 6


def test_missing_api_key_fails_before_any_request(serve, monkeypatch):
    h = serve(api_key="k")
    monkeypatch.delenv("KD_TEST_KEY", raising=False)
    t = APITeacher(h.base_url, "tiny-llama", api_key_env="KD_TEST_KEY")
    with pytest.raises(KDistillError, match="KD_TEST_KEY"):
        t.preflight()
    assert httpx.get(h.base_url + "/stats", headers={"Authorization": "Bearer k"}).json()["requests"] == 1
    monkeypatch.setenv("KD_TEST_KEY", "wrong")
    with pytest.raises(KDistillError, match="rejected the API key"):
        t.preflight()
    monkeypatch.setenv("KD_TEST_KEY", "k")
    assert t.preflight() == ["tiny-llama"]
    assert t.run(reqs(2))[0].ok


def test_unreachable_endpoint_and_wrong_model_fail_early(serve):
    with pytest.raises(KDistillError, match="unreachable"):
        APITeacher(f"http://127.0.0.1:{closed_port()}/v1", "m", timeout=2).preflight()
    h = serve()
    with pytest.raises(KDistillError, match="Did you mean 'tiny-llama'"):
        APITeacher(h.base_url, "tiny-lama").preflight()
    with pytest.raises(KDistillError, match="http"):
        APITeacher("127.0.0.1:8000", "m")


# ---- api_key_env holds a variable's NAME; a token put there by mistake is refused and never echoed

TOKENS = [
    "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",  # Hugging Face
    "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t",  # OpenAI (not a valid variable name: '-')
    "sk_live_51HabcdefghijKLMNOP0123",  # Stripe-like (a valid identifier, known prefix)
    "ghp_1234567890abcdefghijABCDEFGHIJ123456",  # GitHub
    "xoxb-1234-5678-AbCdEfGhIjKl",  # Slack
    "AKIAIOSFODNN7EXAMPLE",  # AWS access key id: upper case, a valid identifier
    "a3f9c2e71b8d4f6a9e0c3b5d7f1a2e4c",  # 32 hex characters, no prefix
    "Zq8x7Lm2Pv9Rt4Ws6Yu1Nb3Kc5Jd0Hg",  # random mixed case
    "my secret key",  # not a variable name
]
NAMES = ["OPENAI_API_KEY", "HF_TOKEN", "KD_TEST_KEY", "hf_token", "AZURE_OPENAI_API_KEY_V2", "_x1"]


@pytest.mark.parametrize("token", TOKENS)
def test_api_teacher_refuses_a_token_without_echoing_it(token):
    with pytest.raises(KDistillError) as e:
        APITeacher("http://127.0.0.1:8000/v1", "m", api_key_env=token)
    msg = str(e.value)
    assert token not in msg and token[:10] not in msg
    assert "secret token" in msg and "OPENAI_API_KEY" in msg


@pytest.mark.parametrize("token", TOKENS)
def test_serve_refuses_a_token_without_echoing_it(token, monkeypatch):
    import kdistill.teachers.serve as srv

    for loader in ("load_served_lm", "load_causal_lm"):  # raising=False: also guards an older serve.py
        monkeypatch.setattr(srv, loader, lambda *a, **k: pytest.fail("loaded before checking the key"), raising=False)
    with pytest.raises(KDistillError) as e:
        srv.serve("smollm2-135m", api_key_env=token)
    assert token not in str(e.value) and token[:10] not in str(e.value) and "secret token" in str(e.value)


@pytest.mark.parametrize("name", NAMES)
def test_variable_names_still_work(name, monkeypatch):
    monkeypatch.setenv(name, "the-key")
    t = APITeacher("http://127.0.0.1:8000/v1", "m", api_key_env=name)
    assert t.api_key() == "the-key"
    monkeypatch.delenv(name)
    with pytest.raises(KDistillError, match=name):  # an unset variable is named: a name is not a secret
        t.api_key()


def test_blackbox_recipe_with_a_token_in_api_key_env_never_echoes_it(tmp_path):
    """`teacher.api_key_env=hf_...` in a recipe: refused (by the config or the teacher), never printed."""
    from kdistill.config import load_config
    from kdistill.tasks.blackbox import run_pipeline

    token = TOKENS[0]
    with pytest.raises(KDistillError) as e:
        cfg = load_config("blackbox/wordnet_supersense", [f"teacher.api_key_env={token}"])
        run_pipeline(cfg, tmp_path, base_url=f"http://127.0.0.1:{closed_port()}/v1", model_name="m")
    assert token not in str(e.value) and token[:10] not in str(e.value)
