"""Structured pruning of a Llama-family causal LM from activation importance on calibration batches.

Width, after Minitron ("Compact Language Models via Pruning and Knowledge Distillation", Muralidharan et al.,
2024): one forward pass of the full model over a few calibration batches of the training data gives, averaged
over the counted tokens (``attention_mask == 1``),

* **attention heads**: the L2 norm of each query head's attention output (the input of ``o_proj``, one
  ``head_dim`` slice per head), per layer;
* **MLP channels**: the mean ``|act(gate(x)) * up(x)|`` of each intermediate channel (the input of
  ``down_proj``), per layer;
* **hidden (embedding) channels**: the mean ``|y|`` of each channel of every RMSNorm output (both norms of every
  layer and the final norm), summed over the norms: one ranking shared by the whole model.

Depth, after ShortGPT ("ShortGPT: Layers in Large Language Models are More Redundant Than You Expect", Men et
al., 2024): the **Block Influence** of a decoder layer is ``1 - cos(x_in, x_out)`` averaged over the counted
tokens; the layers with the lowest influence are removed.

All four scores come from the same pass over the unpruned model. The kept units are copied: per kept query head
its rows of ``q_proj`` and columns of ``o_proj``; per kept KV head its rows of ``k_proj`` / ``v_proj``; per kept
MLP channel its rows of ``gate_proj`` / ``up_proj`` and column of ``down_proj``; per kept hidden channel its
column of the embeddings, of every projection that reads the residual stream and of the LM head, its row of
every projection that writes it, and its entry of every norm. ``head_dim`` is kept (and written into the
config), so the rotary embedding is unchanged.

Grouped-query attention (``num_key_value_heads < num_attention_heads``, ``q`` query heads per KV head):
``heads`` a multiple of ``num_key_value_heads`` keeps every KV head and the best ``heads / num_key_value_heads``
query heads of each group; otherwise ``heads`` must be a multiple of ``q`` and whole KV groups (a KV head with
its ``q`` query heads, ranked by their summed importance) are removed. Plain multi-head attention is the case
``q = 1``: a removed head takes its query, key and value with it.

``target_params``: the axes not given explicitly among ``heads``, ``intermediate_size`` and ``hidden_size``
shrink by one common factor ``s`` (heads rounded to the nearest valid count, ``hidden_size`` to a multiple of the
head count, which transformers' Llama config requires, ``intermediate_size`` to an integer), ``s`` being the largest
for which the exact parameter count (counted on a meta-device copy of the new config) is ``<= target_params``. The
axes are then fixed coarsest step first: heads at that ``s``; ``hidden_size`` at the ``s`` re-fitted with the heads
fixed; ``intermediate_size`` at the ``s`` re-fitted with both fixed (so the steps of the coarse axes leave no gap).
Depth is pruned only when ``num_layers`` is given (Minitron found width pruning better than depth pruning at equal
size).
The result never exceeds ``target_params``; how far below it lands depends on the integer sizes (tested: within 3%
on a tiny Llama, where one MLP channel is ~0.2% of the model).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import KDistillError

#: model types whose module layout (model.layers[i].self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, RMSNorms)
#: this pruner handles and is tested on
SUPPORTED = ("llama",)


@dataclass
class Importance:
    """Activation importance of a model's units (higher = more important). ``heads``: ``(L, num_heads)``;
    ``channels``: ``(L, intermediate_size)``; ``hidden``: ``(hidden_size,)``; ``blocks``: ``(L,)``."""

    heads: Tensor
    channels: Tensor
    hidden: Tensor
    blocks: Tensor


def _check_arch(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise KDistillError(f"student kind 'pruned': got a {type(model).__name__} (model_type {kind!r}); expected a "
                            f"Llama-family model (model_type in {list(SUPPORTED)}, e.g. the tiny teacher or "
                            "SmolLM2). Fix: use student kind layer_subset or smaller_config for this architecture.")
    return config


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


@torch.no_grad()
def compute_importance(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> Importance:
    """Head, MLP-channel, hidden-channel and block importance of ``model`` from forward passes over ``batches``
    (dicts with ``input_ids`` and optional ``attention_mask``, ``(B, T)``), see the module docstring."""
    config = _check_arch(model)
    layers = model.model.layers
    L, n, d = len(layers), config.num_attention_heads, _head_dim(config)
    H, inter = config.hidden_size, config.intermediate_size
    heads, channels = torch.zeros(L, n, dtype=torch.float64), torch.zeros(L, inter, dtype=torch.float64)
    hidden, blocks = torch.zeros(H, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    state: dict[str, Any] = {"mask": None, "block_in": [None] * L}

    def masked_sum(x: Tensor) -> Tensor:  # (B, T, ...) -> (...), summed over counted tokens, fp64
        m = state["mask"].to(x.device, torch.float64).reshape(*state["mask"].shape, *([1] * (x.dim() - 2)))
        return (x.double() * m).sum(dim=(0, 1))

    def on_o_proj(i: int):
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0]
            heads[i] += masked_sum(x.float().reshape(*x.shape[:2], n, d).norm(dim=-1)).cpu()
        return hook

    def on_down_proj(i: int):
        def hook(_m: nn.Module, args: tuple) -> None:
            channels[i] += masked_sum(args[0].float().abs()).cpu()
        return hook

    def on_norm(_m: nn.Module, _args: tuple, out: Tensor) -> None:
        hidden.add_(masked_sum(out.float().abs()).cpu())

    def on_block_in(i: int):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            state["block_in"][i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def on_block_out(i: int):
        def hook(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(state["block_in"][i].float(), y.float(), dim=-1)
            blocks[i] += masked_sum(1.0 - cos).cpu()
        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)))
            handles.append(layer.input_layernorm.register_forward_hook(on_norm))
            handles.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
            handles.append(layer.register_forward_pre_hook(on_block_in(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(on_block_out(i), with_kwargs=True))
        handles.append(model.model.norm.register_forward_hook(on_norm))
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        tokens = 0.0
        for batch in batches:
            ids = batch["input_ids"].to(device)
            attn = batch.get("attention_mask")
            attn = torch.ones_like(ids) if attn is None else attn.to(device)
            state["mask"] = attn.bool()
            tokens += float(attn.sum())
            model.model(input_ids=ids, attention_mask=attn)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise KDistillError("pruning calibration: got no counted tokens (no batches, or every attention_mask is 0); "
                            "expected at least one batch of training text. Fix: give calibration_batches >= 1 and "
                            "non-empty training data.")
    return Importance(heads / tokens, channels / tokens, hidden / tokens, blocks / tokens)


@dataclass
class PrunePlan:
    """What to keep, as indices into the unpruned model (all sorted): ``layers``; per kept layer its query
    heads ``heads[j]``, KV heads ``kv_heads[j]`` and MLP channels ``channels[j]``; ``hidden`` channels."""

    layers: list[int]
    heads: list[list[int]]
    kv_heads: list[list[int]]
    channels: list[list[int]]
    hidden: list[int]


def _top(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, in increasing index order (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def valid_head_counts(config: Any) -> list[int]:
    """Every number of query heads the GQA rule allows (see the module docstring), increasing."""
    n, g = config.num_attention_heads, config.num_key_value_heads
    q = n // g
    return sorted({g * k for k in range(1, q + 1)} | {q * k for k in range(1, g + 1)})


def _head_selection(config: Any, scores: Tensor, heads: int) -> tuple[list[int], list[int]]:
    """``(query heads, KV heads)`` kept in one layer given its ``(num_heads,)`` importance."""
    n, g = config.num_attention_heads, config.num_key_value_heads
    q = n // g
    if heads % g == 0 and g <= heads <= n:  # every KV group stays; the best heads / g query heads of each
        per = heads // g
        kept = [j * q + i for j in range(g) for i in _top(scores[j * q:(j + 1) * q], per)]
        return kept, list(range(g))
    if heads % q == 0 and q <= heads <= n:  # whole KV groups go, with their query heads
        groups = _top(scores.reshape(g, q).sum(-1), heads // q)
        return [j * q + i for j in groups for i in range(q)], groups
    raise KDistillError(f"pruned student heads: got {heads}, expected one of {valid_head_counts(config)} "
                        f"({n} query heads in {g} KV groups: a multiple of {g} keeps every KV group, a multiple of "
                        f"{q} drops whole groups). Fix: pick one of those counts.")


def make_plan(model: nn.Module, importance: Importance, *, num_layers: int | None = None, heads: int | None = None,
              intermediate_size: int | None = None, hidden_size: int | None = None) -> PrunePlan:
    """The units to keep for the given sizes (``None`` = keep that axis whole), by ``importance``."""
    config = _check_arch(model)
    L = config.num_hidden_layers
    for what, got, top in (("num_layers", num_layers, L), ("heads", heads, config.num_attention_heads),
                           ("intermediate_size", intermediate_size, config.intermediate_size),
                           ("hidden_size", hidden_size, config.hidden_size)):
        if got is not None and not (isinstance(got, int) and 1 <= got <= top):
            raise KDistillError(f"pruned student {what}: got {got!r}, expected an integer in [1, {top}] (the "
                                f"unpruned model has {top}). Fix: give a smaller positive size, or leave it out.")
    n_heads, hid = heads or config.num_attention_heads, hidden_size or config.hidden_size
    if hid % n_heads:
        raise KDistillError(f"pruned student hidden_size: got {hid} with {n_heads} heads; expected a multiple of the "
                            "head count (transformers' Llama config requires it). Fix: give hidden_size = "
                            f"{max(n_heads, hid - hid % n_heads)}, or another head count.")
    layers = _top(importance.blocks, num_layers or L)
    sel = [_head_selection(config, importance.heads[i], heads or config.num_attention_heads) for i in layers]
    inter = intermediate_size or config.intermediate_size
    return PrunePlan(layers=layers, heads=[s[0] for s in sel], kv_heads=[s[1] for s in sel],
                     channels=[_top(importance.channels[i], inter) for i in layers],
                     hidden=_top(importance.hidden, hidden_size or config.hidden_size))


def _pruned_config(config: Any, *, layers: int, heads: int, kv_heads: int, intermediate_size: int,
                   hidden_size: int) -> Any:
    new = copy.deepcopy(config)
    total = config.num_hidden_layers
    new.head_dim = _head_dim(config)
    new.num_hidden_layers, new.num_attention_heads, new.num_key_value_heads = layers, heads, kv_heads
    new.intermediate_size, new.hidden_size = intermediate_size, hidden_size
    return new, total


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """A new model of ``model``'s class holding only the units in ``plan`` (weights copied, ``model`` untouched)
    with a consistent config, so ``save_pretrained`` / ``from_pretrained`` round-trip it."""
    config = _check_arch(model)
    d = _head_dim(config)
    if len({len(h) for h in plan.heads}) != 1 or len({len(c) for c in plan.channels}) != 1 \
            or len({len(k) for k in plan.kv_heads}) != 1:
        raise KDistillError("pruning plan: got different head or channel counts per layer; expected the same count "
                            "in every kept layer (a Hugging Face config has one size per axis).")
    new, total = _pruned_config(config, layers=len(plan.layers), heads=len(plan.heads[0]),
                                kv_heads=len(plan.kv_heads[0]), intermediate_size=len(plan.channels[0]),
                                hidden_size=len(plan.hidden))
    per_layer = getattr(new, "layer_types", None)
    if isinstance(per_layer, list) and len(per_layer) == total:
        new.layer_types = [per_layer[i] for i in plan.layers]
    src = model.state_dict()
    E = torch.tensor(plan.hidden)

    def rows_of(units: Sequence[int]) -> Tensor:  # the head_dim rows of each kept head
        return torch.tensor([u * d + k for u in units for k in range(d)], dtype=torch.long)

    out: dict[str, Tensor] = {}
    for key, w in src.items():
        if key.startswith("model.layers."):
            continue
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            out[key] = w[:, E]
        elif key == "model.norm.weight":
            out[key] = w[E]
        else:
            raise KDistillError(f"pruning: unexpected weight {key!r} in a {type(model).__name__}; expected the Llama "
                                "layout (embeddings, layers, final norm, LM head). This model is not supported.")
    for j, i in enumerate(plan.layers):
        p, s = f"model.layers.{i}.", f"model.layers.{j}."
        Q, KV, C = rows_of(plan.heads[j]), rows_of(plan.kv_heads[j]), torch.tensor(plan.channels[j])
        rows = {"self_attn.q_proj": Q, "self_attn.k_proj": KV, "self_attn.v_proj": KV, "self_attn.o_proj": E,
                "mlp.gate_proj": C, "mlp.up_proj": C, "mlp.down_proj": E}
        cols = {"self_attn.q_proj": E, "self_attn.k_proj": E, "self_attn.v_proj": E, "self_attn.o_proj": Q,
                "mlp.gate_proj": E, "mlp.up_proj": E, "mlp.down_proj": C}
        for key, w in src.items():
            if not key.startswith(p):
                continue
            name = key[len(p):]
            module, _, leaf = name.rpartition(".")
            if module in rows and leaf == "weight":
                out[s + name] = w[rows[module]][:, cols[module]]
            elif module in rows and leaf == "bias":
                out[s + name] = w[rows[module]]
            elif module in ("input_layernorm", "post_attention_layernorm") and leaf == "weight":
                out[s + name] = w[E]
            else:
                raise KDistillError(f"pruning: unexpected weight {key!r}; expected the Llama layer layout. This "
                                    "model is not supported.")
    student = type(model)(new)
    missing, unexpected = student.load_state_dict({k: v.clone() for k, v in out.items()}, strict=False)
    tied = {k for k in missing if k == "lm_head.weight"} if getattr(new, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise KDistillError(f"pruning: weights did not map cleanly (missing {sorted(set(missing) - tied)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]}); this architecture is not supported.")
    if hasattr(student, "tie_weights"):
        student.tie_weights()
    student.to(next(model.parameters()).dtype)
    student.train(model.training)
    student.kdistill_pruned = {"layers": plan.layers, "heads": len(plan.heads[0]), "kv_heads": len(plan.kv_heads[0]),
                               "intermediate_size": len(plan.channels[0]), "hidden_size": len(plan.hidden)}
    return student


def count_config_params(model_cls: type, config: Any) -> int:
    """Exact parameter count of ``model_cls(config)``, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        m = model_cls(config)
    seen: set[int] = set()
    total = 0
    for p in m.parameters():  # tied weights count once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def sizes_for_target(model: nn.Module, target_params: int, *, num_layers: int | None = None,
                     heads: int | None = None, intermediate_size: int | None = None,
                     hidden_size: int | None = None) -> dict[str, int]:
    """The per-axis sizes for ``target_params`` by the rule of the module docstring (the given axes fixed, the
    others shrunk by one common factor, the largest whose count is <= ``target_params``, and fixed coarsest first)."""
    config = _check_arch(model)
    counts = valid_head_counts(config)
    fixed: dict[str, int | None] = {"num_layers": num_layers or config.num_hidden_layers, "heads": heads,
                                    "hidden_size": hidden_size, "intermediate_size": intermediate_size}

    def sizes(s: float) -> dict[str, int]:
        h = fixed["heads"] or min(counts, key=lambda c: (abs(c - s * config.num_attention_heads), c))
        # transformers' Llama config wants hidden_size to be a multiple of the head count
        hid = fixed["hidden_size"] or h * max(1, round(s * config.hidden_size / h))
        return {"num_layers": fixed["num_layers"], "heads": h, "hidden_size": hid,
                "intermediate_size": fixed["intermediate_size"] or max(1, round(s * config.intermediate_size))}

    def count(sz: dict[str, int]) -> int:
        g, q = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
        kv = g if sz["heads"] % g == 0 else sz["heads"] // q
        new, _ = _pruned_config(config, layers=sz["num_layers"], heads=sz["heads"], kv_heads=kv,
                                intermediate_size=sz["intermediate_size"], hidden_size=sz["hidden_size"])
        return count_config_params(type(model), new)

    full, smallest = count(sizes(1.0)), count(sizes(0.0))
    if not isinstance(target_params, int) or not smallest <= target_params:
        raise KDistillError(f"pruned student target_params: got {target_params!r}, expected an integer >= "
                            f"{smallest:,} (the smallest model these axes can reach: 1 channel, the fewest heads"
                            f"{'' if num_layers is None else f', {num_layers} layers'}). Fix: raise target_params, "
                            "or lower num_layers.")
    if target_params >= full:
        raise KDistillError(f"pruned student target_params: got {target_params:,}, expected fewer than {full:,} (the "
                            "model with the given axes and the others unpruned). Fix: lower target_params, or give "
                            "per-axis sizes instead.")

    def largest_fitting() -> float:
        lo, hi = 0.0, 1.0
        for _ in range(40):  # the count is non-decreasing in s: bisect for the largest s that fits
            mid = (lo + hi) / 2
            if count(sizes(mid)) <= target_params:
                lo = mid
            else:
                hi = mid
        return lo

    for axis in ("heads", "hidden_size", "intermediate_size"):  # coarsest steps first, then re-fit the rest
        if fixed[axis] is None:
            fixed[axis] = sizes(largest_fitting())[axis]
    return sizes(1.0)


def prune_lm(model: nn.Module, batches: Iterable[dict[str, Tensor]], *, target_params: int | None = None,
             num_layers: int | None = None, heads: int | None = None, intermediate_size: int | None = None,
             hidden_size: int | None = None) -> nn.Module:
    """A pruned copy of a Llama-family ``model``: importance from ``batches`` (:func:`compute_importance`), then
    the given per-axis sizes, or the sizes for ``target_params`` (:func:`sizes_for_target`)."""
    _check_arch(model)
    if target_params is None and all(v is None for v in (num_layers, heads, intermediate_size, hidden_size)):
        raise KDistillError("pruned student: got no size; expected target_params or at least one of num_layers, "
                            "heads, intermediate_size, hidden_size. Fix: e.g. `student: {kind: pruned, "
                            "target_params: 60000000}`.")
    sizes = {"num_layers": num_layers, "heads": heads, "intermediate_size": intermediate_size,
             "hidden_size": hidden_size}
    if target_params is not None:
        sizes = sizes_for_target(model, target_params, **sizes)
    importance = _remembered_importance(model, list(batches))
    student = apply_plan(model, make_plan(model, importance, **sizes))
    student.kdistill_importance = importance
    return student


def _remembered_importance(model: nn.Module, batches: list[dict[str, Tensor]]) -> Importance:
    """:func:`compute_importance`, kept on the model for the same calibration rows: a run builds its pruned student
    for the vocabulary probe and again for every phase, and the teacher forwards are the costly part."""
    h = hashlib.sha256()
    for b in batches:
        for key in ("input_ids", "attention_mask"):
            if key in b:
                h.update(key.encode() + b[key].detach().cpu().contiguous().numpy().tobytes())
    memo = model.__dict__.get("_kdistill_importance")
    if memo is not None and memo[0] == h.hexdigest():
        return memo[1]
    importance = compute_importance(model, batches)
    model.__dict__["_kdistill_importance"] = (h.hexdigest(), importance)  # not a parameter, buffer or submodule
    return importance


def calibration_batches(dataset: Any, *, num_batches: int, batch_size: int) -> list[dict[str, Tensor]]:
    """``num_batches`` batches of ``input_ids`` / ``attention_mask`` from rows spread evenly over ``dataset``
    (items are dicts of tensors; the same rows every call, so the baseline and the student prune alike)."""
    if not (isinstance(num_batches, int) and num_batches >= 1):
        raise KDistillError(f"student.calibration_batches: got {num_batches!r}, expected an integer >= 1.")
    n = len(dataset)
    want = min(n, num_batches * batch_size)
    idx = sorted({math.floor(i * n / want) for i in range(want)})
    rows = [dataset[i] for i in idx]
    out = []
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        ids = torch.stack([r["input_ids"] for r in chunk])
        attn = torch.stack([r["attention_mask"] for r in chunk]) if "attention_mask" in chunk[0] \
            else torch.ones_like(ids)
        out.append({"input_ids": ids, "attention_mask": attn})
    return out
