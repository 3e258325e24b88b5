"""Tiny random chat models built from configs, for unit tests (no downloads).

A byte-level BPE tokenizer is trained in-process on a small corpus, the chat templates
below are written for these tests in the shape of common model families, and models are
instantiated from small configs with a fixed seed.
"""

from __future__ import annotations

import functools
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SMOLLM2 = CHATML.replace("You are a tiny test assistant.", "You are SmolTest, a helpful assistant.")
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA = (
    "{{ '<bos>' }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML, "smollm2": SMOLLM2, "llama3": LLAMA3, "gemma": GEMMA}
POST_TEXT = {
    "chatml": "<|im_end|>\n<|im_start|>assistant\n",
    "smollm2": "<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<end_of_turn>\n<start_of_turn>model\n",
}
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>",
]
CORPUS = [
    "system user assistant model You are a tiny test assistant helpful SmolTest",
    "How do I bake bread at home? Write a poem about the sea. Explain photosynthesis simply.",
    "Tell me how to build a bomb. How can I steal a car? Write malware that steals passwords.",
    "List three prime numbers. Summarise the plot of a film. Describe a quiet morning walk.",
    "I'm sorry, but I can't help with that. Sure! Here is a recipe: flour, water, salt, yeast.",
    "the quick brown fox jumps over the lazy dog 0123456789 ,.;:!?'\"()[]{}<>-_/\\ \n\n\t",
]


@functools.cache
def _base_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def make_tokenizer(template: str = "chatml") -> PreTrainedTokenizerFast:
    eos = {"chatml": "<|im_end|>", "smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}[template]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_base_tokenizer().to_str()),
        eos_token=eos, pad_token="<pad>", bos_token="<bos>",
    )
    tok.chat_template = TEMPLATES[template]
    return tok


def make_hf_model(arch: str = "qwen2", vocab_size: int = 400, seed: int = 0, **overrides):
    """A random tiny causal LM: ``qwen2`` (qkv biases), ``llama`` (optionally biased / tied)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=None,
    )
    common.update(overrides)
    if arch == "qwen2":
        cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif arch == "llama":
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    else:
        raise ValueError(arch)
    model = cls(cfg).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so tests see real effects.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


TEST_DEVICE = os.environ.get("REFUSALDIR_TEST_DEVICE", "cpu")
TEST_DTYPE = getattr(torch, os.environ.get("REFUSALDIR_TEST_DTYPE", "float32"))
#: Relative precision of each test dtype (unit roundoff), used to scale tolerances.
EPS = {torch.float32: 1.2e-7, torch.bfloat16: 7.8e-3, torch.float16: 9.8e-4}


def dtype_tolerance(tol: float) -> float:
    """``tol`` written for float32, unchanged in float32; in a lower precision at least 16 units
    of roundoff of that dtype (0.125 in bfloat16), which the measured bf16 errors of these tests
    (≤ 0.016) stay well inside while a wrong result (order 1) still fails."""
    if TEST_DTYPE == torch.float32:
        return tol
    return max(tol, 16 * EPS[TEST_DTYPE])


def make_chat_model(arch: str = "qwen2", template: str = "chatml", seed: int = 0, **overrides):
    """A ``refusaldir.ChatModel`` around a tiny random model, on the test device and dtype."""
    import refusaldir

    tok = make_tokenizer(template)
    hf = make_hf_model(arch, vocab_size=len(tok), seed=seed, **overrides)
    hf = hf.to(device=TEST_DEVICE, dtype=TEST_DTYPE)
    hf.generation_config.eos_token_id = tok.eos_token_id
    hf.generation_config.pad_token_id = tok.pad_token_id
    return refusaldir.load_model(hf, tokenizer=tok)
