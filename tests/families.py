"""The model-family matrix: a tiny random model from each family's own ``transformers`` config
class, with a tokenizer whose chat template reproduces that family's published turn format.

The templates below were written for refusaldir from each family's documented turn layout
(role headers, end-of-turn tokens, generation prompt, thinking blocks); they are not copies of
the hub templates and they skip what the tests do not need (tool calls, multi-turn history
rules). :data:`FAMILIES` is also what ``bench/families_table.py`` turns into the README's
supported-families table.

Example:
    >>> from families import FAMILIES, make_family_model  # doctest: +SKIP
    >>> model = make_family_model(FAMILIES["gemma3"])  # doctest: +SKIP
    >>> model.template.post_instruction_tokens  # doctest: +SKIP
    ['<end_of_turn>', '\\n', '<start_of_turn>', 'model', '\\n']
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from tiny import CORPUS, TEST_DEVICE, TEST_DTYPE
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# ----------------------------------------------------------------------------- turn formats
# Each template renders an optional system message, user/assistant turns and the generation
# prompt. ``enable_thinking`` follows the Qwen3 convention: undefined means thinking is on.
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Mistral v0.3 / Ministral: no system turn, the system text leads the last user message.
MISTRAL = (
    "{{ '<s>' }}{% set sys = namespace(text='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set sys.text = m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + sys.text + m['content'] + '[/INST]' }}"
    "{% else %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}"
)
# Mixtral-8x7B-Instruct (v0.1): spaces inside the [INST] markers.
MIXTRAL = (
    "{{ '<s>' }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
    "{{ m['content'] + '</s>' }}{% else %}{{ raise_exception('Mixtral has no system role') }}"
    "{% endif %}{% endfor %}"
)


def _chatml(default_system: str | None, think: str | None) -> str:
    """ChatML turns; ``think``: what the generation prompt appends (``None``: nothing)."""
    head = (
        "{% for m in messages %}"
        + ("{% if loop.first and m['role'] != 'system' %}"
           f"{{{{ '<|im_start|>system\\n{default_system}<|im_end|>\\n' }}}}{{% endif %}}"
           if default_system else "")
        + "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    )
    tail = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    if think is not None:
        tail += think
    return head + tail + "{% endif %}"


_NO_THINK = "{{ '<think>\\n\\n</think>\\n\\n' }}"
QWEN2 = _chatml("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", None)
# Qwen3: thinking is on unless enable_thinking=false, which pre-fills an empty think block.
QWEN3 = _chatml(None, "{% if enable_thinking is defined and enable_thinking is false %}" + _NO_THINK + "{% endif %}")
QWEN3_NO_THINK = _chatml(None, "{% if not (enable_thinking is defined and enable_thinking) %}" + _NO_THINK + "{% endif %}")
# Qwen3.5: the thinking generation prompt opens the think block itself.
QWEN3_5 = _chatml(None, "{% if enable_thinking is defined and enable_thinking is false %}" + _NO_THINK
                  + "{% else %}{{ '<think>\\n' }}{% endif %}")
SMOLLM3 = _chatml("## Metadata\\n\\nReasoning Mode: /no_think\\n\\n## Custom Instructions\\n\\nYou are a helpful AI assistant named SmolLM.",
                  "{{ '<think>\\n\\n</think>\\n' }}")
# Gemma 2: no system role at all. Gemma 3: the system text leads the first user turn.
GEMMA2 = (
    "{{ '<bos>' }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('Gemma 2 has no system role') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
GEMMA3 = (
    "{{ '<bos>' }}{% set sys = namespace(text='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set sys.text = m['content'] | trim + '\\n\\n' %}{% else %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{% if m['role'] == 'user' %}{{ sys.text }}{% set sys.text = '' %}{% endif %}"
    "{{ m['content'] | trim + '<end_of_turn>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# OLMo 2 Instruct: the end-of-text token opens the conversation, turns end with a newline.
OLMO2 = (
    "{{ '<|endoftext|>' }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + m['content'] + '<|endoftext|>\\n' }}{% else %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
GRANITE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|start_of_role|>system<|end_of_role|>You are Granite, an AI language model. You are a helpful assistant.<|end_of_text|>\\n' }}"
    "{% endif %}{{ '<|start_of_role|>' + m['role'] + '<|end_of_role|>' + m['content'] + '<|end_of_text|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_of_role|>assistant<|end_of_role|>' }}{% endif %}"
)
# gpt-oss "harmony": a system message with the reasoning effort, the user's system prompt as a
# developer message, and the assistant turn opened without a channel (the model picks one).
HARMONY = (
    "{{ '<|start|>system<|message|>You are a tiny test model.\\nReasoning: medium\\n\\n"
    "# Valid channels: analysis, commentary, final.<|end|>' }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<|start|>developer<|message|># Instructions\\n\\n' + m['content'] + '<|end|>' }}"
    "{% elif m['role'] == 'user' %}{{ '<|start|>user<|message|>' + m['content'] + '<|end|>' }}"
    "{% else %}{{ '<|start|>assistant<|channel|>final<|message|>' + m['content'] + '<|return|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
)

SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>",
    "<s>", "</s>", "[INST]", "[/INST]", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
    "<think>", "</think>", "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|start|>",
    "<|message|>", "<|channel|>", "<|return|>",
]
# Role words at the start of a line, as they follow a special token in the templates.
_ROLE_WORDS = "\n".join(["system", "user", "assistant", "model", "developer", "final", "ok\n"])


@functools.cache
def _base_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_ROLE_WORDS, "ok\n\n"] * 200 + CORPUS * 20, trainer)
    return tok


def make_family_tokenizer(template: str, eos: str, bos: str | None = None) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_base_tokenizer().to_str()),
        eos_token=eos, pad_token="<pad>", bos_token=bos,
    )
    tok.chat_template = template
    return tok


# ----------------------------------------------------------------------------- the matrix
@dataclass(frozen=True)
class Family:
    """One row of the matrix: how to build the tiny model, and what the tests expect of it.

    ``post``: the golden post-instruction tokens (decoded one by one). ``edit``: how
    ``orthogonalize`` treats the family (``exact``: the weights equal the hook ablation;
    ``norm-exact``: the direction is removed exactly from what reaches the residual stream
    through a sublayer output norm, which changes that norm's scale, so the logits differ
    from the hook ablation by a measured amount). ``refused``: why a stage refuses it.
    """

    name: str
    config: str
    model: str
    template: str
    eos: str
    post: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    bos: str | None = None
    system: bool = True
    edit: str = "exact"
    moe: bool = False
    note: str = ""
    refused: str = ""


#: Stages every working family passes in ``tests/test_families.py`` (one test each).
STAGES = ("template (golden post-instruction tokens)", "capture + extract", "ablation hooks", "addition",
          "generation with KV cache", "fast selection", "guard", "orthogonalize → save → reload")

_MOE = dict(num_experts_per_tok=2)
_CHATML_POST = ("<|im_end|>", "\n", "<|im_start|>", "assistant", "\n")
_EMPTY_THINK = ("<think>", "\n\n", "</think>", "\n\n")
_GEMMA_POST = ("<end_of_turn>", "\n", "<start_of_turn>", "model", "\n")

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "LlamaConfig", "LlamaForCausalLM", LLAMA3, "<|eot_id|>",
           ("<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"),
           dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True), note="Llama-3 headers; tied embeddings, biases"),
    Family("mistral", "MistralConfig", "MistralForCausalLM", MISTRAL, "</s>", ("[/INST]",),
           dict(sliding_window=8), bos="<s>", note="`[INST] … [/INST]`: one post-instruction token"),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", QWEN2, "<|im_end|>", _CHATML_POST,
           note="ChatML, default system prompt"),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", QWEN3_NO_THINK, "<|im_end|>",
           _CHATML_POST + _EMPTY_THINK, dict(head_dim=16), note="ChatML + empty `<think>` block (non-thinking)"),
    Family("qwen3-thinking", "Qwen3Config", "Qwen3ForCausalLM", QWEN3, "<|im_end|>", _CHATML_POST,
           dict(head_dim=16), note="thinking generation prompt"),
    Family("qwen3_5", "Qwen3_5TextConfig", "Qwen3_5ForCausalLM", QWEN3_5, "<|im_end|>",
           _CHATML_POST + ("<think>", "\n"), dict(head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                                                  linear_key_head_dim=16, linear_value_head_dim=16),
           note="hybrid: gated-delta-net token mixers in 3 of 4 layers; generation prompt opens `<think>`"),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", GEMMA2, "<end_of_turn>", _GEMMA_POST,
           dict(head_dim=16, sliding_window=8, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
           bos="<bos>", system=False, edit="norm-exact", note="post-sublayer norms, softcapping, no system role"),
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3, "<end_of_turn>", _GEMMA_POST,
           dict(head_dim=16, sliding_window=8), bos="<bos>", edit="norm-exact",
           note="post-sublayer norms, q/k norms, system text folded into the user turn"),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", PHI3, "<|end|>", ("<|end|>", "\n", "<|assistant|>", "\n"),
           note="fused qkv and gate_up projections"),
    Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM", OLMO2, "<|endoftext|>", ("\n", "<|assistant|>", "\n"),
           edit="norm-exact", note="norms after each sublayer only (no pre-norms)"),
    Family("granite", "GraniteConfig", "GraniteForCausalLM", GRANITE, "<|end_of_text|>",
           ("<|end_of_text|>", "\n", "<|start_of_role|>", "assistant", "<|end_of_role|>"),
           dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0),
           note="embedding/residual/logit multipliers"),
    Family("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", SMOLLM3, "<|im_end|>",
           _CHATML_POST + ("<think>", "\n\n", "</think>", "\n"), dict(no_rope_layer_interval=2),
           note="ChatML with metadata system block, /no_think"),
    Family("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", QWEN2, "<|im_end|>", _CHATML_POST,
           dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48, **_MOE),
           moe=True, note="experts + gated shared expert"),
    Family("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", QWEN3_NO_THINK, "<|im_end|>",
           _CHATML_POST + _EMPTY_THINK, dict(head_dim=16, num_experts=4, moe_intermediate_size=32, **_MOE),
           moe=True, note="fused 3-D expert tensors"),
    Family("mixtral", "MixtralConfig", "MixtralForCausalLM", MIXTRAL, "</s>", (" ", "[/INST]"),
           dict(num_local_experts=4, **_MOE), bos="<s>", system=False, moe=True,
           note="fused 3-D expert tensors, `[INST]` with spaces"),
    Family("gpt_oss", "GptOssConfig", "GptOssForCausalLM", HARMONY, "<|return|>",
           ("<|end|>", "<|start|>", "assistant"), dict(head_dim=16, num_local_experts=4, sliding_window=8, **_MOE),
           moe=True, note="harmony format; attention sinks; expert biases"),
    Family("mamba", "MambaConfig", "MambaForCausalLM", _chatml(None, None), "<|im_end|>", _CHATML_POST,
           dict(state_size=8), edit="refused", note="state-space (selective-scan) blocks",
           refused="everything, at load, with one error naming the family: state-space blocks have no attention or MLP output writing into a residual stream"),
]}

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=None)


def make_family_hf(fam: Family, vocab_size: int, seed: int = 0) -> Any:
    """The family's random tiny ``transformers`` model, norms and biases perturbed so that
    every gain and offset matters (as in ``tiny.make_hf_model``)."""
    import transformers

    torch.manual_seed(seed)
    cfg_cls = getattr(transformers, fam.config)
    cfg = cfg_cls(**{**_COMMON, "vocab_size": vocab_size, **fam.overrides})
    cfg.architectures = [fam.model]  # what a saved checkpoint records
    model = getattr(transformers, fam.model)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "sinks" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_family_model(fam: Family, seed: int = 0) -> Any:
    """A ``refusaldir.ChatModel`` for ``fam`` on the test device and dtype."""
    import refusaldir

    tok = make_family_tokenizer(fam.template, fam.eos, fam.bos)
    hf = make_family_hf(fam, len(tok), seed).to(device=TEST_DEVICE, dtype=TEST_DTYPE)
    hf.generation_config.eos_token_id = tok.eos_token_id
    hf.generation_config.pad_token_id = tok.pad_token_id
    return refusaldir.load_model(hf, tokenizer=tok)
