import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Teachers cached by fingerprint go to a per-session temp folder, never to ~/.cache."""
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "kdistill-cache"))


class Interrupted(RuntimeError):
    """A simulated crash raised by the ``interrupt_at`` fixture's callback."""


@pytest.fixture
def interrupt_at():
    """``interrupt_at(n)`` -> an ``evaluate`` callback for ``fit`` that raises :class:`Interrupted` ("simulated
    crash") on its n-th call; with ``eval_every=1`` that is right after optimizer step n, for resume tests."""

    def make(n):
        calls = [0]

        def evaluate(model):
            calls[0] += 1
            if calls[0] == n:
                raise Interrupted(f"simulated crash at evaluation {n}")
            return {"x": 0.0}

        return evaluate

    return make


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; CI and the development machines have none, so they skip there."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- a tiny random Llama served by `kdistill serve` over loopback (teachers/ and blackbox/ tests)

_TINY_LABELS = ["animal", "plant", "food"]
_TINY_TEXTS = [
    "dog: a domesticated animal that barks", "oak: a tree that is a plant with acorns",
    "bread: a food made from flour and water", "cat: a small animal kept as a pet",
    "fern: a green plant without flowers", "cheese: a food made from milk",
] * 10 + _TINY_LABELS


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random Llama and its BPE tokenizer (trained on a few glosses), saved as a Hugging Face folder."""
    from kdistill.teachers.tiny import build_tiny_lm

    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    lm, tok = build_tiny_lm(_TINY_TEXTS, vocab_size=300)
    lm.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def serve(tiny_lm_dir):
    """serve(**create_app kwargs) -> running ServerHandle on 127.0.0.1:<free port>; stopped at teardown."""
    from kdistill.teachers.serve import ServerHandle, create_app, load_served_lm

    handles = []

    def start(**kw):
        lm, tok, name = load_served_lm(str(tiny_lm_dir))
        h = ServerHandle(create_app(lm, tok, name, **kw), "127.0.0.1", 0)
        handles.append(h)
        return h

    yield start
    for h in handles:
        h.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run many times faster on one thread than on two when the 2 cores are shared with other work
    (``pytestmark = pytest.mark.usefixtures("one_torch_thread")`` in a test module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
