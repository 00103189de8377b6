"""attn_implementation="gptkernels" with HF's attention variants: sliding windows (Mistral; Gemma-2's
local layers) and attention softcapping (Gemma-2). The attention function against HF's masks and
Gemma-2's eager function, then tiny random models run with "gptkernels" against the same models run
with "eager": logits, loss, every gradient, right-padded batches, greedy generation token for token,
and the PATHS counter showing that flash_attention (not a fallback) ran. CPU: our op's reference path."""
import copy
import types

import pytest
import torch

pytest.importorskip("transformers")

from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import sliding_window_causal_mask_function  # noqa: E402
from transformers.models.gemma2 import modeling_gemma2  # noqa: E402

import gptkernels.hf  # noqa: E402,F401  (registers "gptkernels")
import hf_models as M  # noqa: E402
from gptkernels.hf import attention as A  # noqa: E402


def _qkv(b, hq, hkv, sq, sk, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, sq, hq, d, generator=g).transpose(1, 2),
            torch.randn(b, sk, hkv, d, generator=g).transpose(1, 2),
            torch.randn(b, sk, hkv, d, generator=g).transpose(1, 2))


def _window_mask(b, sq, sk, w, lens=None, q_offset=0):
    """The mask HF builds for a sliding window of w keys (Mistral's create_sliding_window_causal_mask)."""
    pad = None if lens is None else torch.arange(sk)[None, :] < torch.tensor(lens)[:, None]
    return A.gptkernels_mask(batch_size=b, q_length=sq, kv_length=sk, q_offset=q_offset, kv_offset=0,
                             mask_function=sliding_window_causal_mask_function(w), attention_mask=pad,
                             allow_is_causal_skip=False)


def _gemma_module():
    """A Gemma-2 attention module (4 query heads, 2 KV heads, head_dim 16): its model file has the
    eager function the softcap fallback runs."""
    import transformers
    cfg = getattr(transformers, M.variant_configs()["gemma2"][0])(**{**M.COMMON, **M.variant_configs()["gemma2"][1]})
    return modeling_gemma2.Gemma2Attention(cfg, layer_idx=0).eval()


def _eager_ref(mod, q, k, v, mask, softcap=None, scaling=None):
    """Gemma-2's eager attention (HF's own softcap math) on the boolean mask made additive."""
    add = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, torch.finfo(q.dtype).min)
    return modeling_gemma2.eager_attention_forward(mod, q, k, v, add, scaling=scaling, softcap=softcap)[0]


@pytest.mark.parametrize("case", ["square", "prefill after a cache", "decode", "static-cache decode", "right padded"])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_window_and_softcap_match_eager(case, softcap):
    """Each mask shape the causal path takes, now within a biting window of 4 keys (HF: i - 4 < j <= i,
    flash_attention window (3, 0)), with and without a softcap; reference: Gemma-2's eager function."""
    b, sq, sk, lens, q_offset, expect = 2, 11, 11, None, 0, {"flash_attention"}
    if case == "prefill after a cache":
        sq, q_offset = 5, 6
    elif case == "decode":
        sq, q_offset = 1, 10
    elif case == "static-cache decode":  # 16 slots, 9 filled: kv_lens
        sq, sk, lens, q_offset = 1, 16, [9, 9], 8
    elif case == "right padded":
        lens, expect = [11, 6], {"flash_attention", "split"} | ({"eager"} if softcap else set())
    mask = _window_mask(b, sq, sk, 4, lens, q_offset)
    plan = A.mask_plan(mask, 3)
    assert plan is not None and plan.window_left == 3
    assert A.mask_plan(mask) is None  # the window bites: not expressible without it
    mod = _gemma_module()
    q, k, v = _qkv(b, 4, 2, sq, sk)
    A.PATHS.clear()
    got, _ = A.gptkernels_attention_forward(mod, q, k, v, mask, scaling=0.3, sliding_window=4, softcap=softcap)
    assert set(A.PATHS) == expect, dict(A.PATHS)
    ref = _eager_ref(mod, q, k, v, mask, softcap, 0.3)
    truth = _eager_ref(mod, q.double(), k.double(), v.double(), mask, softcap, 0.3)
    rows = slice(None) if lens is None or sq == 1 else (torch.arange(sq)[None, :] < torch.tensor(lens)[:, None])
    M.check(f"{case} softcap={softcap}", got[rows], ref[rows], truth[rows])
    if lens is not None and sq > 1:  # the padded rows: sdpa's rows (softcap: eager's)
        want = ref if softcap else sdpa_attention_forward(mod, q, k, v, mask, scaling=0.3)[0]
        torch.testing.assert_close(got, want)


def test_window_hint_must_match_the_mask():
    """sliding_window is only a hint: a mask of another window (or none) is analysed as it is."""
    mask = _window_mask(1, 9, 9, 4)
    mod = types.SimpleNamespace(num_key_value_groups=1, is_causal=True, training=False)
    q, k, v = _qkv(1, 4, 4, 9, 9)
    for hint in (3, 5):
        A.PATHS.clear()
        got, _ = A.gptkernels_attention_forward(mod, q, k, v, mask, sliding_window=hint)
        assert A.PATHS == {"sdpa": 1}, (hint, dict(A.PATHS))
    A.PATHS.clear()  # a window wider than the sequence does not bite: the plain causal plan
    A.gptkernels_attention_forward(mod, q, k, v, _window_mask(1, 9, 9, 16), sliding_window=16)
    assert A.PATHS == {"flash_attention": 1}


def test_softcap_fallbacks():
    """A softcap call the kernels do not take runs the model's eager attention (sdpa would raise); a
    module without one raises as before; a bad softcap is named."""
    mod = _gemma_module()
    q, k, v = _qkv(1, 4, 2, 6, 6)
    left = A.gptkernels_mask(batch_size=1, q_length=6, kv_length=6, mask_function=lambda b, h, i, j: j <= i,
                             attention_mask=torch.tensor([[False, False, True, True, True, True]]))
    A.PATHS.clear()
    got, _ = A.gptkernels_attention_forward(mod, q, k, v, left, scaling=0.25, softcap=2.0)
    assert A.PATHS == {"eager": 1}
    torch.testing.assert_close(got, _eager_ref(mod, q, k, v, left, 2.0, 0.25))
    bare = types.SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    with pytest.raises(ValueError, match="softcap"):
        A.gptkernels_attention_forward(bare, q, k, v, left, softcap=2.0)
    with pytest.raises(ValueError, match="softcap"):
        A.gptkernels_attention_forward(bare, q, k, v, None, softcap=-1.0)


# ---- tiny models: "gptkernels" against HF's "eager" -------------------------------------------------

MODELS = ["mistral", "gemma2"]


def _trio(model_type):
    """(eager fp32, "gptkernels" fp32, eager float64 truth), same weights."""
    ref = M.make(model_type)
    ref.set_attn_implementation("eager")
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("gptkernels")
    return ref, ours, copy.deepcopy(ref).double()


def _tokens(b=2, t=13, seed=1):
    return torch.randint(3, M.V, (b, t), generator=torch.Generator().manual_seed(seed))


def _only_kernel(allow=()):
    paths = {p for p, n in A.PATHS.items() if n}
    assert "flash_attention" in paths and paths <= {"flash_attention", *allow}, dict(A.PATHS)


@pytest.mark.parametrize("model_type", MODELS)
def test_logits_loss_and_gradients_match_eager(model_type):
    ref, ours, truth = _trio(model_type)
    x = _tokens()  # 13 tokens > the window (8 / 4): it bites
    A.PATHS.clear()
    with torch.no_grad():
        r, p, t = (m.eval()(x).logits for m in (ref, ours, truth))
    _only_kernel()
    M.check(f"{model_type} logits", p, r, t)
    A.PATHS.clear()
    outs = []
    for m in (ref, ours, truth):
        m.train().zero_grad(set_to_none=True)
        out = m(input_ids=x, labels=x)
        out.loss.backward()
        outs.append(out.loss.detach())
    _only_kernel()
    M.check(f"{model_type} loss", *outs)
    for (name, a), b, c in zip(ref.named_parameters(), ours.parameters(), truth.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            M.check(f"{model_type} grad {name}", b.grad, a.grad, c.grad)


@pytest.mark.parametrize("model_type", MODELS)
def test_right_padded_batch_matches_eager(model_type):
    ref, ours, truth = _trio(model_type)
    """Padding tails shorter than the window: no row sees no key (float64 eager Gemma-2 turns such a row
    into NaN, which its later layers spread to the whole sequence)."""
    x = _tokens(3, 12)
    am = torch.ones_like(x)
    am[1, 10:] = 0
    am[2, 9:] = 0
    A.PATHS.clear()
    with torch.no_grad():
        r, p, t = (m.eval()(x, attention_mask=am).logits for m in (ref, ours, truth))
    _only_kernel(allow={"split", "eager"})  # the padded rows: sdpa (Mistral) / eager (Gemma-2's softcap)
    assert A.PATHS["split"] > 0
    M.check(f"{model_type} right-padded logits", p, r, t)


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generate_token_for_token(model_type, cache):
    """6 prompt tokens + 12 new ones: past the window, so decoding runs inside it."""
    ref, ours, _ = _trio(model_type)
    x = _tokens(2, 6)
    kw = dict(max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(x))
    if cache == "static":
        kw["cache_implementation"] = "static"
    A.PATHS.clear()
    out = ours.eval().generate(x, **kw)
    _only_kernel()
    assert torch.equal(out, ref.eval().generate(x, **kw))


@pytest.mark.parametrize("model_type", MODELS)
def test_left_padded_generate_falls_back_and_matches(model_type):
    """Left padding is not ours (sdpa; Gemma-2's softcap: its eager function) until the window has slid
    past the padding: token for token all the same."""
    ref, ours, _ = _trio(model_type)
    x = _tokens(3, 6)
    am = torch.ones_like(x)
    am[1, :2] = 0
    am[2, :4] = 0
    kw = dict(max_new_tokens=10, do_sample=False, attention_mask=am)
    A.PATHS.clear()
    out = ours.eval().generate(x, **kw)
    assert A.PATHS["sdpa" if model_type == "mistral" else "eager"] > 0, dict(A.PATHS)
    assert torch.equal(out, ref.eval().generate(x, **kw))


@pytest.mark.cuda
@pytest.mark.parametrize("model_type", MODELS)
def test_cuda_bf16_forward_backward(model_type):
    """On a GPU (not run yet): bf16 with the window / softcap in the kernels (no fallback), loss and
    gradients within 3x eager bf16's own error against float64, floored at two bf16 roundings."""
    ref = M.make(model_type).cuda()
    ref.set_attn_implementation("eager")
    truth = copy.deepcopy(ref).double()
    ref = ref.to(torch.bfloat16)
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("gptkernels")
    x = torch.randint(3, M.V, (2, 40), device="cuda")
    A.PATHS.clear()
    outs = []
    for m in (ref, ours, truth):
        m.train().zero_grad(set_to_none=True)
        out = m(input_ids=x, labels=x)
        out.loss.backward()
        outs.append(out.loss.detach())
    _only_kernel()
    floor = 2 * 2.0**-8
    M.check(f"{model_type} loss", *outs, floor=floor)
    for (name, a), b, c in zip(ref.named_parameters(), ours.parameters(), truth.parameters()):
        if a.grad is not None:
            M.check(f"{model_type} grad {name}", b.grad, a.grad, c.grad, floor=floor)
