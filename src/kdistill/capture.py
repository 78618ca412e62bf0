"""Forward-hook feature capture as a context manager that always removes its hooks."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import unknown_name

#: attribute names under which wrappers keep the module they wrap: FSDP1 (``FullyShardedDataParallel``), activation
#: checkpointing (``CheckpointWrapper``) and ``torch.compile`` (``OptimizedModule``). They appear as path segments in
#: ``named_modules()`` of a model whose *submodules* were wrapped (FSDP1's auto-wrap policy, per-layer compile).
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def unwrap(model: nn.Module) -> nn.Module:
    """The model a user built, inside the wrappers around it, stripped repeatedly: ``torch.compile``
    (``._orig_mod``), ``DistributedDataParallel`` / ``DataParallel`` and FSDP1's ``FullyShardedDataParallel``
    (``.module``). FSDP2 (``fully_shard``) wraps nothing: it swaps the module's class for a subclass of it (e.g.
    ``FSDPLlamaForCausalLM``) and keeps every submodule name, so such a module is returned as it is."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel, *_fsdp1())):
            model = model.module
        else:
            return model


def _fsdp1() -> tuple[type, ...]:
    """FSDP1's wrapper class, looked up without importing ``torch.distributed.fsdp`` (half a second): a model wrapped
    in it implies the module is loaded."""
    mod = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    cls = getattr(mod, "FullyShardedDataParallel", None)
    return (cls,) if cls is not None else ()


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``name -> submodule`` of the unwrapped model, with the names the model has when nothing wraps it: the
    :data:`WRAPPER_SEGMENTS` that FSDP1 auto-wrapping, activation checkpointing or per-layer compilation put into the
    paths are dropped, and a name that then denotes both a wrapper and what it wraps maps to the wrapped module."""
    out: dict[str, nn.Module] = {}
    for name, module in unwrap(model).named_modules():
        if any(seg in name for seg in WRAPPER_SEGMENTS):
            name = ".".join(p for p in name.split(".") if p not in WRAPPER_SEGMENTS)
        out[name] = module  # a wrapper comes before its child: the innermost module wins
    return out


def device_of(model: nn.Module) -> torch.device:
    """Where a module's weights live (the first parameter or buffer); the CPU for a module with neither (e.g. a
    scikit-learn teacher wrapped as a module). Evaluation inputs are moved here."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def resolve_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Map layer names to submodules of the unwrapped model; unknown names raise with close matches."""
    model = unwrap(model)
    available = named_modules(model)
    out: dict[str, nn.Module] = {}
    for name in names:
        if name not in available:
            raise unknown_name(
                "layer", name, [n for n in available if n],
                f"Layer names come from `model.named_modules()` of {type(model).__name__}.",
            )
        out[name] = available[name]
    return out


def _first_tensor(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]  # HF decoder layers return (hidden_states, ...)
    for attr in ("last_hidden_state", "hidden_states", "logits"):
        value = getattr(output, attr, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"cannot capture a {type(output).__name__} output; expected a Tensor or a tuple of them")


@contextmanager
def capture(model: nn.Module, names: Iterable[str], *, detach: bool = False) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of the named submodules during forward passes inside the ``with`` block.

    >>> with capture(model, ["blocks.1"]) as feats:
    ...     model(x)
    >>> feats["blocks.1"].shape

    Hooks are registered on the unwrapped model and removed on exit, even when the block raises.
    With ``detach=True`` (used for the teacher) the stored tensors are detached.
    """
    names = list(names)
    if not names:  # the common case (logit-only methods): no module walk on the hot path
        yield {}
        return
    modules = resolve_modules(model, names)
    store: dict[str, Tensor] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            t = _first_tensor(output)
            store[name] = t.detach() if detach else t

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- attention layers

#: child names of a self-attention module's query / key / value projections: Llama-family decoders
#: (``model.layers.N.self_attn.{q,k,v}_proj``) and BERT-family encoders (``encoder.layer.N.attention.self.{query,key,
#: value}``). Fused projections (GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``) are not split here.
QKV_CHILDREN = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))


@dataclass(frozen=True)
class AttentionLayer:
    """One self-attention module found by :func:`attention_layers`: its name, the names to hook for its
    query / key / value projections (outputs ``(B, T, heads * head_dim)``), the transformer block (layer) that holds
    it, and its per-head width (None when the module and the model config do not say)."""

    path: str
    block: str
    q: str
    k: str
    v: str
    head_dim: int | None

    @property
    def stack(self) -> str:
        """The layer list the block belongs to (``model.layers`` for ``model.layers.3``)."""
        return self.block.rsplit(".", 1)[0] if "." in self.block else ""


def _config_head_dim(model: nn.Module) -> int | None:
    for m in model.modules():
        cfg = getattr(m, "config", None)
        heads = getattr(cfg, "num_attention_heads", None)
        if heads:
            return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return None


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The self-attention modules of a transformer in forward order (``named_modules`` order): every module whose
    children include one of :data:`QKV_CHILDREN` (cross-attention modules are skipped). Empty for a model without
    separate q/k/v projections."""
    model = unwrap(model)
    modules = named_modules(model)
    fallback = _config_head_dim(model)
    found: list[AttentionLayer] = []
    for name, module in modules.items():
        if "cross" in name.lower():
            continue
        prefix = f"{name}." if name else ""
        for q, k, v in QKV_CHILDREN:
            if all(prefix + c in modules for c in (q, k, v)):
                m = re.match(r"^(.*\.\d+)(\.|$)", name)
                block = m.group(1) if m else (name.rsplit(".", 1)[0] if "." in name else name)
                hd = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None) or fallback
                found.append(AttentionLayer(name, block, prefix + q, prefix + k, prefix + v,
                                            int(hd) if hd else None))
                break
    return found
