"""Causal-LM students: a layer-subset copy of the teacher, or a fresh smaller config on its tokenizer.

Both return an ordinary Hugging Face ``PreTrainedModel`` with a consistent config, so
``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` round-trip it and the teacher's tokenizer
works unchanged (same vocabulary, same ids).

* :func:`layer_subset_copy` keeps some decoder layers of the teacher (``keep_layers=[0, 6, 12, ...]`` or
  ``num_layers=6`` evenly spaced, first and last included) with their weights, plus the embeddings,
  final norm and LM head. DistilBERT-style initialisation (Sanh et al., 2019) applied to decoders.
* :func:`smaller_config_student` builds a randomly initialised model of the same architecture with
  fewer / narrower layers and the same vocabulary size, or sized to a tokenizer of its own
  (:func:`student_tokenizer`: a folder / hub id, or a BPE trained on the corpus).
* ``kind="pruned"``: structured width / depth pruning from activation importance
  (:mod:`kdistill.students.pruning`, Minitron and ShortGPT).
* :func:`apply_lora` puts LoRA adapters on any of these ("LoRA: Low-Rank Adaptation of Large Language Models",
  Hu et al., 2021): only the adapters (and optionally the norms) train; :func:`plain_student` merges them back
  into a plain Hugging Face model before saving.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import KDistillError

#: where the decoder layer list lives in common Hugging Face causal LMs, and its config field
_LAYER_PATHS = (
    ("model.layers", "num_hidden_layers"),        # Llama, Mistral, Qwen2, Gemma, Phi-3, SmolLM
    ("transformer.h", "n_layer"),                 # GPT-2, GPT-J, Bloom(n_layer)
    ("gpt_neox.layers", "num_hidden_layers"),     # Pythia / GPT-NeoX
    ("model.decoder.layers", "num_hidden_layers"),  # OPT
)


def _get(model: nn.Module, dotted: str) -> Any:
    cur: Any = model
    for part in dotted.split("."):
        cur = getattr(cur, part, None)
        if cur is None:
            return None
    return cur


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList, str]:
    """``(path, layer list, config field)`` of a Hugging Face causal LM's decoder blocks."""
    for path, field in _LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList):
            return path, layers, field
    raise KDistillError(
        f"cannot find the decoder layers of a {type(model).__name__}; expected one of "
        f"{', '.join(p for p, _ in _LAYER_PATHS)}. Fix: pass a Llama/Mistral/Qwen/GPT-2/NeoX-style model, or "
        "build the student with smaller_config_student().")


def evenly_spaced(total: int, num_layers: int) -> list[int]:
    """``num_layers`` indices in ``[0, total)``, evenly spaced, first and last included."""
    if not (isinstance(num_layers, int) and 1 <= num_layers <= total):
        raise KDistillError(f"num_layers: got {num_layers!r}, expected an integer in [1, {total}] "
                            "(the teacher's number of layers).")
    if num_layers == 1:
        return [0]
    return [round(i * (total - 1) / (num_layers - 1)) for i in range(num_layers)]


def layer_subset_copy(teacher: nn.Module, *, keep_layers: Sequence[int] | None = None,
                      num_layers: int | None = None) -> nn.Module:
    """A copy of ``teacher`` keeping only some decoder layers (weights copied, teacher untouched)."""
    path, layers, field = decoder_layers(teacher)
    total = len(layers)
    if (keep_layers is None) == (num_layers is None):
        raise KDistillError("layer_subset_copy: give exactly one of keep_layers (e.g. [0, 6, 12]) or num_layers "
                            f"(evenly spaced); got keep_layers={keep_layers!r}, num_layers={num_layers!r}.")
    keep = list(keep_layers) if keep_layers is not None else evenly_spaced(total, int(num_layers))
    if not keep or any(not isinstance(i, int) or not 0 <= i < total for i in keep) or len(set(keep)) != len(keep):
        raise KDistillError(f"keep_layers: got {keep!r}, expected distinct integers in [0, {total - 1}] "
                            f"(the teacher has {total} layers).")
    if keep != sorted(keep):
        raise KDistillError(f"keep_layers: got {keep!r}, expected increasing order (layers run in sequence).")
    config = copy.deepcopy(teacher.config)
    setattr(config, field, len(keep))
    for attr in ("layer_types",):  # per-layer settings (e.g. sliding vs full attention) follow the kept layers
        per_layer = getattr(config, attr, None)
        if isinstance(per_layer, list) and len(per_layer) == total:
            setattr(config, attr, [per_layer[i] for i in keep])
    student = type(teacher)(config)
    src = teacher.state_dict()
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.(.*)$")
    new_index = {old: new for new, old in enumerate(keep)}
    mapped: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        m = pattern.match(key)
        if m:
            old = int(m.group(1))
            if old in new_index:
                mapped[f"{path}.{new_index[old]}.{m.group(2)}"] = value
        else:
            mapped[key] = value
    missing, unexpected = student.load_state_dict(mapped, strict=False)
    tied = ({k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False)
            else set())
    if set(missing) - tied or unexpected:
        raise KDistillError("layer_subset_copy: weights did not map cleanly "
                            f"(missing {sorted(set(missing) - tied)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]}); this architecture is not supported yet.")
    if hasattr(student, "tie_weights"):
        student.tie_weights()
    student.to(next(teacher.parameters()).dtype)
    student.kdistill_kept_layers = keep  # provenance, for reports
    return student


def smaller_config_student(teacher_or_config: Any, *, seed: int = 0, tokenizer: Any | None = None,
                           **overrides: Any) -> nn.Module:
    """A freshly initialised causal LM of the teacher's architecture with ``overrides`` applied to its
    config (e.g. ``num_hidden_layers=4, hidden_size=256, intermediate_size=768``); the vocabulary size is
    kept so that the teacher's tokenizer is reused as is -- or, with the student's own ``tokenizer``, sized to it
    (``vocab_size = len(tokenizer)``, its pad / bos / eos ids)."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    config = teacher_or_config if isinstance(teacher_or_config, PretrainedConfig) else teacher_or_config.config
    config = copy.deepcopy(config)
    if tokenizer is not None:
        if "vocab_size" in overrides:
            raise KDistillError(f"smaller_config_student: got vocab_size {overrides['vocab_size']} and the student's "
                                "own tokenizer; expected the vocabulary size to come from the tokenizer "
                                f"({len(tokenizer)}). Fix: remove vocab_size from student.config.")
        config.vocab_size = len(tokenizer)
        for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
            setattr(config, attr, getattr(tokenizer, attr, None))
    elif "vocab_size" in overrides and overrides["vocab_size"] != config.vocab_size:
        raise KDistillError(f"smaller_config_student: vocab_size {overrides['vocab_size']} differs from the teacher's "
                            f"{config.vocab_size}; expected the same vocabulary so the tokenizer is shared. Remove it.")
    for key, value in overrides.items():
        if not hasattr(config, key):
            from ..errors import close_matches
            m = close_matches(key, [k for k in config.to_dict() if not k.startswith("_")])
            hint = f" Did you mean {' or '.join(repr(x) for x in m)}?" if m else ""
            raise KDistillError(f"smaller_config_student: {type(config).__name__} has no field {key!r}.{hint}")
        setattr(config, key, value)
    total = getattr(config, "num_hidden_layers", None)
    per_layer = getattr(config, "layer_types", None)
    if isinstance(per_layer, list) and total is not None and len(per_layer) != total:
        config.layer_types = [per_layer[min(i, len(per_layer) - 1)] for i in range(total)]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def build_lm_student(teacher: nn.Module, *, kind: str = "layer_subset", num_layers: int | None = None,
                     keep_layers: Sequence[int] | None = None, config: dict[str, Any] | None = None,
                     pretrained: str | None = None, dtype: str = "float32", seed: int = 0,
                     prune: dict[str, Any] | None = None, calibration: Sequence[dict[str, Any]] | None = None,
                     lora: dict[str, Any] | None = None, fused_head: bool = False, tokenizer: Any | None = None
                     ) -> tuple[nn.Module, Any | None]:
    """The student at its initial weights (the same every call for the same ``seed``), and a pretrained student's
    own tokenizer (to be checked against the teacher's; None when the student is built from the teacher and shares
    its tokenizer). ``kind``: ``layer_subset`` (:func:`layer_subset_copy`), ``smaller_config``
    (:func:`smaller_config_student` with ``config`` overrides), ``pruned`` (:func:`kdistill.students.pruning.prune_lm`
    with the ``prune`` sizes, importance from the ``calibration`` batches) or ``pretrained`` (a zoo name, folder or
    hub id loaded at ``dtype``). ``lora``: the keyword arguments of :func:`apply_lora`, applied on top of any kind
    (``fused_head``: the training method reads the LM head's weight directly). A teacher mixture's student is built
    from its first teacher. ``tokenizer``: the student's own tokenizer (kind ``smaller_config`` only; the model is
    sized to it and it is returned as the student's tokenizer)."""
    torch.manual_seed(seed)
    tok = None
    source = getattr(teacher, "base", teacher)
    if tokenizer is not None and kind != "smaller_config":
        raise KDistillError(f"student.tokenizer: got one with kind {kind!r}; expected kind 'smaller_config' (a fresh "
                            "model sized to the tokenizer). layer_subset and pruned students keep the teacher's "
                            "embeddings and so its tokenizer; a pretrained student brings its own. Fix: remove "
                            "student.tokenizer, or set kind: smaller_config.")
    if kind == "pretrained":
        from ..teachers.lm import load_causal_lm

        if pretrained is None:
            raise KDistillError("student: kind 'pretrained' needs `pretrained:` (a zoo name, model folder or hub "
                                "id); got none.")
        student, tok = load_causal_lm(pretrained, dtype=dtype, eval_mode=False)
    elif kind == "layer_subset":
        student = layer_subset_copy(source, keep_layers=keep_layers, num_layers=num_layers)
    elif kind == "smaller_config":
        student = smaller_config_student(source, seed=seed, tokenizer=tokenizer, **(config or {}))
        tok = tokenizer
    elif kind == "pruned":
        from .pruning import prune_lm

        if not calibration:
            raise KDistillError("student kind 'pruned': got no calibration batches; expected batches of training "
                                "text (input_ids, attention_mask) to measure importance on. Fix: pass "
                                "calibration=[...] (the llm task passes student.calibration_batches of its data).")
        student = prune_lm(source, calibration, **(prune or {}))
    else:
        raise KDistillError(f"student.kind: got {kind!r}, expected one of layer_subset, smaller_config, pruned, "
                            "pretrained.")
    if lora is not None:
        if kind == "smaller_config":
            raise KDistillError("student.lora: got kind 'smaller_config', a randomly initialised model; expected a "
                                "student with useful weights (layer_subset, pruned, pretrained), since LoRA freezes "
                                "them. Fix: remove `lora:` or pick another kind.")
        student = apply_lora(student, fused_head=fused_head, **lora)
    return student, tok


def student_tokenizer(source: str | None = None, *, train_bpe_vocab_size: int | None = None,
                      texts: Any = ()) -> Any:
    """The student's own tokenizer: loaded from ``source`` (a zoo name, folder or hub id), or a byte-level BPE of
    ``train_bpe_vocab_size`` tokens trained on ``texts`` (:func:`kdistill.teachers.tiny.train_tokenizer`)."""
    if (source is None) == (train_bpe_vocab_size is None):
        raise KDistillError(f"student.tokenizer: got source {source!r} and train_bpe vocab_size "
                            f"{train_bpe_vocab_size!r}; expected exactly one (a path / hub id, or "
                            "{train_bpe: {vocab_size: N}}).")
    if source is not None:
        from ..teachers.lm import load_tokenizer

        return load_tokenizer(source)
    from ..teachers.tiny import train_tokenizer

    return train_tokenizer(texts, vocab_size=int(train_bpe_vocab_size))


def _is_lora_layer(module: Any) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def apply_lora(model: nn.Module, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: str | Sequence[str] = "all-linear", train_norms: bool = False,
               fused_head: bool = False) -> nn.Module:
    """``model`` with LoRA adapters through ``peft`` ("LoRA: Low-Rank Adaptation of Large Language Models", Hu et
    al., 2021): each targeted weight ``W`` acts as ``W + (alpha / r) B A`` with ``A`` ``(r, in)`` and ``B``
    ``(out, r)`` (``B`` starts at zero, so the wrapped model starts equal to ``model``). Every base weight is frozen;
    only ``A`` and ``B`` train, plus the weights of every norm layer when ``train_norms``. ``target_modules``:
    ``"all-linear"`` (every linear layer but the LM head) or module names (``[q_proj, v_proj]``).

    Refused: an adapter on the LM head when ``fused_head`` (such a method reads the head's base weight directly,
    so the adapter would not act in training), and an adapter on the embeddings or the LM head of a model whose
    two are tied (merging it would change the other one too)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise KDistillError("student.lora needs the `peft` package; it is not installed. Fix: pip install "
                            "'kdistill[llm]' (or pip install peft).") from None
    if not (isinstance(r, int) and r >= 1):
        raise KDistillError(f"student.lora.r: got {r!r}, expected an integer >= 1 (the adapter rank, e.g. 8).")
    if not 0.0 <= float(dropout) < 1.0:
        raise KDistillError(f"student.lora.dropout: got {dropout!r}, expected a number in [0, 1).")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise KDistillError("student.lora.target_modules: got an empty list; expected 'all-linear' or module names "
                            "such as [q_proj, v_proj].")
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))})
    if isinstance(targets, list):
        from ..errors import close_matches

        for t in targets:
            if t not in names:
                m = close_matches(t, names)
                hint = f" Did you mean {' or '.join(repr(x) for x in m)}?" if m else ""
                raise KDistillError(f"student.lora.target_modules: got {t!r}, which names no linear or embedding "
                                    f"layer of this {type(model).__name__}; expected some of {names}.{hint}")
    cfg = LoraConfig(r=r, lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets,
                     bias="none", task_type="CAUSAL_LM")
    try:
        wrapped = get_peft_model(model, cfg)
    except ValueError as e:  # a target pattern matching nothing, an unsupported layer type
        raise KDistillError(f"student.lora.target_modules: got {targets!r}; peft refused it ({e}). Expected "
                            f"'all-linear' or names among {names}.") from None
    inner = wrapped.get_base_model()
    head, emb = inner.get_output_embeddings(), inner.get_input_embeddings()
    if fused_head and _is_lora_layer(head):
        raise KDistillError(f"student.lora.target_modules: got {targets!r}, which puts an adapter on the LM head, "
                            "but the method reads the LM head's weight directly (fused head), so the adapter would "
                            "not take part in training. Fix: leave the LM head out of target_modules, or configure "
                            "the method without the fused head.")
    if getattr(inner.config, "tie_word_embeddings", False) and (_is_lora_layer(head) or _is_lora_layer(emb)):
        raise KDistillError(f"student.lora.target_modules: got {targets!r}, which puts an adapter on the LM head or "
                            "the input embeddings, and this model ties the two; merging the adapter into the shared "
                            "weight would change the other one as well. Fix: leave embed_tokens / lm_head out of "
                            "target_modules.")
    if train_norms:
        for module in inner.modules():
            if "norm" in type(module).__name__.lower():
                module.requires_grad_(True)
    return wrapped


def is_lora(model: nn.Module) -> bool:
    """True for a ``peft`` model (adapters not merged yet)."""
    return hasattr(model, "merge_and_unload") and hasattr(model, "get_base_model")


def plain_student(model: nn.Module) -> nn.Module:
    """A plain Hugging Face model: a LoRA student's adapters merged into its weights (``merge_and_unload``, in
    place), anything else as it is. What the llm task saves and evaluates."""
    if is_lora(model):
        return model.merge_and_unload()
    return model


def fused_student_output(model: nn.Module, batch: dict[str, Any]) -> Any:
    """Final hidden states and LM head of a Hugging Face causal LM, without computing its logits (for methods
    that build the logits chunk by chunk inside the loss): :func:`kdistill.teachers.lm.fused_head_output` of the
    model (a LoRA student's wrapped transformers model), with the ``softcap`` / ``logit_scale`` of its config. An
    adapter on the LM head is refused (the fused loss reads the head's base weight)."""
    from ..teachers.lm import fused_head_output

    inner = model.get_base_model() if is_lora(model) else model  # peft: the wrapped transformers model
    head = inner.get_output_embeddings()
    if is_lora(model) and _is_lora_layer(head):
        raise KDistillError("fused head: the student's LM head carries a LoRA adapter, which the fused loss would "
                            "skip; expected a plain LM head. Fix: leave lm_head out of student.lora.target_modules.")
    return fused_head_output(inner, batch)
