"""``minilm``: self-attention relation distillation (MiniLM / MiniLMv2), optional hidden-state transfer.

Wang, Wei, Dong, Bao, Yang & Zhou, 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression
of Pre-Trained Transformers"; Wang, Bao, Huang, Dong & Wei, 2021, "MiniLMv2: Multi-Head Self-Attention Relation
Distillation for Compressing Pretrained Transformers".

The student learns how the teacher's tokens relate inside one self-attention layer, not the token vectors
themselves, so widths (and, for MiniLMv2, head counts) may differ. With ``Q, K, V`` ``(B, T, W)`` the outputs of
a layer's query / key / value projections (heads concatenated) and, for ``X, Y`` split into ``h`` heads of width
``d = W / h``, ``R(X, Y)_h = softmax_j(X_h Y_h^T / (sqrt(d) tau))`` a row-stochastic ``(T, T)`` relation per head::

    MiniLMv2 (relations: [qq, kk, vv]):
        L = weight * sum_{X in {Q, K, V}} mean_{h, i} KL(R(X_t, X_t)_h,i || R(X_s, X_s)_h,i)
    MiniLM   (relations: [attention, value]):
        L = weight * (mean_{h, i} KL(R(Q_t, K_t)_h,i || R(Q_s, K_s)_h,i) + mean_{h, i} KL(R(V_t, V_t) || R(V_s, V_s)))
      + hidden_weight * mean_{(i, j) in hidden_pairs} mean_{real tokens} D(P_ij h_s,i , h_t,j)   (optional)
      + the terms of ``output_method`` (optional: llm_kd on the logits, embedding_kd on sentence embeddings)

MiniLMv2 heads are *relation heads*: the concatenated projections are re-split into ``relation_heads`` heads on
each side (by its own width), so a 12-head 384-wide student can learn from a 16-head 1024-wide teacher (the paper
used 48 relation heads for base-size and 64 for large teachers; default here: the teacher's attention head count).
MiniLM v1 compares real attention heads, so the two models need the same head count. Padding tokens are excluded
as keys (outside the softmax) and as queries (outside the mean); ``causal`` (default: auto, True when the teacher
is a ``...ForCausalLM``) restricts each query to earlier keys, as a decoder attends. Grouped-query attention:
key / value heads are repeated to the query heads that share them before any relation is formed.

Layers: ``teacher_layer`` / ``student_layer`` pick one self-attention layer by index (default ``-1``, the last, as
in MiniLM) or by the attention module's name (``"model.layers.20.self_attn"``); the q/k/v projections
(``{q,k,v}_proj`` of Llama-family models, ``query/key/value`` of BERT) are hooked there, no ``output_attentions``
needed. MiniLMv2 found an upper-middle teacher layer better for large teachers (layer 21 of 24 for BERT-large /
RoBERTa-large), the last layer for base-size ones. Q and K are read at the projections, before rotary position
embeddings: for RoPE models the relations are content-only (MiniLMv2's relations are defined there anyway).

``hidden_weight > 0`` adds hidden-state transfer between transformer blocks (TinyBERT-style: Jiao et al., 2020,
"TinyBERT: Distilling BERT for Natural Language Understanding"): block ``i`` of the student follows block ``j`` of
the teacher, by ``hidden_loss`` ``cosine`` (scale-free, the default) or ``mse``, through a learned linear projector
when the widths differ (it lives on the method: trained, never exported). ``hidden_pairs: auto`` maps the student's
``L_s`` blocks uniformly onto the teacher's ``L_t`` (student ``i`` -> teacher ``round((i + 1) L_t / L_s) - 1``, last
to last); give ``[[i, j], ...]`` for a layer-subset or pruned student whose kept layers you know.

When to use: task-agnostic compression of a transformer into a smaller one with the same tokenizer - sentence
encoders (``embedding`` task; combine with ``output_method: {name: embedding_kd, kwargs: {...}}``) and causal LMs
(``llm`` task; ``output_method: {name: llm_kd, kwargs: {alpha: 0.5}}`` adds the logit KD / CE mix of ``llm_kd``,
with its own kwargs). The teacher runs live (its internals are read), so the method is not ``cacheable``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import AttentionLayer, attention_layers
from ..errors import KDistillError, expect, unknown_name
from ..losses.embeddings import token_cosine, token_mse
from ..losses.reduce import masked_mean
from ..losses.relations import attention_relation, expand_kv_heads, self_relation
from ..registry import METHODS
from ._zoo import non_negative, positive
from .base import Method, ModelOutput, SetupInfo, require_teacher

#: relation name -> the projections it compares (left, right); v2 relations split by ``relation_heads``
RELATIONS = {"qq": ("q", "q"), "kk": ("k", "k"), "vv": ("v", "v"), "attention": ("q", "k"), "value": ("v", "v")}
V2_RELATIONS = ("qq", "kk", "vv")
HIDDEN_LOSSES = {"cosine": token_cosine, "mse": token_mse}


def _layer_spec(value: Any, name: str) -> int | str:
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.strip())
    expect(bool(ok), f"minilm {name}", value, "a layer index (-1 = the last attention layer) or the name of an "
           "attention module (e.g. 'model.layers.20.self_attn')")
    return value


def _hidden_pairs(value: Any) -> str | tuple[tuple[int, int], ...]:
    if value == "auto":
        return "auto"
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
        for p in value)
    expect(ok, "minilm hidden_pairs", value, "'auto' or a non-empty list of [student_block, teacher_block] index "
           "pairs, e.g. [[0, 1], [1, 3]]")
    return tuple((int(i), int(j)) for i, j in value)


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


@METHODS.register("minilm")
class MiniLM(Method):
    """Self-attention relation KL (MiniLM / MiniLMv2) + optional hidden-state transfer; see the module docstring."""

    def __init__(self, relations: Sequence[str] = V2_RELATIONS, relation_heads: int | None = None,
                 weight: float = 1.0, student_layer: int | str = -1, teacher_layer: int | str = -1,
                 causal: bool | None = None, relation_temperature: float = 1.0, hidden_weight: float = 0.0,
                 hidden_pairs: str | list[list[int]] = "auto", hidden_loss: str = "cosine",
                 output_method: dict[str, Any] | None = None) -> None:
        super().__init__()
        if isinstance(relations, str) or not isinstance(relations, (list, tuple)):
            raise KDistillError(f"minilm relations: got {relations!r}, expected a list of names from "
                                f"{sorted(RELATIONS)}, e.g. [qq, kk, vv] (MiniLMv2) or [attention, value] (MiniLM).")
        for r in relations:
            if r not in RELATIONS:
                raise unknown_name("minilm relation", str(r), RELATIONS,
                                   "Use [qq, kk, vv] (MiniLMv2) or [attention, value] (MiniLM).")
        expect(len(set(relations)) == len(relations), "minilm relations", list(relations), "each relation once")
        non_negative("minilm", weight=weight, hidden_weight=hidden_weight)
        positive("minilm", relation_temperature=relation_temperature)
        if relation_heads is not None:
            expect(isinstance(relation_heads, int) and not isinstance(relation_heads, bool) and relation_heads >= 1,
                   "minilm relation_heads", relation_heads, "a positive integer (or null: the teacher's head count)")
            expect(any(r in V2_RELATIONS for r in relations), "minilm relation_heads", relation_heads,
                   "null with relations [attention, value]", "MiniLM v1 compares attention heads; relation_heads "
                   "applies to qq / kk / vv. Remove it or use relations: [qq, kk, vv].")
        if causal is not None and not isinstance(causal, bool):
            raise KDistillError(f"minilm causal: got {causal!r}, expected true, false or null (auto: true for a "
                                "causal-LM teacher).")
        if hidden_loss not in HIDDEN_LOSSES:
            raise unknown_name("minilm hidden_loss", str(hidden_loss), HIDDEN_LOSSES)
        self.relations = tuple(relations) if weight > 0 else ()
        self.relation_heads, self.weight = relation_heads, float(weight)
        self.student_layer, self.teacher_layer = (_layer_spec(student_layer, "student_layer"),
                                                  _layer_spec(teacher_layer, "teacher_layer"))
        self.causal_spec, self.relation_temperature = causal, float(relation_temperature)
        self.hidden_weight, self.hidden_loss = float(hidden_weight), hidden_loss
        self.hidden_spec = _hidden_pairs(hidden_pairs)
        if self.hidden_spec != "auto" and self.hidden_weight == 0:
            raise KDistillError(f"minilm hidden_pairs: got {hidden_pairs!r} with hidden_weight 0; expected "
                                "hidden_weight > 0 for the pairs to be used. Fix: set hidden_weight (e.g. 1.0) or "
                                "remove hidden_pairs.")
        self.output_method = self._build_output(output_method)
        if not self.relations and self.hidden_weight == 0 and self.output_method is None:
            raise KDistillError(f"minilm: got weight={weight}, hidden_weight={hidden_weight} and no output_method; "
                                "expected at least one term. Fix: weight: 1.0 (the attention relations).")
        self.projectors = nn.ModuleDict()
        # filled by resolve_layers
        self._s_attn: AttentionLayer | None = None
        self._t_attn: AttentionLayer | None = None
        self._pairs: tuple[tuple[str, str], ...] = ()
        self.causal = bool(causal)

    @staticmethod
    def _build_output(spec: dict[str, Any] | None) -> Method | None:
        if spec is None:
            return None
        if not isinstance(spec, dict) or "name" not in spec or set(spec) - {"name", "kwargs"}:
            raise KDistillError(f"minilm output_method: got {spec!r}, expected {{name: METHOD, kwargs: {{...}}}}, e.g. "
                                "{name: llm_kd, kwargs: {alpha: 0.5}} (LLMs) or {name: embedding_kd, kwargs: "
                                "{cosine_weight: 1.0}} (sentence encoders).")
        name = spec["name"]
        if name == "minilm":
            raise KDistillError("minilm output_method: got 'minilm', expected a method for the model outputs (e.g. "
                                "llm_kd or embedding_kd); the relation terms are already this method's.")
        cls = METHODS.get(name)
        kwargs = spec.get("kwargs") or {}
        try:
            sub = cls(**kwargs)
        except TypeError as e:
            raise KDistillError(f"minilm output_method {name!r}: its kwargs {kwargs} were rejected ({e}); expected "
                                f"arguments of {cls.__name__}. Fix the kwargs under output_method.") from None
        if cls.needs_prompts or sub.fused_head:
            raise KDistillError(f"minilm output_method {name!r}: it generates from the student or fuses the LM head, "
                                "which the combined forward does not support; expected a plain output method. Fix: "
                                "use llm_kd without fused (or run that method on its own).")
        return sub

    # ------------------------------------------------------------------------------------------ declared needs
    @property
    def uses_token_states(self) -> bool:
        return self.output_method.uses_token_states if self.output_method is not None else False

    @property
    def needs_pairs(self) -> bool:
        return self.output_method.needs_pairs if self.output_method is not None else False

    def set_total_steps(self, total_steps: int) -> None:
        if self.output_method is not None:
            self.output_method.set_total_steps(total_steps)

    def pop_metrics(self) -> dict[str, float]:
        out = super().pop_metrics()
        if self.output_method is not None:
            out.update(self.output_method.pop_metrics())
        return out

    # ------------------------------------------------------------------------------------------ layers
    @staticmethod
    def _pick(layers: list[AttentionLayer], spec: int | str, who: str, model: nn.Module) -> AttentionLayer:
        if not layers:
            raise KDistillError(
                f"minilm: found no self-attention layer with separate q/k/v projections in the {who} "
                f"({type(model).__name__}); expected a transformer with q_proj/k_proj/v_proj (Llama family) or "
                "query/key/value (BERT) children. Fix: use a transformer student (a static or MLP student has no "
                "attention), or another method.")
        if isinstance(spec, str):
            for layer in layers:
                if spec in (layer.path, layer.block):
                    return layer
            raise unknown_name(f"{who} attention layer", spec, [x.path for x in layers],
                               f"Set {who}_layer to one of these, or to an index (-1 = the last).")
        stacks = sorted({x.stack for x in layers})
        if len(stacks) > 1:
            raise KDistillError(f"minilm {who}_layer={spec}: the {who} has attention layers in several stacks "
                                f"{stacks}; expected one model. Fix: give {who}_layer as an attention module's "
                                f"name, e.g. {layers[-1].path!r} (or distil from one teacher).")
        if not -len(layers) <= spec < len(layers):
            raise KDistillError(f"minilm {who}_layer: got {spec}, but the {who} has {len(layers)} attention layers; "
                                f"expected an index in [{-len(layers)}, {len(layers) - 1}] (-1 = the last).")
        return layers[spec]

    def _hidden_blocks(self, s_layers: list[AttentionLayer], t_layers: list[AttentionLayer]) -> tuple:
        s_blocks = list(dict.fromkeys(x.block for x in s_layers))
        t_blocks = list(dict.fromkeys(x.block for x in t_layers))
        ls, lt = len(s_blocks), len(t_blocks)
        if self.hidden_spec == "auto":
            pairs = [(i, round((i + 1) * lt / ls) - 1) for i in range(ls)]
        else:
            pairs = list(self.hidden_spec)
            for i, j in pairs:
                if not (-ls <= i < ls and -lt <= j < lt):
                    raise KDistillError(f"minilm hidden_pairs: got pair [{i}, {j}], but the student has {ls} blocks "
                                        f"and the teacher {lt}; expected student indices in [0, {ls - 1}] and teacher "
                                        f"indices in [0, {lt - 1}]. Fix the pair.")
        return tuple((s_blocks[i], t_blocks[j]) for i, j in pairs)

    def resolve_layers(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is None:
            raise KDistillError("minilm: got no teacher model (targets from a cache); expected the live teacher, "
                                "whose attention projections this method reads. Fix: remove `cache:` and give "
                                "`teacher:`.")
        s_layers, t_layers = attention_layers(student), attention_layers(teacher)
        s_names: list[str] = []
        t_names: list[str] = []
        if self.relations:
            self._s_attn = self._pick(s_layers, self.student_layer, "student", student)
            self._t_attn = self._pick(t_layers, self.teacher_layer, "teacher", teacher)
            # q is always read: its width gives the head counts (and expands grouped k/v heads)
            roles = sorted({"q"} | {p for r in self.relations for p in RELATIONS[r]})
            s_names += [getattr(self._s_attn, r) for r in roles]
            t_names += [getattr(self._t_attn, r) for r in roles]
        if self.hidden_weight > 0:
            for who, layers, model in (("student", s_layers, student), ("teacher", t_layers, teacher)):
                if not layers:
                    self._pick(layers, -1, who, model)  # raises with the fix
            self._pairs = self._hidden_blocks(s_layers, t_layers)
            s_names += [s for s, _ in self._pairs]
            t_names += [t for _, t in self._pairs]
        self.causal = _is_causal_lm(teacher) if self.causal_spec is None else self.causal_spec
        if self.output_method is not None:
            self.output_method.resolve_layers(student, teacher)
            s_names += list(self.output_method.student_layers)
            t_names += list(self.output_method.teacher_layers)
        self.student_layers = tuple(dict.fromkeys(s_names))
        self.teacher_layers = tuple(dict.fromkeys(t_names))

    # ------------------------------------------------------------------------------------------ heads
    def _side(self, out: ModelOutput, layer: AttentionLayer, who: str) -> dict[str, Tensor]:
        """The captured q/k/v of one side, k and v expanded to the query heads (grouped-query attention)."""
        feats: dict[str, Tensor] = {}
        for role in ("q", "k", "v"):
            name = getattr(layer, role)
            if name in out.features:
                feats[role] = out.features[name]
        q = feats.get("q")
        if q is None:
            raise KDistillError(f"minilm: the {who}'s query projection {layer.q!r} was not captured (got "
                                f"{sorted(out.features)}); expected the loop to hook the method's declared layers.")
        d = layer.head_dim
        for role in ("k", "v"):
            x = feats.get(role)
            if x is None or x.shape[-1] == q.shape[-1]:
                continue
            if d is None or q.shape[-1] % d or x.shape[-1] % d:
                raise KDistillError(f"minilm: the {who}'s {role} projection is {x.shape[-1]} wide and its query "
                                    f"projection {q.shape[-1]} (grouped-query attention), but its head width is "
                                    f"unknown (got {layer.head_dim}); expected an attention module with `head_dim` "
                                    "or a config with num_attention_heads. Fix: use a Hugging Face model.")
            feats[role] = expand_kv_heads(x, num_kv_heads=x.shape[-1] // d, num_heads=q.shape[-1] // d)
        return feats

    def _attention_heads(self, layer: AttentionLayer, width: int, who: str) -> int:
        if layer.head_dim is None or width % layer.head_dim:
            raise KDistillError(f"minilm: the {who}'s head width is unknown or does not divide its query width "
                                f"{width} (got head_dim={layer.head_dim}); expected a Hugging Face attention module. "
                                "Fix: use relations [qq, kk, vv] with relation_heads set.")
        return width // layer.head_dim

    def _check_heads(self, s_width: int, t_width: int) -> tuple[int | None, int | None]:
        """(relation heads, attention heads), checked against both models' widths; fails with the fix."""
        assert self._s_attn is not None and self._t_attn is not None
        rel = att = None
        if any(r not in V2_RELATIONS for r in self.relations):
            hs = self._attention_heads(self._s_attn, s_width, "student")
            ht = self._attention_heads(self._t_attn, t_width, "teacher")
            if hs != ht:
                raise KDistillError(f"minilm relations {list(self.relations)}: the student has {hs} attention heads "
                                    f"and the teacher {ht}; MiniLM v1 (attention, value) compares heads one to one, "
                                    "so expected the same count. Fix: relations: [qq, kk, vv] with relation_heads "
                                    "(MiniLMv2 re-splits both models into the same number of relation heads).")
            att = hs
        if any(r in V2_RELATIONS for r in self.relations):
            rel = self.relation_heads or self._attention_heads(self._t_attn, t_width, "teacher")
            bad = [f"{who} width {w}" for who, w in (("student", s_width), ("teacher", t_width)) if w % rel]
            if bad:
                g = math.gcd(s_width, t_width)
                hint = max(x for x in range(1, min(g, 64) + 1) if g % x == 0)
                raise KDistillError(f"minilm relation_heads: got {rel}, which does not divide the {' and '.join(bad)}; "
                                    f"expected a divisor of both q/k/v widths ({s_width}, {t_width}). Fix: set "
                                    f"relation_heads to a divisor of {g}, e.g. {hint}.")
        return rel, att

    def setup(self, info: SetupInfo) -> None:
        if self.relations:
            assert self._s_attn is not None and self._t_attn is not None
            s, t = info.student_features.get(self._s_attn.q), info.teacher_features.get(self._t_attn.q)
            if s is not None and t is not None:  # fail before training, not at the first step
                self._check_heads(int(s[-1]), int(t[-1]))
        for s_name, t_name in self._pairs:
            s, t = info.student_features.get(s_name), info.teacher_features.get(t_name)
            if s is None or t is None:
                continue
            key = f"{s_name}->{t_name}".replace(".", "_")
            if s[-1] != t[-1] and key not in self.projectors:
                self.projectors[key] = nn.Linear(int(s[-1]), int(t[-1]), bias=False)
        if self.output_method is not None:
            self.output_method.setup(info)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher = require_teacher("minilm", teacher)
        mask = student.extra.get("attention_mask", batch.get("attention_mask"))
        mask = mask.bool() if mask is not None else None
        rows = mask.any(-1) if mask is not None else None
        out: dict[str, Tensor] = {}
        if self.relations:
            if self._s_attn is None or self._t_attn is None:
                raise KDistillError("minilm: its layers were never resolved; expected the training loop "
                                    "(kdistill.train.loop.fit) to call method.resolve_layers(student, teacher).")
            s, t = self._side(student, self._s_attn, "student"), self._side(teacher, self._t_attn, "teacher")
            if mask is not None and tuple(mask.shape) != tuple(s["q"].shape[:2]):
                raise KDistillError(f"minilm: attention mask {tuple(mask.shape)} vs captured tokens "
                                    f"{tuple(s['q'].shape[:2])}; expected the mask of the tokens the models saw.")
            rel, att = self._check_heads(s["q"].shape[-1], t["q"].shape[-1])
            kw = {"mask": mask, "causal": self.causal, "relation_temperature": self.relation_temperature}
            for r in self.relations:
                a, b = RELATIONS[r]
                heads = rel if r in V2_RELATIONS else att
                if a == b:
                    value = self_relation(s[a], t[a], num_heads=heads, **kw)
                else:
                    value = attention_relation(s[a], s[b], t[a], t[b], num_heads=heads, **kw)
                out[r] = self.weight * masked_mean(value, rows)
        if self._pairs:
            terms = []
            for s_name, t_name in self._pairs:
                hs, ht = student.features[s_name], teacher.features[t_name].float()
                key = f"{s_name}->{t_name}".replace(".", "_")
                if key in self.projectors:
                    hs = self.projectors[key](hs.float())
                m = mask if mask is not None else torch.ones(hs.shape[:2], dtype=torch.bool, device=hs.device)
                terms.append(masked_mean(HIDDEN_LOSSES[self.hidden_loss](hs, ht, m), rows))
            out["hidden"] = self.hidden_weight * torch.stack(terms).mean()
        if self.output_method is not None:
            for k, v in self.output_method(student, teacher, batch).items():
                out[f"output_{k}" if k in out else k] = v
        return out
