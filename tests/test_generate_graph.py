"""The CUDA-graph generation path (gptkernels/gpt/cuda_graph.py) against the eager loop.

On the CPU the graph path runs its static-buffer step op by op (generate(..., cuda_graph=True,
capture=False)): the code a graph captures, with the batch padded to its bucket, the KV cache at
its bucketed capacity, the runner's tensors reused across calls and the EOS flags read every 16
steps. It must give the eager loop's tokens exactly, greedy and seeded sampling. The real capture
runs in the test marked cuda (skipped without a GPU)."""
import pytest
import torch

import gptkernels
from gptkernels import GPT, GPTConfig
from helpers import peaked_gpt
from gptkernels.gpt import cuda_graph
from gptkernels.gpt.decode import Sampling, batch_bucket, capacity_bucket, decode_loop, draw_uniforms, sample_tokens
from gptkernels.gpt.generate import generate, pad_prompts

V = 61


def tiny_model(**kw):
    return peaked_gpt(V, 96, **kw)


def static(model, idx, n, **kw):
    return generate(model, idx, n, cuda_graph=True, capture=False, **kw)


def eager(model, idx, n, **kw):
    return generate(model, idx, n, cuda_graph=False, **kw)


SAMPLING = [dict(temperature=0), dict(temperature=1.0, seed=3), dict(temperature=0.7, top_k=5, seed=11),
            dict(temperature=1.3, top_p=0.8, seed=5), dict(temperature=0.9, top_k=20, top_p=0.9, seed=2)]


@pytest.mark.parametrize("kw", SAMPLING, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("lens", [(7,), (5, 11, 1), (9, 3, 14, 2, 6)], ids=lambda t: f"B{len(t)}")
def test_static_step_equals_eager(kw, lens):
    """Batches 1, 3 (padded to 4) and 5 (padded to 8), prompts of different lengths, 40 tokens."""
    model = tiny_model(n_kv_head=2)
    torch.manual_seed(len(lens))
    prompts = [torch.randint(0, V, (n,)).tolist() for n in lens]
    idx, plens = pad_prompts(prompts, pad_token_id=V - 1)
    a = eager(model, idx, 40, prompt_lens=plens, **kw)
    b = static(model, idx, 40, prompt_lens=plens, **kw)
    assert torch.equal(a, b)
    assert len(set(a[0, lens[0]:lens[0] + 40].tolist())) > 3  # not one repeated token


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, top_k=8, seed=7)])
def test_static_step_eos_equals_eager(kw):
    """EOS ends each row at its own step (before and after the 16-step check), the rest is padding;
    the static path keeps stepping until its check but must write only padding."""
    model = tiny_model()
    torch.manual_seed(1)
    idx, plens = pad_prompts([torch.randint(0, V, (n,)).tolist() for n in (6, 3, 9)], pad_token_id=0)
    free = eager(model, idx, 50, prompt_lens=plens, **kw)
    for eos_step in (2, 20):  # the token row 0 emits at this step becomes EOS
        eos = free[0, 6 + eos_step].item()
        a = eager(model, idx, 50, prompt_lens=plens, eos_token_id=eos, pad_token_id=V - 1, **kw)
        b = static(model, idx, 50, prompt_lens=plens, eos_token_id=eos, pad_token_id=V - 1, **kw)
        assert torch.equal(a, b)
        new = a[0, 6:56].tolist()
        stop = new.index(eos) + 1
        assert stop <= eos_step + 1 and all(t == V - 1 for t in new[stop:])
    # every row finished early: the loop stops, the output is the same
    eos = eager(model, idx[1:2, :3], 50, **kw)[0, 3].item()  # its first new token
    a = eager(model, idx[1:2, :3], 50, eos_token_id=eos, **kw)
    b = static(model, idx[1:2, :3], 50, eos_token_id=eos, **kw)
    assert torch.equal(a, b) and torch.all(a[0, 4:] == eos)


@pytest.mark.parametrize("kw", [dict(temperature=0, eos_token_id=7), dict(temperature=1.0, top_p=0.9, seed=1)])
def test_warm_up_before_capture_leaves_no_trace(kw):
    """What a capture does to the state, on the CPU: the warm-up steps run after the prefill and are
    undone (their KV writes at pos, pos + 1 are rewritten before they are read); stepping on from
    there gives the eager tokens."""
    model = tiny_model()
    cuda_graph.release(model)
    idx, lens = pad_prompts([torch.randint(0, V, (n,)).tolist() for n in (4, 9, 2)])
    ref = eager(model, idx, 30, prompt_lens=lens, **kw)
    prompt = torch.cat([idx, idx.new_zeros(1, 9)])  # the padded batch generate() builds
    plens = torch.cat([lens, lens.new_ones(1)])
    s = Sampling.of(kw["temperature"], None, kw.get("top_p"), kw.get("eos_token_id"), V)
    u = None if s.greedy else draw_uniforms(30, 3, kw.get("seed"))
    runner = cuda_graph.get_runner(model, 4, capacity_bucket(39, 96), idx.device)
    st = runner.state
    st.reset(prompt, plens, 3, u, kw["temperature"], kw.get("top_p"), kw.get("eos_token_id"), kw.get("eos_token_id", 0))
    with torch.no_grad():
        st.prefill(model, runner.cache, prompt, s)
        runner.warm_up(model, s)
        for b, p in enumerate(st.pos.tolist()):  # whatever the warm-up left at pos and later: never read
            for kv in runner.cache.k + runner.cache.v:
                kv[b, p:] = float("nan")
        decode_loop(st, 30, s, lambda: st.step(model, runner.cache, s), cuda_graph.CHECK_EVERY)
    assert torch.equal(st.out[:3, :39], ref)


def test_runner_reused_across_calls_and_state_reset():
    """Calls of one bucket reuse one runner (no stale tokens, positions, flags or random numbers
    leak from the previous call); other buckets get their own."""
    model = tiny_model()
    cuda_graph.release(model)
    torch.manual_seed(2)
    p1 = torch.randint(0, V, (3, 10))
    p2 = torch.randint(0, V, (4, 6))
    eos = eager(model, p1, 30, temperature=0)[2, 14].item()
    calls = [(p1, dict(temperature=0, eos_token_id=eos, pad_token_id=0)),
             (p2, dict(temperature=1.0, seed=9)),
             (p1[:, :8], dict(temperature=0.8, top_p=0.9, seed=4)),
             (p2, dict(temperature=0))]
    for idx, kw in calls:
        assert torch.equal(static(model, idx, 30, **kw), eager(model, idx, 30, **kw))
    shapes = cuda_graph.cached_shapes(model)
    assert [s[:2] for s in shapes] == [(batch_bucket(4), capacity_bucket(40, 96))]
    static(model, p2[:1], 30, temperature=0)
    assert [s[:2] for s in cuda_graph.cached_shapes(model)] == [(4, 64), (1, 64)]
    static(model, torch.randint(0, V, (1, 60)), 30, temperature=0)
    assert cuda_graph.cached_shapes(model)[-1][:2] == (1, 96)
    model.release_generation_graphs()
    assert cuda_graph.cached_shapes(model) == []


def test_runners_dropped_when_the_model_changes():
    model = tiny_model()
    idx = torch.randint(0, V, (2, 5))
    static(model, idx, 8, temperature=0)
    r = cuda_graph.get_runner(model, 2, 64, idx.device)
    assert cuda_graph.get_runner(model, 2, 64, idx.device) is r
    with torch.no_grad():  # in place: the same runner (a graph reads the new values)
        model.lm_head.weight.mul_(1.5)
    assert cuda_graph.get_runner(model, 2, 64, idx.device) is r
    assert torch.equal(static(model, idx, 8, temperature=0), eager(model, idx, 8, temperature=0))
    model.to(torch.bfloat16).float()  # new parameter tensors: every runner goes
    assert cuda_graph.get_runner(model, 2, 64, idx.device) is not r
    r = cuda_graph.get_runner(model, 2, 64, idx.device)
    with gptkernels.backend("reference"):  # another backend mode: captured kernels would be wrong
        assert cuda_graph.get_runner(model, 2, 64, idx.device) is not r
    assert torch.equal(static(model, idx, 8, temperature=0), eager(model, idx, 8, temperature=0))
    for b in range(1, 2 * cuda_graph.MAX_RUNNERS + 1):
        cuda_graph.get_runner(model, b, 64, idx.device)
    assert len(cuda_graph.cached_shapes(model)) == cuda_graph.MAX_RUNNERS


def test_cuda_graph_is_ignored_on_cpu_and_checked():
    model = tiny_model()
    cuda_graph.release(model)
    idx = torch.randint(0, V, (3, 5))
    a = model.generate(idx, 10, temperature=0, cuda_graph=True)
    assert cuda_graph.cached_shapes(model) == []  # the eager loop ran: nothing kept
    assert torch.equal(a, model.generate(idx, 10, temperature=0, cuda_graph=False))
    with pytest.raises(ValueError, match="cuda_graph"):
        model.generate(idx, 2, cuda_graph="yes")
    with pytest.raises(ValueError, match="cuda_graph"):
        model.generate(idx, 0, cuda_graph=1.0)


def test_static_step_under_inference_mode():
    """The runner's tensors are made outside inference mode, so a later normal call can reuse them."""
    model = tiny_model()
    cuda_graph.release(model)
    idx = torch.randint(0, V, (2, 5))
    with torch.inference_mode():
        a = static(model, idx, 12, temperature=0)
    assert torch.equal(static(model, idx, 12, temperature=0), a)
    assert torch.equal(eager(model, idx, 12, temperature=0), a)


def test_buckets():
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 17, 32, 33)] == [1, 2, 4, 4, 8, 8, 16, 24, 32, 40]
    assert [capacity_bucket(n, 1024) for n in (1, 64, 65, 384, 1000)] == [64, 64, 128, 512, 1024]
    assert capacity_bucket(300, 300) == 300 and capacity_bucket(30, 40) == 40


def test_inverse_cdf_never_picks_a_zero_probability_token():
    """u at the ends of [0, 1): the first and the last token with probability > 0 (top-k and the
    nucleus leave zeros on both sides)."""
    logits = torch.tensor([[-9.0, 2.0, 0.5, 1.0, -8.0, -7.0]]).repeat(2, 1)
    one = torch.ones((), dtype=torch.float32)
    u = torch.tensor([0.0, 1.0 - 2.0**-24])
    tok = sample_tokens(logits, Sampling(False, 3, False, False), one, one, u)
    assert tok.tolist() == [1, 3]
    tok = sample_tokens(logits, Sampling(False, None, True, False), one, torch.tensor(0.8), u)
    assert tok.tolist() == [1, 3]
    greedy = sample_tokens(logits, Sampling(True, None, False, False), one, one, None)
    assert greedy.tolist() == [1, 1]


@pytest.mark.cuda
def test_cuda_graph_equals_eager_on_gpu():
    """Real capture and replay: bf16, the kernels' path. Greedy and seeded sampling give the eager
    loop's tokens exactly (both run the padded batch); a second call replays without recapturing."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=128))
    model = model.cuda().to(torch.bfloat16).eval()
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (17, 40, 3)]
    idx, lens = pad_prompts(prompts, device="cuda")
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=50, seed=5), dict(temperature=0.8, top_p=0.9, seed=1)):
        a = model.generate(idx, 48, prompt_lens=lens, cuda_graph=False, **kw)
        b = model.generate(idx, 48, prompt_lens=lens, cuda_graph=True, **kw)
        assert torch.equal(a, b), kw
        c = generate(model, idx, 48, prompt_lens=lens, cuda_graph=True, capture=False, **kw)  # not captured
        assert torch.equal(a, c), kw
    runner = cuda_graph.get_runner(model, 4, 128, idx.device)
    assert not runner.failures and all(isinstance(g, torch.cuda.CUDAGraph) for g in runner.graphs.values())
    n_graphs = len(runner.graphs)
    eos = a[0, 17 + 5].item()
    for B in (1, 3):
        a = model.generate(idx[:B], 48, prompt_lens=lens[:B], cuda_graph=False, eos_token_id=eos, temperature=0)
        b = model.generate(idx[:B], 48, prompt_lens=lens[:B], cuda_graph=True, eos_token_id=eos, temperature=0)
        assert torch.equal(a, b)
    assert len(runner.graphs) == n_graphs + 1  # greedy with EOS: one more mode; B=1 has its own runner
    model.release_generation_graphs()
