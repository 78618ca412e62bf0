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


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; CI and the development machines have none, so they skip there."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
