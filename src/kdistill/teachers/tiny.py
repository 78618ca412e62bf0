"""Tiny causal LMs built locally: a byte-level BPE tokenizer trained with ``tokenizers`` on given texts and
a randomly initialised small Llama. Used as the served model in tests (fast, offline) and as the small
LM student of the ``rationales`` pipeline."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` (specials ``<pad>``, ``<s>``, ``</s>``) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               seed: int = 0, pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2) -> Any:
    """A random ``LlamaForCausalLM`` (hidden 64, 2 layers by default: ~100k parameters + embeddings)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                      max_position_embeddings=1024, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                      eos_token_id=eos_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def build_tiny_lm(texts: Iterable[str], *, vocab_size: int = 1024, hidden_size: int = 64, num_layers: int = 2,
                  seed: int = 0) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a tokenizer trained on ``texts`` and a random tiny Llama sized to it."""
    tok = train_tokenizer(texts, vocab_size)
    lm = tiny_llama(len(tok), hidden_size=hidden_size, num_layers=num_layers, seed=seed,
                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return lm, tok
