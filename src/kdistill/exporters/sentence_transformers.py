"""Export an embedding student as a sentence-transformers folder (and optionally ONNX), with checks.

* :func:`save_sentence_transformer` writes ``Transformer -> Pooling -> (Dense) -> (Normalize)`` for a
  :class:`~kdistill.students.encoders.SentenceEncoder`, or ``StaticEmbedding -> (Dense) -> (Normalize)``
  for a :class:`~kdistill.students.static.StaticEncoder`, using sentence-transformers' own modules, so
  ``SentenceTransformer(path)`` loads it offline. The folder is written to a temporary sibling and
  renamed into place: an interrupted export never leaves a half-written model.
* :func:`load_student` reads such a folder back into kdistill's encoder classes.
* :func:`check_sentence_transformers` reloads the folder in plain sentence-transformers and returns the
  max abs difference to kdistill's embeddings.
* :func:`export_onnx` writes ``model.onnx`` (inputs ``input_ids``, ``attention_mask``[, ``token_type_ids``],
  output ``sentence_embedding``) and returns the parity against PyTorch under onnxruntime.

Method parameters (projectors used only in training) are never part of the export: only the student is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import KDistillError, expect
from ..students.encoders import SentenceEncoder, _offline_env, load_sentence_encoder
from ..students.static import StaticEncoder

DEFAULT_CHECK_SENTENCES = (
    "In the beginning God created the heaven and the earth.",
    "a small domesticated carnivorous mammal with soft fur",
    "dog",
    "",
    "The quick brown fox jumps over the lazy dog, again and again, until the evening comes.",
)


def _identity_dense(linear: nn.Linear):
    from sentence_transformers.models import Dense

    return Dense(linear.in_features, linear.out_features, bias=linear.bias is not None,
                 activation_function=nn.Identity(), init_weight=linear.weight.detach().clone(),
                 init_bias=linear.bias.detach().clone() if linear.bias is not None else None)


def _st_modules(model: SentenceEncoder | StaticEncoder, workdir: Path) -> list[nn.Module]:
    from sentence_transformers.models import Normalize, Pooling, Transformer

    mods: list[nn.Module] = []
    if isinstance(model, SentenceEncoder):
        backbone_dir = workdir / "backbone"
        model.backbone.save_pretrained(str(backbone_dir))
        model.tokenizer.save_pretrained(str(backbone_dir))
        tr = Transformer(str(backbone_dir), max_seq_length=model.max_seq_length)
        mods += [tr, Pooling(model.hidden_size, pooling_mode=model.pooling)]
    elif isinstance(model, StaticEncoder):
        from sentence_transformers.models import StaticEmbedding
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(model._tok.to_str())
        mods.append(StaticEmbedding(tok, embedding_weights=model.embedding.weight.detach().clone()))
    else:
        raise KDistillError(f"export: got a {type(model).__name__}, expected a SentenceEncoder or StaticEncoder "
                            "(kdistill.students). Classifiers export with `kdistill export` on a classification run.")
    if model.projection is not None:
        mods.append(_identity_dense(model.projection))
    if model.normalize:
        mods.append(Normalize())
    return mods


def save_sentence_transformer(model: SentenceEncoder | StaticEncoder, path: str | Path, *,
                              metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a sentence-transformers folder at ``path`` (atomically replaced)."""
    _offline_env()
    from sentence_transformers import SentenceTransformer

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        was = model.training
        model.eval()
        with tempfile.TemporaryDirectory() as work:
            st = SentenceTransformer(modules=_st_modules(model, Path(work)), device="cpu")
            st.save(str(tmp))
        model.train(was)
        (tmp / "kdistill.json").write_text(json.dumps({"format": 1, "kind": type(model).__name__,
                                                        **(metadata or {})}, indent=2, default=str))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_student(path: str | Path) -> SentenceEncoder | StaticEncoder:
    """Read a folder written by :func:`save_sentence_transformer` (or any supported ST folder)."""
    _offline_env()
    path = Path(path)
    modules_file = path / "modules.json"
    expect(modules_file.is_file(), "sentence-transformers folder", str(path), "a folder with modules.json",
           "Export a student first: kdistill.exporters.sentence_transformers.save_sentence_transformer(...).")
    modules = json.loads(modules_file.read_text())
    if not modules[0]["type"].endswith("StaticEmbedding"):
        return load_sentence_encoder(path)
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    sub = path / modules[0]["path"]
    tok = Tokenizer.from_file(str(sub / "tokenizer.json"))
    weights = load_file(str(sub / "model.safetensors"))["embedding.weight"]
    specials = [i for i, t in tok.get_added_tokens_decoder().items() if t.special]
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok)
    projection, normalize = None, False
    for m in modules[1:]:
        kind = m["type"].rsplit(".", 1)[-1]
        if kind == "Dense":
            w = load_file(str(path / m["path"] / "model.safetensors"))
            projection = nn.Linear(w["linear.weight"].shape[1], w["linear.weight"].shape[0], bias="linear.bias" in w)
            projection.load_state_dict({k.removeprefix("linear."): v for k, v in w.items()})
        elif kind == "Normalize":
            normalize = True
        else:
            raise KDistillError(f"{path}: module {m['type']!r} after StaticEmbedding is not supported; expected "
                                "Dense (identity) and Normalize.")
    enc = StaticEncoder(weights, hf_tok, normalize=normalize, special_ids=specials)
    if projection is not None:
        enc.projection = projection
    return enc.eval()


def check_sentence_transformers(model: SentenceEncoder | StaticEncoder, path: str | Path,
                                sentences: Sequence[str] = DEFAULT_CHECK_SENTENCES) -> float:
    """Max abs difference between ``model.encode`` and plain ``SentenceTransformer(path).encode``."""
    _offline_env()
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(path), device="cpu")
    theirs = torch.as_tensor(st.encode(list(sentences), convert_to_numpy=True))
    ours = model.encode(list(sentences))
    expect(theirs.shape == ours.shape, "exported embeddings shape", tuple(theirs.shape), f"{tuple(ours.shape)}")
    return float((theirs - ours).abs().max())


class _OnnxWrapper(nn.Module):
    def __init__(self, model: SentenceEncoder, with_types: bool) -> None:
        super().__init__()
        self.model, self.with_types = model, with_types

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        # A 4-D additive mask bypasses transformers' mask builder, whose shape checks the tracer would
        # freeze into constants (wrong results for other batch shapes).
        neg = torch.finfo(torch.float32).min
        ext = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * neg
        kwargs = {"input_ids": input_ids, "attention_mask": ext}
        if self.with_types:
            kwargs["token_type_ids"] = token_type_ids
        tokens = self.model.backbone(**kwargs).last_hidden_state
        return self.model.head(tokens, attention_mask)


def export_onnx(model: SentenceEncoder, path: str | Path, *,
                sentences: Sequence[str] = DEFAULT_CHECK_SENTENCES, opset: int = 17) -> dict[str, Any]:
    """Write ``model`` to ``path`` (``.onnx``) and compare onnxruntime with PyTorch on ``sentences``.

    Returns ``{"path", "max_abs_diff", "opset"}``. Only transformer encoders (static students are a
    lookup table: export them to sentence-transformers instead).
    """
    expect(isinstance(model, SentenceEncoder), "ONNX export model", type(model).__name__,
           "a SentenceEncoder (transformer student)",
           "Static students need no ONNX: use the sentence-transformers export.")
    try:
        import onnxruntime as ort
    except ImportError:
        raise KDistillError("ONNX export needs onnx and onnxruntime; `pip install kdistill[onnx]`.") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was = model.training
    model.eval()
    batch = model.tokenize(list(sentences))
    with_types = "token_type_ids" in batch
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])
    args = tuple(batch[n] for n in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["sentence_embedding"] = {0: "batch"}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with torch.no_grad():
            torch.onnx.export(_OnnxWrapper(model, with_types).eval(), args, str(tmp), input_names=names,
                              output_names=["sentence_embedding"], dynamic_axes=axes, opset_version=opset,
                              dynamo=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = 0.0
    # the export batch and a batch of another shape (dynamic axes really are dynamic)
    for b in (batch, model.tokenize(list(sentences)[: max(1, len(sentences) // 2)])):
        with torch.no_grad():
            ref = model(**{n: b[n] for n in names})
        got = sess.run(["sentence_embedding"], {n: b[n].numpy() for n in names})[0]
        diff = max(diff, float((torch.from_numpy(got) - ref).abs().max()))
    model.train(was)
    return {"path": str(path), "max_abs_diff": diff, "opset": opset}


def is_st_folder(path: str | Path) -> bool:
    """A sentence-transformers folder written by kdistill (``modules.json`` + ``kdistill.json``)."""
    p = Path(path)
    return (p / "modules.json").is_file() and (p / "kdistill.json").is_file()


def export_embedding(folder: str | Path, out: str | Path, *, onnx: bool = False) -> dict[str, Any]:
    """Copy an embedding student (``<run>/student``) to ``out`` as a sentence-transformers folder, reload it
    in plain sentence-transformers and report the max abs difference; with ``onnx`` also ``out/model.onnx``
    (transformer students) with its parity against PyTorch."""
    model = load_student(folder)
    meta = json.loads((Path(folder) / "kdistill.json").read_text()) if is_st_folder(folder) else {}
    meta.pop("format", None)
    meta.pop("kind", None)
    path = save_sentence_transformer(model, out, metadata=meta)
    result: dict[str, Any] = {"out": str(path), "kind": type(model).__name__,
                              "st_max_abs_diff": check_sentence_transformers(model, path)}
    if onnx and isinstance(model, SentenceEncoder):
        result["onnx"] = export_onnx(model, Path(path) / "model.onnx")
    return result
