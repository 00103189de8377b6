"""Tiny random Hugging Face models and the patched-vs-unpatched comparison rule for the
gptkernels.hf tests (and the CPU smoke run of benchmarks/e2e_hf.py)."""
import copy

import torch

V = 128  # vocabulary of every tiny model
COMMON = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
U32 = 2.0**-24  # unit roundoff of float32


def configs():
    """model_type -> (config class name, kwargs): two layers, width 64, four heads, no dropout."""
    return {
        "gpt2": ("GPT2Config", dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0)),
        # one global and one local layer; window 8 < the test sequences, so the local one bites
        "gpt_neo": ("GPTNeoConfig", dict(num_layers=2, attention_types=[[["global", "local"], 1]], hidden_size=64,
                                         num_heads=4, max_position_embeddings=64, window_size=8,
                                         embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0)),
        "opt": ("OPTConfig", dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                  max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0,
                                  attention_dropout=0.0, activation_function="relu")),
        "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, max_position_embeddings=64, hidden_act="gelu",
                                           attention_dropout=0.0, hidden_dropout=0.0)),
        "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
        "gptj": ("GPTJConfig", dict(n_embd=64, n_head=4, n_layer=2, n_positions=64, rotary_dim=8, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0)),
        "phi": ("PhiConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attention_dropout=0.0)),
        "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=64, n_head=4, n_layer=2, n_positions=64, multi_query=True,
                                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "starcoder2": ("Starcoder2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=64, residual_dropout=0.0,
                                                embedding_dropout=0.0, attention_dropout=0.0)),
        "falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        hidden_dropout=0.0, attention_dropout=0.0)),
        "bloom": ("BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4, hidden_dropout=0.0,
                                      attention_dropout=0.0)),
        # sliding window 8 < the test sequences: the window bites (flash_attention with window (7, 0))
        "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          sliding_window=8)),
    }


def variant_configs():
    """Models for the attention variants only (not patch()'s per-architecture table): Gemma-2 with
    attention softcapping on every layer and a sliding window of 4 on its local (even) layers."""
    return {
        "gemma2": ("Gemma2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=2.0,
                                        final_logit_softcapping=30.0, query_pre_attn_scalar=16,
                                        attention_dropout=0.0)),
    }


def make(model_type: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised *ForCausalLM / *LMHeadModel of the tiny config."""
    import transformers
    cls_name, kw = {**configs(), **variant_configs()}[model_type]
    config = getattr(transformers, cls_name)(**{**COMMON, **kw, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def trio(model_type: str, seed: int = 0, **patch_kw):
    """(unpatched fp32, patched fp32, unpatched float64 "truth") with the same weights."""
    import gptkernels.hf
    ref = make(model_type, seed)
    patched = gptkernels.hf.patch(copy.deepcopy(ref), **patch_kw)
    truth = copy.deepcopy(ref).double()
    return ref, patched, truth


def check(name: str, got, ref, truth, factor: float = 3.0, floor: float = 8 * U32):
    """The patched fp32 result must be as close to the float64 truth as the unpatched fp32 one, up to
    `factor`: max|got - truth| <= factor * max|ref - truth| + 8 u32 max|truth|. Both fp32 paths round
    differently (other GEMM orders, tanh-GELU written differently, attention math vs sdpa), so their
    errors are of the same size but not equal; the floor (relative to max|truth|) covers results both
    compute exactly. Under bf16 autocast pass floor=2 * 2**-8 (two bf16 roundings)."""
    truth = truth.double()
    err = (got.double() - truth).abs().max().item()
    err_ref = (ref.double() - truth).abs().max().item()
    bound = factor * err_ref + floor * truth.abs().max().item()
    assert err <= bound, (f"{name}: patched error {err:.3g} vs the float64 truth exceeds {bound:.3g} "
                          f"({factor}x the unpatched error {err_ref:.3g} + the floor)")
