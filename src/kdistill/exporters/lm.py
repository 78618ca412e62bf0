"""Export a distilled causal LM as a plain Hugging Face folder and check that it reloads identically.

The ``llm`` task already saves each trained student with ``save_pretrained`` (weights + config) and the
tokenizer; :func:`export_lm` copies such a folder (nothing of the method, which never lives in the
model), reloads it with ``AutoModelForCausalLM`` / ``AutoTokenizer`` exactly as a user would, and
compares the logits of a probe sentence with the source model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import KDistillError
from ..models.classifiers import count_params


def is_lm_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and any(p.glob("*.safetensors")) and (
        (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file())


@torch.no_grad()
def export_lm(source: str | Path, out: str | Path, *,
              probe_text: str = "In the beginning God created") -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, dst = Path(source), Path(out)
    if (src / "adapter_config.json").is_file() and not (src / "config.json").is_file():
        raise KDistillError(f"export: {str(src)!r} holds LoRA adapters only (adapter_config.json), not a model; "
                            "expected a full Hugging Face folder. Fix: export the run folder (the llm task saves "
                            "LoRA students merged), or merge first: PeftModel.from_pretrained(base, "
                            "ADAPTERS).merge_and_unload().save_pretrained(OUT).")
    if not is_lm_folder(src):
        raise KDistillError(f"export: {str(src)!r} is not a Hugging Face causal-LM folder (config.json, *.safetensors, "
                            "tokenizer files); expected <run>/student from an llm run.")
    if dst.resolve() == src.resolve():
        raise KDistillError("export: --out is the source folder; expected a different destination.")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    tok = AutoTokenizer.from_pretrained(src)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    again = AutoModelForCausalLM.from_pretrained(dst).eval()
    tok2 = AutoTokenizer.from_pretrained(dst)
    ids = torch.tensor([tok(probe_text, add_special_tokens=False)["input_ids"]])
    ids2 = torch.tensor([tok2(probe_text, add_special_tokens=False)["input_ids"]])
    if not torch.equal(ids, ids2):
        raise KDistillError("export: the exported tokenizer encodes the probe text differently; export aborted.")
    diff = float((model(input_ids=ids).logits - again(input_ids=ids2).logits).abs().max())
    if diff > 1e-5:
        raise KDistillError(f"export: reloaded model differs from the source (max |logit diff| {diff:.3g}).")
    return {"source": str(src), "out": str(dst), "format": "huggingface", "params": count_params(again),
            "max_abs_logit_diff": diff}
