"""GPT.generate on CPU: the KV cache against full forwards, greedy against argmax decoding,
sampling (seeded, top_k, top_p, the distribution), batches of prompts of different lengths,
EOS per sequence, bad arguments; one CUDA check of the cached path (marked cuda)."""
import math

import pytest
import torch

import gptkernels
from gptkernels import GPT, GPTConfig
from helpers import peaked_gpt
from gptkernels.gpt.generate import KVCache, pad_prompts, sample_next

V = 53


def tiny_model(**kw):
    return peaked_gpt(V, 40, **kw)


def argmax_decode(model, idx, n):
    """Greedy decoding without a cache: a full forward per new token."""
    for _ in range(n):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


VARIANTS = [dict(), dict(n_kv_head=2),
            dict(n_kv_head=1, pos_embedding="sinusoidal", activation="relu", tie_embeddings=False)]


@pytest.mark.parametrize("kw", VARIANTS)
def test_cached_logits_equal_full_forward(kw):
    """Prefill + one-token decode steps through the cache give the logits of a full forward."""
    model = tiny_model(**kw)
    idx = torch.randint(0, V, (3, 14))
    full, _ = model(idx)
    cache = KVCache(model.config.n_layer, 3, 14)
    with torch.no_grad():
        pre = model.lm_logits(model.hidden_states(idx[:, :9], cache))
        torch.testing.assert_close(pre, full[:, :9], atol=1e-5, rtol=1e-5)
        pos = torch.full((3,), 9)
        for t in range(9, 14):
            step = model.lm_logits(model.hidden_states(idx[:, t:t + 1], cache, cache_pos=pos))
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
            pos = pos + 1


@pytest.mark.parametrize("kw", VARIANTS)
def test_greedy_equals_uncached_argmax(kw):
    model = tiny_model(**kw)
    idx = torch.randint(0, V, (2, 7))
    out = model.generate(idx, 12, temperature=0)
    assert out.shape == (2, 19) and torch.equal(out[:, :7], idx)
    assert torch.equal(out, argmax_decode(model, idx, 12))
    assert len(set(out[0, 7:].tolist())) > 2  # not a degenerate repetition of one token


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny_model()
    idx = torch.randint(0, V, (2, 5))
    greedy = model.generate(idx, 10, temperature=0)
    assert torch.equal(model.generate(idx, 10, temperature=1.3, top_k=1, seed=3), greedy)
    assert torch.equal(model.generate(idx, 10, temperature=1.3, top_p=1e-6, seed=3), greedy)


def test_sampling_reproducible_with_seed():
    model = tiny_model()
    idx = torch.randint(0, V, (3, 4))
    a = model.generate(idx, 15, temperature=1.0, seed=1234)
    b = model.generate(idx, 15, temperature=1.0, seed=1234)
    c = model.generate(idx, 15, temperature=1.0, seed=4321)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # without a seed the global RNG draws; a seeded call uses its own generator and leaves it alone
    torch.manual_seed(7)
    d = model.generate(idx, 15)
    torch.manual_seed(7)
    model.generate(idx, 15, seed=99)
    assert torch.equal(model.generate(idx, 15), d)


def test_sample_next_follows_the_distribution():
    """20000 draws from one row of logits: frequencies within 5 sigma of softmax(logits / T)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20000
    for temp in (1.0, 0.5):
        draws = sample_next(logits.expand(n, -1), temperature=temp, generator=g)
        freq = torch.bincount(draws, minlength=6).double() / n
        p = torch.softmax(logits.double() / temp, -1)
        sigma = (p * (1 - p) / n).sqrt()
        assert torch.all((freq - p).abs() <= 5 * sigma + 1e-9), (freq, p)


def test_sample_next_top_k_and_top_p_sets():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.1, 3.0, 2.0, -1.0, 2.5, 0.0])  # order: 1, 4, 2, 0, 5, 3
    n = 5000
    draws = sample_next(logits.expand(n, -1), temperature=1.0, top_k=3, generator=g)
    assert set(draws.tolist()) == {1, 4, 2}
    p = torch.softmax(logits, -1)
    # nucleus 0.6: p[1] = 0.47 < 0.6, p[1] + p[4] = 0.76 >= 0.6 -> {1, 4}
    assert p[1] < 0.6 <= p[1] + p[4]
    draws = sample_next(logits.expand(n, -1), temperature=1.0, top_p=0.6, generator=g)
    assert set(draws.tolist()) == {1, 4}
    freq4 = (draws == 4).double().mean().item()
    assert abs(freq4 - p[4] / (p[1] + p[4])) < 0.03  # renormalised within the nucleus


def test_batched_prompts_of_different_lengths_equal_one_by_one():
    for kw in VARIANTS:
        model = tiny_model(**kw)
        prompts = [torch.randint(0, V, (n,)).tolist() for n in (5, 11, 1, 8)]
        idx, lens = pad_prompts(prompts, pad_token_id=V - 1)
        out = model.generate(idx, 9, temperature=0, prompt_lens=lens, pad_token_id=0)
        assert out.shape == (4, 11 + 9)
        for b, p in enumerate(prompts):
            alone = model.generate(torch.tensor([p]), 9, temperature=0)[0]
            assert torch.equal(out[b, :len(p) + 9], alone), (kw, b)
            assert torch.all(out[b, len(p) + 9:] == 0)  # the rest is padding


def test_eos_stops_each_sequence():
    model = tiny_model()
    idx = torch.randint(0, V, (3, 6))
    free = model.generate(idx, 12, temperature=0)
    eos = free[0, 6 + 3].item()  # the 4th new token of sequence 0 becomes the EOS token
    out = model.generate(idx, 12, temperature=0, eos_token_id=eos, pad_token_id=V - 1)
    for b in range(3):
        new = free[b, 6:].tolist()
        stop = new.index(eos) + 1 if eos in new else len(new)
        assert out[b, 6:6 + stop].tolist() == new[:stop]
        assert torch.all(out[b, 6 + stop:] == V - 1)  # finished: padding from then on
    assert stop <= 12
    # without pad_token_id, finished sequences keep emitting EOS
    out = model.generate(idx[:1], 12, temperature=0, eos_token_id=eos)
    assert torch.all(out[0, 6 + 4:] == eos) and out.shape == (1, 18)


def test_generate_restores_training_mode_and_disables_dropout():
    model = tiny_model(dropout=0.5).train()
    idx = torch.randint(0, V, (2, 5))
    a = model.generate(idx, 8, temperature=0)
    assert model.training
    assert torch.equal(a, argmax_decode(model.eval(), idx, 8))


def test_generate_zero_new_tokens_and_full_block():
    model = tiny_model()
    idx = torch.randint(0, V, (2, 30))
    assert torch.equal(model.generate(idx, 0), idx)
    out = model.generate(idx, 10, temperature=0)  # exactly block_size = 40
    assert out.shape == (2, 40)


def test_generate_bad_arguments():
    model = tiny_model()
    idx = torch.randint(0, V, (2, 30))
    with pytest.raises(ValueError, match="exceeds block_size=40"):
        model.generate(idx, 11)
    with pytest.raises(ValueError, match="block_size"):
        model.generate(torch.zeros(1, 41, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 53\)"):
        model.generate(torch.tensor([[1, 2, 53]]), 2)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(idx, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(idx, 2, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(idx, 2, top_p=0.0)
    with pytest.raises(ValueError, match="prompt_lens"):
        model.generate(idx, 2, prompt_lens=[30, 31])
    with pytest.raises(ValueError, match="prompt_lens"):
        model.generate(idx, 2, prompt_lens=[3])
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(idx, 2, eos_token_id=V)
    with pytest.raises(ValueError, match="idx"):
        model.generate(torch.zeros(5, dtype=torch.long), 2)
    # padding beyond a prompt's length may hold anything (e.g. -100): it is never embedded
    idx[1, 4:] = -100
    out = model.generate(idx, 3, temperature=0, prompt_lens=[30, 4])
    assert torch.equal(out[1, :7], model.generate(idx[1:, :4], 3, temperature=0)[0])


def test_pad_prompts():
    idx, lens = pad_prompts([[1, 2, 3], [4]], pad_token_id=9)
    assert idx.tolist() == [[1, 2, 3], [4, 9, 9]] and lens.tolist() == [3, 1]
    with pytest.raises(ValueError, match="prompts"):
        pad_prompts([[1], []])


@pytest.mark.cuda
def test_cuda_cached_greedy_is_consistent_with_full_forward():
    """bf16 on the kernel path: every greedy token is (within rounding) the argmax of a full
    forward over the generated sequence, so the cache and the kv_lens decode path agree with the
    uncached model, for a batch of prompts of different lengths."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=128))
    model = model.cuda().to(torch.bfloat16).eval()
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (17, 40, 3)]
    idx, lens = pad_prompts(prompts, device="cuda")
    out = model.generate(idx, 24, temperature=0, prompt_lens=lens)
    for b, p in enumerate(prompts):
        seq = out[b:b + 1, :len(p) + 24]
        with torch.no_grad():
            logits, _ = model(seq)
        logits = logits[0, len(p) - 1:-1].float()  # the logits that chose each new token
        chosen = logits.gather(-1, seq[0, len(p):, None])[:, 0]
        gap = logits.max(-1).values - chosen
        scale = logits.abs().max().item()
        assert torch.all(gap <= 8 * 2.0**-8 * scale), (b, gap.max().item())
    # seeded sampling on the GPU (a CUDA generator) is reproducible
    a = model.generate(idx, 16, temperature=1.0, top_k=50, seed=5, prompt_lens=lens)
    assert torch.equal(a, model.generate(idx, 16, temperature=1.0, top_k=50, seed=5, prompt_lens=lens))
