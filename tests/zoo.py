"""Tiny, randomly initialised Hugging Face models for tests.

No pretrained weights are used: every model is built from a tiny config with
``torch.manual_seed(seed)`` so that it is deterministic and fast on CPU.

Usage::

    from zoo import ARCH_NAMES, tiny_config, tiny_model

    model = tiny_model("llama")                 # LlamaForCausalLM, eval, float32
    base = tiny_model("bert", head=False)       # BertModel instead of BertForMaskedLM
    cfg = tiny_config("mistral", sliding_window=8)

All sizes: 4 layers, hidden 64, 4 heads (2 kv heads where the family has GQA),
intermediate 128, vocab 128, max positions 128. MoE: 4 experts, top-2, all
layers MoE. Sliding-window families use a window of 16 so that sequences can
go past it. Dropout probabilities are 0. ``use_cache`` keeps the family default.
"""

from __future__ import annotations

import copy

import torch
import transformers as hf
from torch import nn
from transformers import PretrainedConfig

# Sizes shared by every family (each family maps them onto its own field names).
LAYERS = 4
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
VOCAB = 128
MAX_POS = 128
EXPERTS = 4
TOP_K = 2
WINDOW = 16

# Token ids inside the tiny vocab (several families default to ids >= 128).
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Llama-style families (hidden_size / num_hidden_layers / ... naming).
_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    max_position_embeddings=MAX_POS,
    **_TOKENS,
)
_GQA = dict(num_key_value_heads=KV_HEADS)
_MOE = dict(
    num_experts=EXPERTS,
    num_experts_per_tok=TOP_K,
    moe_intermediate_size=INTERMEDIATE // 2,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)
_GEMMA = dict(head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS, sliding_window=WINDOW)

# name -> (config class, causal-LM / head class, base model class, config kwargs)
_REGISTRY: dict[str, tuple[type, type, type, dict]] = {
    "gpt2": (
        hf.GPT2Config,
        hf.GPT2LMHeadModel,
        hf.GPT2Model,
        dict(
            vocab_size=VOCAB, n_positions=MAX_POS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
            n_inner=INTERMEDIATE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            summary_first_dropout=0.0, **_TOKENS,
        ),
    ),
    "llama": (hf.LlamaConfig, hf.LlamaForCausalLM, hf.LlamaModel, dict(**_LLAMA_LIKE, **_GQA)),
    "qwen2": (
        hf.Qwen2Config,
        hf.Qwen2ForCausalLM,
        hf.Qwen2Model,
        # layers >= max_window_layers use sliding attention: layers 0,1 full, 2,3 sliding.
        dict(**_LLAMA_LIKE, **_GQA, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    ),
    "mistral": (
        hf.MistralConfig, hf.MistralForCausalLM, hf.MistralModel,
        dict(**_LLAMA_LIKE, **_GQA, sliding_window=WINDOW),
    ),
    "gpt_neox": (
        hf.GPTNeoXConfig, hf.GPTNeoXForCausalLM, hf.GPTNeoXModel,
        dict(**_LLAMA_LIKE, attention_dropout=0.0, hidden_dropout=0.0),
    ),
    "phi3": (
        hf.Phi3Config, hf.Phi3ForCausalLM, hf.Phi3Model,
        dict(**_LLAMA_LIKE, **_GQA, original_max_position_embeddings=MAX_POS,
             resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
    ),
    "gemma2": (
        hf.Gemma2Config, hf.Gemma2ForCausalLM, hf.Gemma2Model,
        # default layer_types alternate sliding / full
        dict(**_LLAMA_LIKE, **_GQA, **_GEMMA),
    ),
    "gemma3": (
        hf.Gemma3TextConfig, hf.Gemma3ForCausalLM, hf.Gemma3TextModel,
        # default pattern (5 sliding : 1 full) would make all 4 layers sliding; alternate instead
        dict(**_LLAMA_LIKE, **_GQA, **_GEMMA, layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2)),
    ),
    "opt": (
        hf.OPTConfig, hf.OPTForCausalLM, hf.OPTModel,
        dict(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=INTERMEDIATE,
            num_attention_heads=HEADS, max_position_embeddings=MAX_POS, word_embed_proj_dim=HIDDEN,
            dropout=0.0, attention_dropout=0.0, layerdrop=0.0, **_TOKENS,
        ),
    ),
    "bert": (
        hf.BertConfig, hf.BertForMaskedLM, hf.BertModel,
        dict(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POS,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        ),
    ),
    "mixtral": (
        hf.MixtralConfig, hf.MixtralForCausalLM, hf.MixtralModel,
        dict(**_LLAMA_LIKE, **_GQA, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K),
    ),
    "qwen2_moe": (
        hf.Qwen2MoeConfig, hf.Qwen2MoeForCausalLM, hf.Qwen2MoeModel,
        dict(**_LLAMA_LIKE, **_GQA, **_MOE, shared_expert_intermediate_size=INTERMEDIATE),
    ),
    "qwen3_moe": (
        hf.Qwen3MoeConfig, hf.Qwen3MoeForCausalLM, hf.Qwen3MoeModel,
        dict(**_LLAMA_LIKE, **_GQA, **_MOE),
    ),
    "olmoe": (
        hf.OlmoeConfig, hf.OlmoeForCausalLM, hf.OlmoeModel,
        dict(**_LLAMA_LIKE, **_GQA, num_experts=EXPERTS, num_experts_per_tok=TOP_K),
    ),
    "phimoe": (
        hf.PhimoeConfig, hf.PhimoeForCausalLM, hf.PhimoeModel,
        dict(**_LLAMA_LIKE, **_GQA, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K),
    ),
    "granitemoe": (
        hf.GraniteMoeConfig, hf.GraniteMoeForCausalLM, hf.GraniteMoeModel,
        dict(**_LLAMA_LIKE, **_GQA, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K),
    ),
    # DeepSeek: block 0 keeps a dense MLP (first_k_dense_replace), the others route; experts in 2 groups.
    "deepseek_v2": (
        hf.DeepseekV2Config, hf.DeepseekV2ForCausalLM, hf.DeepseekV2Model,
        dict(**_LLAMA_LIKE, n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=32,
             first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=None,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    ),
    "deepseek_v3": (
        hf.DeepseekV3Config, hf.DeepseekV3ForCausalLM, hf.DeepseekV3Model,
        dict(**_LLAMA_LIKE, n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=32,
             first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=32,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    ),
    "jetmoe": (
        hf.JetMoeConfig, hf.JetMoeForCausalLM, hf.JetMoeModel,
        dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_key_value_heads=KV_HEADS,
             kv_channels=HIDDEN // HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POS,
             num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, **_TOKENS),
    ),
    "gpt_oss": (
        hf.GptOssConfig, hf.GptOssForCausalLM, hf.GptOssModel,
        dict(**_LLAMA_LIKE, **_GQA, head_dim=HIDDEN // HEADS, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
             sliding_window=WINDOW),
    ),
}

# The families every test sweeps; the further MoE families are swept by the router tests (MOE_NAMES).
ARCH_NAMES: tuple[str, ...] = tuple(_REGISTRY)[: list(_REGISTRY).index("qwen3_moe") + 1]
MOE_NAMES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "granitemoe", "deepseek_v2",
                              "deepseek_v3", "jetmoe", "gpt_oss")


def _entry(name: str) -> tuple[type, type, type, dict]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCH_NAMES)}") from None


def tiny_config(name: str, **overrides) -> PretrainedConfig:
    """The tiny config for ``name``; ``overrides`` replace/extend the config kwargs."""
    config_cls, head_cls, _, kwargs = _entry(name)
    kwargs = copy.deepcopy({**kwargs, **overrides})  # no shared lists between configs
    config = config_cls(**kwargs)
    if "attn_implementation" not in overrides:
        config._attn_implementation = "sdpa" if getattr(head_cls, "_supports_sdpa", False) else "eager"
    return config


def tiny_model(name: str, seed: int = 0, *, head: bool = True, **overrides) -> nn.Module:
    """A freshly initialised tiny model in eval mode, float32.

    ``head=True`` builds the causal-LM class (``BertForMaskedLM`` for bert);
    ``head=False`` builds the bare base model (``LlamaModel``, ``BertModel``, ...).
    """
    _, head_cls, base_cls, _ = _entry(name)
    config = tiny_config(name, **overrides)
    torch.manual_seed(seed)
    model = (head_cls if head else base_cls)(config)
    return model.to(torch.float32).eval()


# Encoder–decoder families: 2 encoder and 3 decoder blocks (so that N and % must count within a stack; T5: 3 and
# 3, as its generation cache is sized by the encoder's count), hidden
# 32, 4 heads, FFN 64; a source of up to 64 tokens (Whisper: 24 frames of 8 mel bins, 12 encoder positions).
_SEQ2SEQ_SIZES = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None)
SEQ2SEQ: dict[str, tuple[type, type, dict]] = {
    "t5": (hf.T5Config, hf.T5ForConditionalGeneration,
           dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=3, num_heads=4,
                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)),
    "bart": (hf.BartConfig, hf.BartForConditionalGeneration, _SEQ2SEQ_SIZES),
    "marian": (hf.MarianConfig, hf.MarianMTModel, {**_SEQ2SEQ_SIZES, "decoder_start_token_id": 0}),
    "whisper": (hf.WhisperConfig, hf.WhisperForConditionalGeneration,
                {**{k: v for k, v in _SEQ2SEQ_SIZES.items() if k not in ("max_position_embeddings", "forced_eos_token_id")},
                 "num_mel_bins": 8, "max_source_positions": 12, "max_target_positions": 64, "begin_suppress_tokens": None,
                 "suppress_tokens": None}),
}


def tiny_seq2seq(name: str, seed: int = 0) -> nn.Module:
    """A tiny encoder–decoder model of this family (see SEQ2SEQ), in eval mode, float32."""
    config_cls, model_cls, kwargs = SEQ2SEQ[name]
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    return model_cls(config).to(torch.float32).eval()


__all__ = ["ARCH_NAMES", "MOE_NAMES", "SEQ2SEQ", "tiny_config", "tiny_model", "tiny_seq2seq"]
