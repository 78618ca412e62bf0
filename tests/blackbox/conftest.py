import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LABELS = ["animal", "plant", "food"]
TEXTS = [
    "dog: a domesticated animal that barks", "oak: a tree that is a plant with acorns",
    "bread: a food made from flour and water", "cat: a small animal kept as a pet",
    "fern: a green plant without flowers", "cheese: a food made from milk",
] * 10 + LABELS


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    from kdistill.teachers.tiny import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny") / "tiny-llama", TEXTS, vocab_size=300)


@pytest.fixture
def serve(tiny_lm_dir):
    """serve(**create_app kwargs) -> running ServerHandle on 127.0.0.1:<free port>; stopped at teardown."""
    from kdistill.teachers.tiny import serve_tiny

    handles = []

    def start(**kw):
        h = serve_tiny(tiny_lm_dir, **kw)
        handles.append(h)
        return h

    yield start
    for h in handles:
        h.stop()
