"""attn_implementation="gptkernels": which masks the kernels express (gptkernels.hf.attention.analyse_mask)
and the attention function against transformers' sdpa_attention_forward on the masks transformers
builds (causal, padded, static cache, sliding window, GQA, bidirectional). CPU: our op's reference
path; the @cuda tests run the kernels."""
import types

import pytest
import torch

pytest.importorskip("transformers")

from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function,  # noqa: E402
                                        sdpa_mask, sliding_window_causal_mask_function)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

import gptkernels.hf  # noqa: E402,F401  (registers "gptkernels")
import hf_models as M  # noqa: E402
from gptkernels.hf import attention as A  # noqa: E402


def _module(hq, hkv, causal=True):
    return types.SimpleNamespace(num_key_value_groups=hq // hkv, is_causal=causal, training=False)


def _qkv(b, hq, hkv, sq, sk, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g).transpose(1, 2)  # (B, H, S, D) views of (B, S, H, D), as HF's
    k = torch.randn(b, sk, hkv, d, generator=g).transpose(1, 2)
    v = torch.randn(b, sk, hkv, d, generator=g).transpose(1, 2)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _mask(b, sq, sk, pad=None, q_offset=0, fn=causal_mask_function, **kw):
    """The mask transformers builds for "gptkernels" (= sdpa's), pad: 2-D [B, Sk] padding mask."""
    return A.gptkernels_mask(batch_size=b, q_length=sq, kv_length=sk, q_offset=q_offset, kv_offset=0,
                             mask_function=fn, attention_mask=pad, **kw)


def _compare(mod, q, k, v, mask, scaling=None, expect_path="flash_attention"):
    A.PATHS.clear()
    got, _ = A.gptkernels_attention_forward(mod, q, k, v, mask, scaling=scaling)
    assert A.PATHS[expect_path] > 0, dict(A.PATHS)
    ref, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=scaling)
    truth, _ = sdpa_attention_forward(mod, q.double(), k.double(), v.double(), mask, scaling=scaling)
    assert got.shape == ref.shape
    M.check("attention", got, ref, truth)


def _pad(lens, sk, left=False):
    m = torch.arange(sk)[None, :] < torch.tensor(lens)[:, None]
    return m.flip(1) if left else m


def test_registered_in_both_interfaces():
    assert A.NAME == gptkernels.hf.ATTN_IMPLEMENTATION == "gptkernels"
    assert ALL_ATTENTION_FUNCTIONS["gptkernels"] is A.gptkernels_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["gptkernels"] is A.gptkernels_mask


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_no_mask_causal_and_decode(hq, hkv):
    mod = _module(hq, hkv)
    _compare(mod, *_qkv(2, hq, hkv, 9, 9), None)              # causal
    _compare(mod, *_qkv(2, hq, hkv, 1, 9), None)              # one query row: every key
    _compare(mod, *_qkv(2, hq, hkv, 5, 11), None, scaling=0.3)  # static-cache prefill: keys cropped to Sq
    _compare(_module(hq, hkv, causal=False), *_qkv(2, hq, hkv, 5, 11), None)  # non-causal module


def test_more_queries_than_keys_goes_to_sdpa():
    _compare(_module(4, 4), *_qkv(1, 4, 4, 7, 5), None, expect_path="sdpa")  # top-left causal: not ours


def test_static_cache_decode_uses_kv_lens():
    # decoding position 6 of a 10-slot static cache: keys 0..6 valid, 7..9 empty (NaN must not leak)
    pad = _pad([7, 7], 10)
    mask = _mask(2, 1, 10, pad=pad, q_offset=6)
    plan = A.mask_plan(mask)
    assert plan.kind == "kernel" and plan.kv_lens.tolist() == [7, 7]
    q, k, v = _qkv(2, 4, 2, 1, 10)
    k, v = k.clone(), v.clone()
    k[:, :, 7:] = 1e4  # garbage past the fill: sdpa masks it, the kernel never reads it
    v[:, :, 7:] = -1e4
    _compare(_module(4, 2), q, k, v, mask)
    got, _ = A.gptkernels_attention_forward(_module(4, 2), q, k, v, mask)
    k[:, :, 7:] = v[:, :, 7:] = float("nan")
    torch.testing.assert_close(A.gptkernels_attention_forward(_module(4, 2), q, k, v, mask)[0], got)


def test_right_padded_square_splits_rows():
    pad = _pad([9, 5, 9], 9)
    mask = _mask(3, 9, 9, pad=pad)
    plan = A.mask_plan(mask)
    assert plan.kind == "split" and plan.lens.tolist() == [9, 5, 9] and plan.first_padded == 5
    _compare(_module(4, 2), *_qkv(3, 4, 2, 9, 9), mask, expect_path="split")


def test_bidirectional_padding_is_a_prefix():
    pad = _pad([6, 9], 9)
    mask = A.gptkernels_mask(batch_size=2, q_length=9, kv_length=9, mask_function=lambda b, h, q, kv: kv >= 0,
                             attention_mask=pad, allow_is_bidirectional_skip=True)
    plan = A.mask_plan(mask)
    assert plan.kind == "kernel" and not plan.causal and plan.kv_lens.tolist() == [6, 9]
    _compare(_module(4, 4, causal=False), *_qkv(2, 4, 4, 9, 9), mask)


@pytest.mark.parametrize("case", ["left padding", "sliding window", "packed"])
def test_inexpressible_masks_go_to_sdpa(case):
    if case == "left padding":
        mask = _mask(2, 9, 9, pad=_pad([9, 6], 9, left=True))
    elif case == "sliding window":  # without the layer's sliding_window (tests/test_hf_variants.py has it)
        mask = _mask(1, 9, 9, fn=sliding_window_causal_mask_function(4), allow_is_causal_skip=False)
    else:  # two sequences packed in one row
        seq = torch.tensor([0] * 4 + [1] * 5)
        mask = _mask(1, 9, 9, fn=lambda b, h, q, kv: (kv <= q) & (seq[q] == seq[kv]), allow_is_causal_skip=False)
    assert A.mask_plan(mask) is None
    _compare(_module(4, 4), *_qkv(mask.shape[0], 4, 4, 9, 9), mask, expect_path="sdpa")


def test_materialised_plain_causal_mask_needs_no_kv_lens():
    mask = _mask(2, 6, 6, allow_is_causal_skip=False)
    plan = A.mask_plan(mask)
    assert plan.kind == "kernel" and plan.causal and plan.kv_lens is None


def test_plan_survives_contiguous_and_user_masks_are_analysed():
    mask = _mask(3, 1, 8, pad=_pad([5, 8, 3], 8), q_offset=0)
    assert mask.contiguous() is mask  # generate() calls .contiguous() on it
    user = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()  # a 4-D mask the user passes in
    assert A.mask_plan(user).kind == "kernel"
    _compare(_module(4, 4), *_qkv(2, 4, 4, 6, 6), user)
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~user, float("-inf"))  # float masks: sdpa
    _compare(_module(4, 4), *_qkv(2, 4, 4, 6, 6), additive, expect_path="sdpa")


def test_dropout_position_bias_and_softcap():
    mod = _module(4, 4)
    q, k, v = _qkv(1, 4, 4, 5, 5)
    A.PATHS.clear()
    A.gptkernels_attention_forward(mod, q, k, v, None, dropout=0.1)
    A.gptkernels_attention_forward(mod, q, k, v, None, position_bias=torch.zeros(1, 4, 5, 5))
    assert A.PATHS == {"sdpa": 2}
    A.gptkernels_attention_forward(mod, q, k, v, None, softcap=30.0)  # the kernels cap (tests/test_hf_variants.py)
    assert A.PATHS["flash_attention"] == 1
    with pytest.raises(ValueError, match="softcap"):  # not the kernels', and no eager function to run: as sdpa
        A.gptkernels_attention_forward(mod, q, k, v, None, dropout=0.1, softcap=30.0)


def test_gradients_with_kv_lens_go_to_sdpa():
    mask = _mask(2, 1, 8, pad=_pad([5, 8], 8), q_offset=4)
    q, k, v = (t.detach().requires_grad_() for t in _qkv(2, 4, 4, 1, 8))
    A.PATHS.clear()
    A.gptkernels_attention_forward(_module(4, 4), q, k, v, mask)[0].sum().backward()
    assert A.PATHS == {"sdpa": 1} and q.grad is not None


def test_from_pretrained_and_set_attn_implementation(tmp_path):
    import transformers
    ref = M.make("llama")
    ref.save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="gptkernels")
    assert model.config._attn_implementation == "gptkernels"
    x = torch.randint(3, M.V, (2, 10))
    A.PATHS.clear()
    with torch.no_grad():
        got = model.eval()(x).logits
        ref.eval().set_attn_implementation("gptkernels")
        again = ref(x).logits
    assert A.PATHS["flash_attention"] == 4
    torch.testing.assert_close(got, again, rtol=0, atol=0)


# ---- on a GPU: the kernels (bf16) -----------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("hq,hkv,sq,sk", [(4, 4, 64, 64), (8, 2, 1, 77), (4, 1, 33, 33)])
def test_cuda_kernel_matches_sdpa(hq, hkv, sq, sk):
    """bf16 kernel vs sdpa: within 2x of sdpa's own bf16 error against float64 (+ a bf16 rounding)."""
    q, k, v = (t.cuda() for t in _qkv(2, hq, hkv, sq, sk, d=64, dtype=torch.bfloat16))
    mod = _module(hq, hkv)
    A.PATHS.clear()
    got, _ = A.gptkernels_attention_forward(mod, q, k, v, None)
    assert A.PATHS == {"flash_attention": 1}
    ref, _ = sdpa_attention_forward(mod, q, k, v, None)
    truth, _ = sdpa_attention_forward(mod, q.double(), k.double(), v.double(), None)
    err, err_ref = (got.double() - truth).abs().max(), (ref.double() - truth).abs().max()
    assert err <= 2 * err_ref + 2**-8 * truth.abs().max(), (err, err_ref)


@pytest.mark.cuda
def test_cuda_unsupported_head_dim_runs_sdpa():
    q, k, v = (t.cuda() for t in _qkv(1, 4, 4, 16, 16, d=12, dtype=torch.bfloat16))  # not a multiple of 8
    A.PATHS.clear()
    A.gptkernels_attention_forward(_module(4, 4), q, k, v, None)
    assert A.PATHS == {"sdpa": 1}


def _neo_module(attention_type="global", window=8, max_pos=32):
    bias = torch.ones(max_pos, max_pos, dtype=torch.bool).tril()
    if attention_type == "local":
        bias = torch.bitwise_xor(bias, torch.ones(max_pos, max_pos, dtype=torch.bool).tril(-window))
    return types.SimpleNamespace(config=types.SimpleNamespace(window_size=window), attention_type=attention_type,
                                 attn_dropout=torch.nn.Dropout(0.0), training=False, is_causal=True,
                                 bias=bias[None, None])


@pytest.mark.parametrize("case", ["causal", "window bites", "full mask, several rows", "full mask, one row"])
def test_gpt_neo_attention(case):
    """GPT-Neo's own attention: its bottom-right causal / local-window `bias` AND the model's mask,
    no scaling; reference: the same intersection in float64 sdpa."""
    sq, sk, mask, kind = 9, 9, None, "global"
    if case == "window bites":
        kind = "local"
    elif case.startswith("full mask"):  # keys [0, K_b) for every row: exact in the kernel only for one row
        sq = 4 if "several" in case else 1
        sk = 10
        mask = A.gptkernels_mask(batch_size=2, q_length=sq, kv_length=sk, mask_function=lambda b, h, q, kv: kv >= 0,
                                 attention_mask=_pad([5, 10], sk), allow_is_bidirectional_skip=True)
    mod = _neo_module(kind, window=4)
    q, k, v = _qkv(2, 4, 4, sq, sk)
    A.PATHS.clear()
    got, _ = A.gpt_neo_attn(mod, q, k, v, mask)
    expect = {"causal": "flash_attention", "window bites": "sdpa", "full mask, several rows": "sdpa",
              "full mask, one row": "flash_attention"}[case]
    assert set(A.PATHS) == {expect}, dict(A.PATHS)
    allowed = mod.bias[:, :, sk - sq: sk, :sk] & (mask if mask is not None else True)
    truth = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed,
                                                             scale=1.0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0)
    M.check(f"gpt-neo {case}", got, ref, truth)
