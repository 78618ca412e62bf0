"""Sentence encoders (teacher or student) and transformer students built from a teacher.

:class:`SentenceEncoder` wraps a Hugging Face encoder (``AutoModel``) with the teacher's tokenizer, a
pooling rule (``mean`` over real tokens or the ``cls`` token), an optional linear projection and optional
L2 normalisation - exactly the pipeline of a sentence-transformers ``Transformer -> Pooling -> (Dense) ->
(Normalize)`` model, so an exported student gives the same vectors in plain sentence-transformers.

Students:

* :func:`layer_subset` - copy of the teacher keeping some of its layers (e.g. 2 of 6), embeddings and
  every kept layer copied (Sanh et al., 2019, "DistilBERT" initialise from every other layer; Sun et
  al., 2019, "Patient Knowledge Distillation"). ``layers=[0, 5]`` keeps the first and last.
* :func:`narrow_encoder` - a narrower/shallower encoder of the same architecture, followed by a learned
  linear projection to the teacher's width; weights initialised by slicing the teacher's (Xu et al., 2023,
  "Initializing Models with Larger Ones") or at random.
* the static student lives in :mod:`kdistill.students.static`.

:func:`load_sentence_encoder` reads a sentence-transformers folder (or a zoo name such as ``"minilm-l6"``,
or a Hugging Face id for online users) and :func:`tiny_encoder` builds a random BERT with a locally
trained WordPiece tokenizer for tests and smoke runs.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capture import device_of
from ..errors import KDistillError, expect
from ..models.classifiers import count_params  # noqa: F401  (re-exported)

POOLING_MODES = ("mean", "cls")


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def mean_pool(token_embeddings: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``(B, T, H)`` token vectors over positions where ``attention_mask`` is 1 -> ``(B, H)``
    (sentence-transformers' rule: divide by ``max(count, 1e-9)``)."""
    m = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    return (token_embeddings * m).sum(1) / m.sum(1).clamp_min(1e-9)


class SentenceEncoder(nn.Module):
    """``backbone -> pooling -> (projection) -> (L2 normalise)``; ``forward`` maps token ids to ``(B, D)``.

    ``tokenizer`` is a fast Hugging Face tokenizer (kept as a plain attribute, not a module).
    """

    def __init__(self, backbone: nn.Module, tokenizer: Any, *, pooling: str = "mean", normalize: bool = True,
                 max_seq_length: int = 256, projection_dim: int | None = None) -> None:
        super().__init__()
        expect(pooling in POOLING_MODES, "pooling", pooling, f"one of {POOLING_MODES}")
        expect(max_seq_length >= 2, "max_seq_length", max_seq_length, "an integer >= 2")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.max_seq_length = int(max_seq_length)
        hidden = int(backbone.config.hidden_size)
        self.projection = nn.Linear(hidden, int(projection_dim)) if projection_dim else None

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def embedding_dim(self) -> int:
        return self.projection.out_features if self.projection is not None else self.hidden_size

    def tokenize(self, sentences: Sequence[str], max_length: int | None = None) -> dict[str, Tensor]:
        """Pad to the longest sentence, truncate to ``max_seq_length`` (as sentence-transformers does)."""
        if isinstance(sentences, str):
            raise KDistillError("tokenize: got a single string, expected a list of sentences; wrap it: [text].")
        enc = self.tokenizer(list(sentences), padding=True, truncation=True,
                             max_length=max_length or self.max_seq_length, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.head(self.backbone(**kwargs).last_hidden_state, attention_mask)

    def head(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """Pooling, projection and normalisation of the backbone's ``(B, T, H)`` token vectors."""
        pooled = mean_pool(tokens, attention_mask) if self.pooling == "mean" else tokens[:, 0]
        if self.projection is not None:
            pooled = self.projection(pooled)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], batch_size: int = 64) -> Tensor:
        """``(N, D)`` float32 CPU embeddings; sentences are sorted by length for speed, output in input order."""
        dev = device_of(self)  # token ids follow the weights
        return _encode_sorted(self, sentences, batch_size,
                              lambda chunk: self(**{k: v.to(dev) for k, v in self.tokenize(chunk).items()}))


def _encode_sorted(model: nn.Module, sentences: Sequence[str], batch_size: int, run) -> Tensor:
    expect(batch_size >= 1, "batch_size", batch_size, "an integer >= 1")
    sentences = list(sentences)
    was = model.training
    model.eval()
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    out: list[Tensor] = []
    for start in range(0, len(order), batch_size):
        chunk = [sentences[i] for i in order[start:start + batch_size]]
        out.append(run(chunk).float().cpu())
    model.train(was)
    if not out:
        return torch.zeros(0, getattr(model, "embedding_dim", 0))
    emb = torch.cat(out)
    result = torch.empty_like(emb)
    result[torch.tensor(order)] = emb
    return result


def trim_padding(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model inputs of a right-padded token batch, cut to its longest real sequence (fixed-width batches
    from the loader would otherwise run every padding column)."""
    length = max(int(batch["attention_mask"].sum(1).max()), 1)
    return {k: batch[k][:, :length] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def encoder_forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The loop's ``student_forward`` for every encoder here: trims padding columns, returns ``(B, D)``."""
    return model(**trim_padding(batch))


def token_forward(model: SentenceEncoder, batch: dict[str, Tensor]) -> Any:
    """Like :func:`encoder_forward` (padding columns trimmed), but also returns the last hidden states:
    ``ModelOutput(logits=(B, D) embeddings, features={"tokens": (B, T, H)}, extra={"attention_mask": (B, T) bool})``
    - what a method's token term reads (``uses_token_states``)."""
    from ..methods.base import ModelOutput

    kwargs = trim_padding(batch)
    tokens = model.backbone(**kwargs).last_hidden_state
    return ModelOutput(logits=model.head(tokens, kwargs["attention_mask"]), features={"tokens": tokens},
                       extra={"attention_mask": kwargs["attention_mask"].bool()})


def training_forwards(teacher: nn.Module, keys: Sequence[str], *, group_size: int = 1,
                      token_states: bool = False) -> tuple[Any, dict[str, Any]]:
    """``(student_forward, teacher arguments of fit)`` for training an encoder on token batches.

    ``group_size = G > 1``: a training row is ``G`` texts (``(R, G, ...)`` tensors: a pair, or a query, its positive
    and its hard negatives), flattened to ``R * G`` texts in row order; the student's output then carries
    ``extra["group_size"] = G`` so a method can find each query's partner and negatives. The teacher's sentence
    embeddings come from the cache in the batch (``teacher_emb``, same layout); with ``token_states`` (a method
    that reads them) the student also returns its last hidden states and the loop runs the teacher live
    (``teacher`` + ``teacher_forward``: frozen, on the loop's device, no gradients) for its own."""
    from ..methods.base import ModelOutput

    expect(isinstance(group_size, int) and group_size >= 1, "group_size", group_size, "an integer >= 1")
    grouped = group_size > 1

    def texts(b: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: (b[k].flatten(0, 1) if grouped else b[k]) for k in keys}

    def cached(b: dict[str, Tensor]) -> Tensor:
        return b["teacher_emb"].flatten(0, 1) if grouped else b["teacher_emb"]

    def layout(out: Any) -> Any:
        if grouped:
            out = out if isinstance(out, ModelOutput) else ModelOutput(logits=out)
            out.extra["group_size"] = group_size
        return out

    teacher_targets = {"teacher_targets": lambda b: ModelOutput(logits=cached(b))}
    if not token_states:
        return (lambda model, b: layout(encoder_forward(model, texts(b)))), teacher_targets

    def teacher_forward(model: SentenceEncoder, b: dict[str, Tensor]) -> ModelOutput:
        out = token_forward(model, texts(b))  # looked up at call time (tests wrap it)
        return ModelOutput(logits=cached(b), features={"tokens": out.features["tokens"]})

    return (lambda model, b: layout(token_forward(model, texts(b)))), {"teacher": teacher,
                                                                       "teacher_forward": teacher_forward}


# ------------------------------------------------------------------------------------------------ loading


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_sentence_encoder(name_or_path: str | Path) -> SentenceEncoder:
    """A sentence-transformers folder, a plain Hugging Face encoder folder (mean pooling, normalised), a
    zoo name (``"minilm-l6"``) or, online, a hub id. Supported modules: Transformer, Pooling (mean/cls),
    one Dense with identity activation, Normalize."""
    _offline_env()
    from transformers import AutoModel, AutoTokenizer

    from .. import zoo

    path = Path(zoo.locate(str(name_or_path))) if str(name_or_path) in zoo.ZOO else Path(name_or_path)
    if not path.exists():
        if str(name_or_path).count("/") == 1 and not str(name_or_path).startswith((".", "/", "~")):
            from huggingface_hub import snapshot_download  # online users; offline this raises

            try:
                path = Path(snapshot_download(str(name_or_path)))
            except Exception as e:  # noqa: BLE001 - report the hub failure with the fix
                raise KDistillError(f"sentence encoder {str(name_or_path)!r}: not a local folder or zoo name, and "
                                    f"the hub download failed ({type(e).__name__}). Offline, use a zoo name "
                                    f"({', '.join(zoo.names('sentence-encoder'))}) or a local folder.") from None
        else:
            raise KDistillError(f"sentence encoder {str(name_or_path)!r}: no such folder and not a zoo name "
                                f"({', '.join(zoo.names('sentence-encoder'))}). Expected a sentence-transformers "
                                "folder or an offline zoo name.")
    modules = _read_json(path / "modules.json") if (path / "modules.json").is_file() else None
    pooling, normalize, dense, st_cfg = "mean", True, None, _read_json(path / "sentence_bert_config.json")
    if modules is not None:
        normalize = False
        for m in modules:
            kind = m["type"].rsplit(".", 1)[-1]
            sub = path / m["path"]
            if kind == "Transformer":
                continue
            if kind == "Pooling":
                cfg = _read_json(sub / "config.json")
                mode = cfg.get("pooling_mode")
                if mode is None:
                    mode = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
                    if cfg.get("pooling_mode_max_tokens") or cfg.get("pooling_mode_mean_sqrt_len_tokens"):
                        mode = "unsupported"
                expect(mode in POOLING_MODES, f"{path} pooling", mode, f"one of {POOLING_MODES}",
                       "Only mean and CLS pooling are supported.")
                pooling = mode
            elif kind == "Dense":
                cfg = _read_json(sub / "config.json")
                act = cfg.get("activation_function", "torch.nn.modules.linear.Identity")
                expect(act.endswith("Identity") and dense is None, f"{path} Dense module", act,
                       "a single Dense module with identity activation")
                dense = sub
            elif kind == "Normalize":
                normalize = True
            else:
                raise KDistillError(f"{path}: module {m['type']!r} is not supported by kdistill's sentence encoder; "
                                    "expected Transformer, Pooling, Dense (identity) and Normalize.")
    backbone = AutoModel.from_pretrained(str(path), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    max_len = int(st_cfg.get("max_seq_length") or min(getattr(tokenizer, "model_max_length", 512), 512))
    enc = SentenceEncoder(backbone, tokenizer, pooling=pooling, normalize=normalize, max_seq_length=max_len)
    if dense is not None:
        from safetensors.torch import load_file

        weights = load_file(str(dense / "model.safetensors"))
        w = weights["linear.weight"]
        enc.projection = nn.Linear(w.shape[1], w.shape[0], bias="linear.bias" in weights)
        enc.projection.load_state_dict({k.removeprefix("linear."): v for k, v in weights.items()})
    return enc.eval()


def load_teacher_encoder(name: str) -> SentenceEncoder:
    """The embedding task's teacher: ``"tiny"`` (a random 4-layer :func:`tiny_encoder`, for tests and smoke
    runs) or anything :func:`load_sentence_encoder` reads."""
    return tiny_encoder(num_layers=4, seed=1) if name == "tiny" else load_sentence_encoder(name)


# ----------------------------------------------------------------------------------------------- students


def _layer_list(backbone: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The ModuleList of transformer layers (``encoder.layer`` for BERT-likes): parent, attribute, list."""
    n = int(backbone.config.num_hidden_layers)
    for name, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            parent_name, _, attr = name.rpartition(".")
            parent = backbone.get_submodule(parent_name) if parent_name else backbone
            return parent, attr, module
    raise KDistillError(f"{type(backbone).__name__}: found no ModuleList of {n} layers; layer_subset supports "
                        "BERT-like encoders (encoder.layer) and models with one list of blocks.")


def set_dropout(backbone: nn.Module, p: float) -> nn.Module:
    """Set every dropout of a transformers backbone to ``p`` (in place; returned for chaining): the
    ``nn.Dropout`` modules, which BERT-likes also read for attention dropout (``self.dropout.p``), and the
    config's dropout fields, so a saved or exported config says what the model trained with."""
    expect(0.0 <= float(p) < 1.0, "dropout", p, "a probability in [0, 1)")
    for module in backbone.modules():
        if isinstance(module, nn.Dropout):
            module.p = float(p)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if isinstance(getattr(backbone.config, key, None), float):
            setattr(backbone.config, key, float(p))
    return backbone


def layer_subset(teacher: SentenceEncoder, layers: Sequence[int], *, freeze_embeddings: bool = False,
                 dropout: float | None = None) -> SentenceEncoder:
    """A student that keeps the teacher's embeddings and the given layers (in that order), same pooling,
    projection and normalisation. The teacher is not modified.

    ``dropout``: train with this dropout instead of the teacher's config value (all of the backbone's dropout
    modules, see :func:`set_dropout`); ``None`` keeps the teacher's.

    ``freeze_embeddings``: keep the token-embedding table fixed at the teacher's values during training
    (``requires_grad = False``; the optimiser skips it). Tokens that never occur in the training texts then
    stay in the same input space as the ones that do, instead of keeping stale rows that the trained layers
    no longer match."""
    n = int(teacher.backbone.config.num_hidden_layers)
    layers = [int(i) for i in layers]
    expect(len(layers) >= 1 and all(-n <= i < n for i in layers), "layer_subset layers", layers,
           f"a non-empty list of layer indices in [0, {n - 1}] (the teacher has {n} layers)")
    layers = [i % n for i in layers]
    expect(len(set(layers)) == len(layers), "layer_subset layers", layers, "distinct indices")
    backbone = copy.deepcopy(teacher.backbone)
    parent, attr, old = _layer_list(backbone)
    setattr(parent, attr, nn.ModuleList([old[i] for i in layers]))
    backbone.config.num_hidden_layers = len(layers)
    for new_idx, layer in enumerate(getattr(parent, attr)):  # keep per-layer indices consistent (caches)
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
    student = SentenceEncoder(backbone, teacher.tokenizer, pooling=teacher.pooling, normalize=teacher.normalize,
                              max_seq_length=teacher.max_seq_length)
    if teacher.projection is not None:
        student.projection = copy.deepcopy(teacher.projection)
    if freeze_embeddings:
        backbone.get_input_embeddings().weight.requires_grad_(False)
    if dropout is not None:
        set_dropout(backbone, dropout)
    return student


def narrow_encoder(teacher: SentenceEncoder, *, hidden_size: int, num_layers: int, num_heads: int | None = None,
                   intermediate_size: int | None = None, init: str = "teacher", seed: int = 0,
                   dropout: float | None = None) -> SentenceEncoder:
    """A narrower encoder of the teacher's architecture plus a learned ``hidden_size -> teacher dim``
    projection (so its vectors live in the teacher's space). ``intermediate_size`` defaults to the teacher's
    feed-forward ratio times ``hidden_size``. ``init="teacher"`` copies the leading slice of every teacher tensor
    (layers spread evenly over the teacher's depth); where a student dimension is larger than the teacher's, the
    part beyond the teacher's keeps its random initialisation. ``"random"`` keeps the config's random
    initialisation throughout. ``dropout``: as in :func:`layer_subset` (``None`` keeps the teacher's)."""
    from transformers import AutoModel

    cfg = copy.deepcopy(teacher.backbone.config)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    num_heads = num_heads or max(1, hidden_size // head_dim)
    expect(hidden_size >= 1 and hidden_size % num_heads == 0, "narrow_encoder hidden_size", hidden_size,
           f"a positive multiple of num_heads={num_heads}")
    expect(num_layers >= 1, "narrow_encoder num_layers", num_layers, "an integer >= 1")
    expect(init in ("teacher", "random"), "narrow_encoder init", init, "'teacher' or 'random'")
    cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads = hidden_size, num_layers, num_heads
    ratio = cfg.intermediate_size / teacher.backbone.config.hidden_size
    cfg.intermediate_size = intermediate_size or max(1, round(ratio * hidden_size))
    torch.manual_seed(seed)
    backbone = AutoModel.from_config(cfg)
    if init == "teacher":
        n_t = int(teacher.backbone.config.num_hidden_layers)
        pick = [round(i * (n_t - 1) / max(num_layers - 1, 1)) for i in range(num_layers)]
        t_state = teacher.backbone.state_dict()
        _, attr_path, _ = _layer_path(teacher.backbone)
        new_state = {}
        for name, value in backbone.state_dict().items():
            src = name
            prefix = attr_path + "."
            if name.startswith(prefix):
                idx, rest = name[len(prefix):].split(".", 1)
                src = f"{prefix}{pick[int(idx)]}.{rest}"
            t = t_state.get(src)
            if t is None or t.dim() != value.dim():
                new_state[name] = value
                continue
            overlap = tuple(slice(0, min(a, b)) for a, b in zip(value.shape, t.shape))
            value = value.clone()
            value[overlap] = t[overlap]
            new_state[name] = value
        backbone.load_state_dict(new_state)
    if dropout is not None:
        set_dropout(backbone, dropout)
    student = SentenceEncoder(backbone, teacher.tokenizer, pooling=teacher.pooling, normalize=teacher.normalize,
                              max_seq_length=teacher.max_seq_length, projection_dim=teacher.embedding_dim)
    return student


def _layer_path(backbone: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    parent, attr, lst = _layer_list(backbone)
    for name, module in backbone.named_modules():
        if module is lst:
            return parent, name, lst
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------- tiny models

TINY_WORDS = (
    "the a of and to in is was for on with as by at from that this it be are have light dark water fire stone "
    "tree river king house small large old new red green blue swift slow bird fish horse city road bread wine "
    "song word book hand eye heart sea land sky sun moon star night day morning evening field seed grain gold "
    "silver iron door window wall gate mountain valley cloud rain wind storm spring summer winter run walk "
    "speak write read sing build break carry hold give take make see hear know"
).split()


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic toy sentences over :data:`TINY_WORDS` (for tests and smoke runs)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 12, (1,), generator=g))
        idx = torch.randint(0, len(TINY_WORDS), (k,), generator=g).tolist()
        out.append(" ".join(TINY_WORDS[i] for i in idx))
    return out


def tiny_tokenizer(corpus: Sequence[str] | None = None, vocab_size: int = 300):
    """A BERT-style uncased WordPiece tokenizer trained locally in well under a second."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    tok.train_from_iterator(list(corpus or tiny_corpus()) + [" ".join(TINY_WORDS)], trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)


def tiny_encoder(*, hidden_size: int = 32, num_layers: int = 4, num_heads: int = 2, seed: int = 0,
                 tokenizer: Any = None, max_seq_length: int = 32) -> SentenceEncoder:
    """A random BERT sentence encoder (mean pooling, normalised) with :func:`tiny_tokenizer`."""
    _offline_env()
    from transformers import BertConfig, BertModel

    tokenizer = tokenizer or tiny_tokenizer()
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                     num_attention_heads=num_heads, intermediate_size=2 * hidden_size,
                     max_position_embeddings=max(64, max_seq_length), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return SentenceEncoder(BertModel(cfg, add_pooling_layer=False), tokenizer,
                           max_seq_length=max_seq_length).eval()


