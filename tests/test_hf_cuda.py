"""gptkernels.hf on a GPU (marked cuda: skipped without one): bf16 GPT-2- and Llama-shaped models,
patched vs unpatched, with the kernels on every patched path (no fallback warning), and a static
cache decoding step through the kv_lens kernel. Tolerance: hf_models.check with the float64 truth,
floored at a couple of bf16 roundings of the largest value."""
import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import gptkernels.hf  # noqa: E402
import hf_models as M  # noqa: E402
from gptkernels.hf import attention as A  # noqa: E402

pytestmark = pytest.mark.cuda
SHAPES = {"gpt2": dict(n_embd=256, n_head=4), "llama": dict(hidden_size=256, intermediate_size=512,
                                                             num_attention_heads=4, num_key_value_heads=2)}


def _trio(model_type):
    ref = M.make(model_type, **SHAPES[model_type]).cuda()
    truth = copy.deepcopy(ref).double()
    ref = ref.to(torch.bfloat16)
    patched = gptkernels.hf.patch(copy.deepcopy(ref))
    return ref, patched, truth


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_cuda_bf16_forward_backward(model_type):
    ref, patched, truth = _trio(model_type)
    x = torch.randint(3, M.V, (2, 64), device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        A.PATHS.clear()
        outs = []
        for m in (ref, patched, truth):
            m.train().zero_grad(set_to_none=True)
            out = m(input_ids=x, labels=x)
            out.loss.backward()
            outs.append(out)
    fallbacks = [str(w.message) for w in caught if "reference path" in str(w.message)]
    assert not fallbacks, fallbacks
    assert A.PATHS["flash_attention"] > 0 and A.PATHS["sdpa"] == 0, dict(A.PATHS)
    assert outs[1].logits is None
    u = 2.0**-8
    floor = lambda t: 2 * u * t.abs().max().item()  # noqa: E731
    for name, got, r, t in [("loss", outs[1].loss, outs[0].loss, outs[2].loss)] + [
            (n, q.grad, p.grad, tt.grad) for (n, p), q, tt in zip(ref.named_parameters(), patched.parameters(),
                                                                  truth.parameters())]:
        err = (got.double() - t.double()).abs().max().item()
        err_ref = (r.double() - t.double()).abs().max().item()
        assert err <= 3 * err_ref + floor(t.double()), (name, err, err_ref)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_cuda_static_cache_decode_step(model_type):
    """Prefill 11 tokens into a 16-slot static cache, then decode one: the mask is "causal over the first
    12 keys", run by the kernel with kv_lens."""
    from transformers import StaticCache
    ref, patched, truth = _trio(model_type)
    x = torch.randint(3, M.V, (2, 12), device="cuda")
    logits = []
    for m in (ref, patched, truth):
        cache = StaticCache(config=m.config, max_cache_len=16)
        with torch.no_grad():
            m.eval()(x[:, :-1], cache=cache, use_cache=True)
            A.PATHS.clear()
            logits.append(m(x[:, -1:], cache=cache, use_cache=True).logits)
        if m is patched:
            assert A.PATHS == {"flash_attention": m.config.num_hidden_layers}, dict(A.PATHS)
    got, r, t = logits
    err, err_ref = (got.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
    assert err <= 3 * err_ref + 2 * 2.0**-8 * t.abs().max().item(), (err, err_ref)
