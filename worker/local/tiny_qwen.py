"""A tiny Qwen2 causal LM whose continuation of every enhancement prompt is known in advance.

Built offline: a byte-level BPE tokenizer trained on the enhancement prompts, and a 2-layer
Qwen2 whose weights are set so that greedy and sampled decoding write a chosen text. Saved
with `save_pretrained`, loaded by the worker through the same `from_pretrained` path as
Qwen2.5-7B. How the weights force the text: attention and MLP outputs are zero, so the
hidden state after the last norm is the current token's embedding alone; each token of the
chain has a one-hot embedding, and the LM head maps that one-hot to the next token.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from enhancement.prompts import completion_prompt

#: What the tiny model writes after any enhancement prompt (every token in it is distinct).
ENHANCED_TEXT = (
    "A slow cinematic dolly shot follows one red fox running through fresh snow at dawn "
    "with golden light and soft mist in smooth consistent motion highly detailed."
)
#: Said wherever a user sees output of this model.
NOISE_WARNING = (
    "the tiny Qwen model writes one fixed sentence whatever the prompt. Set QWEN_MODEL_PATH "
    "to Qwen2.5-7B (base) for real enhancement."
)
EOS = "<|endoftext|>"
#: Width of the residual stream: one dimension per token of the forced text.
HIDDEN = 64
#: The LM head weight that makes the next token of the chain win under any sampling.
FORCING_WEIGHT = 10.0


def _tokenizer(continuation: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE (Qwen's kind) trained on the prompts and the text, so words are tokens."""
    corpus = [
        completion_prompt("x", content=content, quality=quality)
        for content in ("video", "image")
        for quality in ("fast", "high")
    ]
    corpus += [continuation] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1_000,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)


def make_tiny_qwen(target: Path, *, continuation: str = ENHANCED_TEXT, seed: int = 0) -> Path:
    """Build and save a tiny Qwen2 that continues every enhancement prompt with `continuation`."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer(continuation)
    eos = tokenizer.eos_token_id
    start = tokenizer.encode(completion_prompt("x", content="video", quality="fast"))[-1]
    chain = [start, *tokenizer.encode(" " + continuation), eos]
    if len(set(chain[:-1])) != len(chain) - 1 or len(chain) > HIDDEN:
        raise ValueError(f"continuation must be at most {HIDDEN - 2} distinct tokens")
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4_096,
            tie_word_embeddings=False,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for state, (token, next_token) in enumerate(zip(chain, chain[1:], strict=False)):
            model.model.embed_tokens.weight[token] = 0.0
            model.model.embed_tokens.weight[token, state] = 1.0
            model.lm_head.weight[next_token, state] = FORCING_WEIGHT
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
