"""Issue 16 in the GPT application: sliding-window attention and the score softcap
(GPTConfig.window, attn_softcap) and document masking (Documents: cu_seqlens and positions from the
end-of-text tokens, flash_attention_varlen), on the CPU.

Each is checked against an independent computation: a plain-PyTorch forward with an explicit
(B, T, T) mask; every document run alone through the model; generation against argmax of a full
recompute; the training CLI end to end; config and checkpoint round trips; one-line CLI errors."""
import dataclasses
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from gptkernels import GPT, GPTConfig
from gptkernels.gpt import data as gdata
from gptkernels.gpt import model as gmodel
from gptkernels.gpt.checkpoint import load_model
from gptkernels.gpt.cli import main
from gptkernels.gpt.documents import Documents, split_documents
from gptkernels.gpt.generate import generate
from gptkernels.gpt.model import sinusoidal_positions

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import make_tiny_dataset, read_metrics  # noqa: E402

V, EOS = 61, 0
FP32_TOL = dict(atol=3e-5, rtol=1e-5)


def cfg(**kw):
    d = dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32)
    d.update(kw)
    return GPTConfig(**d)


def randomize(model):
    """Norms away from (1, 0) and larger attention weights: sharper attention, so a wrong mask or
    a missing softcap shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("attn.c_attn.weight"):
                p.mul_(8.0)
    return model


def packed_batch(B, T, seed=0, p_eos=0.15):
    """(x, y) of random ids in [1, V) with end-of-text tokens sprinkled in (some rows start with one)."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randint(1, V, (B, T + 1), generator=g)
    buf[torch.rand(B, T + 1, generator=g) < p_eos] = EOS
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


def doc_ids_and_positions(x):
    """By hand, token by token: the document of each token (a new one at each end-of-text token and
    at each row start) and its position inside it."""
    B, T = x.shape
    ids, pos = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    n = -1
    for b in range(B):
        for t in range(T):
            if t == 0 or x[b, t] == EOS:
                n, start = n + 1, t
            ids[b, t], pos[b, t] = n, t - start
    return ids, pos


def plain_logits(model, idx, allowed, positions):
    """The model's network in plain torch ops with an explicit mask: allowed (B, T, T) bool (query i
    may see key j) and-ed with each layer's window (i - j <= W); scores capped by attn_softcap."""
    c, tr = model.config, model.transformer
    B, T = idx.shape
    H, Hkv, D, C = c.n_head, c.n_kv_head, c.head_dim, c.n_embd
    if c.pos_embedding == "learned":
        x = tr.wte.weight[idx] + tr.wpe.weight[positions]
    else:
        x = tr.wte.weight[idx] * math.sqrt(C) + sinusoidal_positions(c.block_size, C)[positions]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for li, blk in enumerate(tr.h):
        W = c.layer_window(li)
        mask = allowed & (j <= i) & ((i - j <= W) if W >= 0 else True)
        a = F.layer_norm(x, (C,), blk.ln_1.weight, blk.ln_1.bias, c.layer_norm_eps)
        q, k, v = F.linear(a, blk.attn.c_attn.weight, blk.attn.c_attn.bias).split([H * D, Hkv * D, Hkv * D], -1)
        q, k, v = (t.reshape(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        if c.attn_softcap > 0:
            s = c.attn_softcap * torch.tanh(s / c.attn_softcap)
        y = torch.softmax(s.masked_fill(~mask[:, None], float("-inf")), -1) @ v
        x = x + F.linear(y.transpose(1, 2).reshape(B, T, C), blk.attn.c_proj.weight, blk.attn.c_proj.bias)
        a = F.layer_norm(x, (C,), blk.ln_2.weight, blk.ln_2.bias, c.layer_norm_eps)
        x = x + F.linear(F.gelu(F.linear(a, blk.mlp.fc.weight, blk.mlp.fc.bias), approximate="tanh"),
                         blk.mlp.proj.weight, blk.mlp.proj.bias)
    x = F.layer_norm(x, (C,), tr.ln_f.weight, tr.ln_f.bias, c.layer_norm_eps)
    return F.linear(x, model.lm_head.weight)


# ---- config --------------------------------------------------------------------------------------

def test_window_forms_and_roundtrip():
    assert cfg().window is None and cfg().attn_softcap == 0.0
    assert cfg(window=-1).window is None and cfg(window=[None, -1]).window is None  # all global
    c = cfg(window=(4, None), attn_softcap=30)
    assert c.window == [4, -1] and c.attn_softcap == 30.0
    assert [c.layer_window(i) for i in range(2)] == [4, -1]
    assert [cfg(window=0).layer_window(i) for i in range(2)] == [0, 0]
    assert GPTConfig.from_dict(c.to_dict()) == c
    old = cfg().to_dict()
    del old["window"], old["attn_softcap"]  # a config written before these fields existed
    assert GPTConfig.from_dict(old) == cfg()


@pytest.mark.parametrize("kw, match", [
    (dict(window=-2), "window"), (dict(window=True), "window"), (dict(window="8"), "window"),
    (dict(window=[4]), "window.*one entry per layer \\(2\\)"), (dict(window=[4, 1.5]), "window"),
    (dict(window=[4, -3]), "window"), (dict(attn_softcap=-1.0), "attn_softcap"),
    (dict(attn_softcap=float("nan")), "attn_softcap"), (dict(attn_softcap=True), "attn_softcap"),
])
def test_config_rejects_bad_window_and_softcap(kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kw)


# ---- sliding window and softcap ------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(window=3),
    dict(window=[2, -1], attn_softcap=2.0),
    dict(window=[0, 5], n_kv_head=2, pos_embedding="sinusoidal"),
    dict(attn_softcap=1.5),
])
def test_windowed_model_matches_an_explicit_mask(kw):
    model = randomize(GPT(cfg(**kw)))
    idx = torch.randint(0, V, (2, 19))
    B, T = idx.shape
    logits, _ = model(idx)
    everything = torch.ones(B, T, T, dtype=torch.bool)
    torch.testing.assert_close(logits, plain_logits(model, idx, everything, torch.arange(T).expand(B, T)), **FP32_TOL)
    # the setting matters: the same weights without it give other logits
    plain = GPT(cfg(**{k: v for k, v in kw.items() if k not in ("window", "attn_softcap")}))
    plain.load_state_dict(model.state_dict())
    assert (plain(idx)[0] - logits).abs().max() > 1e-3


@pytest.mark.parametrize("graph_path", [False, True])
def test_generation_with_a_window_is_greedy_full_recompute(graph_path):
    """Greedy decoding with the KV cache (the eager loop, or the CUDA-graph runner's step run op by
    op) == argmax of the full forward over everything so far, at every step: the decode attention
    applies the same window and softcap."""
    model = randomize(GPT(cfg(window=[3, -1], attn_softcap=3.0, n_kv_head=2))).eval()
    prompt = torch.randint(1, V, (2, 5))
    n = 14
    out = generate(model, prompt, n, temperature=0, cuda_graph=graph_path, capture=False)
    idx = prompt
    with torch.no_grad():
        for _ in range(n):
            idx = torch.cat([idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert out.tolist() == idx.tolist()


# ---- document masking ----------------------------------------------------------------------------

def test_split_documents():
    E = EOS
    x = torch.tensor([[E, 1, 2, E, 3], [4, E, 5, 6, 7]])
    d = split_documents(x, E)
    assert d.cu_seqlens.dtype == torch.int32 and d.cu_seqlens.tolist() == [0, 3, 5, 6, 10]
    assert d.positions.tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert d.max_seqlen == 4  # the longest (4) rounded up to a power of two, at most T
    # 3 sequences: padded to 4 with an empty one; the longest (5) rounds to 8, capped at T = 5
    d = split_documents(torch.tensor([[1, 2, E, 3, 4], [5, 6, 7, 8, 9]]), E)
    assert d.cu_seqlens.tolist() == [0, 2, 5, 10, 10] and d.max_seqlen == 5
    ids, pos = doc_ids_and_positions(x)
    assert d.positions.shape == pos.shape


def test_loader_gives_documents_of_the_cpu_tokens(tmp_path):
    ds = make_tiny_dataset(str(tmp_path / "ds"), n_files=6)
    split = gdata.TokenSplit(ds, "train", 32)
    x, y = gdata.TokenBatches(split, 4, seed=1).next_batch()
    xd, yd, docs = gdata.to_device(x, y, torch.device("cpu"), split.eos_id)
    assert torch.equal(xd, x) and torch.equal(yd, y)
    ref = split_documents(x, split.eos_id)
    assert torch.equal(docs.cu_seqlens, ref.cu_seqlens) and torch.equal(docs.positions, ref.positions)
    assert docs.max_seqlen == ref.max_seqlen
    _, pos = doc_ids_and_positions(torch.where(x == split.eos_id, EOS, x.clamp_min(1)))
    assert torch.equal(docs.positions, pos)
    assert gdata.to_device(x, y, torch.device("cpu"))[2] is None


@pytest.mark.parametrize("kw", [dict(), dict(pos_embedding="sinusoidal", n_kv_head=2),
                                dict(window=[2, -1], attn_softcap=2.0)])
def test_packed_batch_equals_each_document_alone(kw):
    """With document masking the packed batch gives each document's logits as if it ran alone, and
    its loss (the mean over all B*T targets) equals the token-weighted mean of the per-document
    losses; so do the gradients."""
    model = randomize(GPT(cfg(**kw)))
    x, y = packed_batch(3, 16)
    docs = split_documents(x, EOS)
    logits, _ = model(x, docs=docs)
    _, loss = model(x, y, docs=docs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    cu = docs.cu_seqlens.tolist()
    xf, yf, lf = x.reshape(-1), y.reshape(-1), logits.reshape(-1, V)
    total, n_seq = 0.0, 0
    for s, e in zip(cu[:-1], cu[1:]):
        if e == s:
            continue
        n_seq += 1
        alone, _ = model(xf[None, s:e])
        torch.testing.assert_close(lf[s:e], alone[0], **FP32_TOL)
        total = total + model(xf[None, s:e], yf[None, s:e])[1] * (e - s)
    assert n_seq > 3 and max(e - s for s, e in zip(cu[:-1], cu[1:])) <= docs.max_seqlen
    expected = total / x.numel()
    torch.testing.assert_close(loss, expected, **FP32_TOL)
    expected.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_document_masking_matches_an_explicit_mask():
    model = randomize(GPT(cfg(window=[3, -1])))
    x, _ = packed_batch(2, 20, seed=3)
    ids, pos = doc_ids_and_positions(x)
    allowed = ids[:, :, None] == ids[:, None, :]
    logits, _ = model(x, docs=split_documents(x, EOS))
    torch.testing.assert_close(logits, plain_logits(model, x, allowed, pos), **FP32_TOL)


def test_bad_documents_are_named():
    model = GPT(cfg())
    x, y = packed_batch(2, 8)
    d = split_documents(x, EOS)
    with pytest.raises(TypeError, match="docs"):
        model(x, y, docs=(d.cu_seqlens, d.max_seqlen, d.positions))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(x, y, docs=d._replace(cu_seqlens=d.cu_seqlens.long()))
    with pytest.raises(ValueError, match="cu_seqlens\\[-1\\]"):
        model(x, y, docs=d._replace(cu_seqlens=d.cu_seqlens - torch.tensor([0] * (d.cu_seqlens.numel() - 1) + [1],
                                                                            dtype=torch.int32)))
    with pytest.raises(ValueError, match="max_seqlen"):
        model(x, y, docs=d._replace(max_seqlen=0))
    with pytest.raises(ValueError, match="positions"):
        model(x, y, docs=d._replace(positions=d.positions[:1]))


def test_torch_compile_with_documents():
    """torch.compile of the document-masked forward and backward (max_seqlen a Python int) gives
    eager's loss and gradients. (On the CPU the varlen reference reads cu_seqlens on the host, a
    graph break: fullgraph=False, as the library's own varlen compile test.)"""
    model = GPT(cfg(n_layer=1, window=4, attn_softcap=5.0))
    compiled = torch.compile(model, backend="aot_eager")
    x, y = packed_batch(2, 16, seed=1)
    docs = split_documents(x, EOS)
    _, loss = compiled(x, y, docs=docs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, expected = model(x, y, docs=docs)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def _dense_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, softcap, check_inputs, **kw):
    """flash_attention_varlen for q = k = v sequences as one masked dense attention, without host
    syncs (segment ids by searchsorted): a stand-in that torch.compile traces whole."""
    N, H, D = q.shape
    seg = torch.searchsorted(cu_q, torch.arange(N, dtype=cu_q.dtype), right=True)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    mask = (seg[:, None] == seg[None, :]) & (j <= i) & ((i - j <= window[0]) if window[0] >= 0 else True)
    k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
    s = softcap * torch.tanh(s / softcap) if softcap > 0 else s
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("hqk,khd->qhd", p, v), None


def test_model_traces_as_one_graph_with_documents(monkeypatch):
    """The model's own document-masking code has no host syncs and no data-dependent branches: with
    a traceable attention it compiles as one graph (fullgraph), and two batches whose documents
    differ but fall in the same buckets (8 sequences after padding, max_seqlen 16) reuse it."""
    from torch._dynamo.testing import CompileCounterWithBackend
    monkeypatch.setattr(gmodel, "flash_attention_varlen", _dense_varlen)
    model = GPT(cfg(n_layer=1, window=4, attn_softcap=5.0))
    model.check_token_ids = False  # (as training does: the data were checked when loaded)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for eos_at in (([5], [3, 9]), ([4, 8, 13], [9])):  # 5 documents, the longest 11; 6, the longest 9
        x, y = packed_batch(2, 16, p_eos=0.0)
        for row, cols in enumerate(eos_at):
            x[row, cols] = EOS
        docs = split_documents(x, EOS)
        assert docs.cu_seqlens.numel() == 9 and docs.max_seqlen == 16
        _, loss = compiled(x, y, docs=docs)
        torch.testing.assert_close(loss, model(x, y, docs=docs)[1], atol=1e-6, rtol=1e-6)
        loss.backward()
    assert counter.frame_count == 1


def test_models_with_other_softcaps_and_windows_compile_fullgraph_in_one_process():
    """The window and softcap stay constants of the graph: compiling a second model with other
    values retraces it (rather than turning the softcap into a symbolic float that the attention's
    argument checks cannot trace)."""
    idx = torch.randint(0, V, (2, 9))
    for kw in (dict(window=3, attn_softcap=5.0), dict(), dict(window=[1, -1], attn_softcap=2.5)):
        model = GPT(cfg(**kw))
        out, _ = torch.compile(model, fullgraph=True, backend="eager")(idx)
        torch.testing.assert_close(out, model(idx)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.cuda
def test_cuda_document_masked_training_step_matches_reference():
    """One bf16-autocast forward + backward of a document-masked model with windows and a softcap on
    the default path (the kernels where the extension implements the variants, else the torch path)
    and on the reference path, each against the fp32 reference: error <= 2x the bf16 reference's
    error + a bf16 floor (as tests/test_model.py's dense check)."""
    import gptkernels
    from helpers import UNIT_ROUNDOFF
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1000, block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=256,
                          window=[48, -1], attn_softcap=30.0)).cuda()
    g = torch.Generator().manual_seed(0)
    buf = torch.randint(1, 1000, (2, 201), generator=g)
    buf[torch.rand(2, 201, generator=g) < 0.02] = EOS
    x, y, docs = gdata.to_device(buf[:, :-1].contiguous(), buf[:, 1:].contiguous(), torch.device("cuda"), EOS)

    def grads(mode, autocast):
        model.zero_grad(set_to_none=True)
        with gptkernels.backend(mode), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            _, loss = model(x, y, docs=docs)
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    exact_loss, exact = grads("reference", False)
    ref_loss, ref = grads("reference", True)
    loss, out = grads("auto", True)
    assert abs(loss - exact_loss) <= 2 * abs(ref_loss - exact_loss) + 1e-2
    for name in exact:
        scale = exact[name].abs().max().item()
        ref_err = (ref[name] - exact[name]).abs().max().item()
        err = (out[name] - exact[name]).abs().max().item()
        assert math.isfinite(err) and err <= 2 * ref_err + 8 * UNIT_ROUNDOFF[torch.bfloat16] * scale, \
            (name, err, ref_err)


# ---- training through the CLI ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_dataset(str(tmp_path_factory.mktemp("dm") / "ds"))


TINY = ["--preset", "tiny", "--no-progress", "--eval-interval", "3", "--ckpt-interval", "3", "--sample-tokens", "4"]


def test_document_masking_trains_on_the_bundled_corpus(tmp_path, monkeypatch, capsys):
    """`gptkernels train --document-masking` on the bundled corpus: every step's attention runs per
    document (flash_attention_varlen), the loss is finite and falls from the uniform start."""
    monkeypatch.setenv("GPTKERNELS_CACHE", str(tmp_path / "cache"))
    calls = []
    orig = gmodel.flash_attention_varlen

    def spy(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append((cu_q.numel(), max_q))
        return orig(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    monkeypatch.setattr(gmodel, "flash_attention_varlen", spy)
    out = str(tmp_path / "run")
    assert main(["train", "--document-masking", "--out-dir", out, "--max-steps", "6", "--log-interval", "1"]
                + TINY) == 0
    assert "document masking" in capsys.readouterr().err
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] < math.log(2048) + 0.5
    # 6 steps x 2 layers with batches of 4 x 32 tokens, plus the evaluations
    assert len(calls) >= 12 and all(n >= 5 and 1 <= m <= 32 for n, m in calls)


def test_window_softcap_and_masking_round_trip_through_a_checkpoint(tiny_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["train", "--data", tiny_data, "--out-dir", out, "--window", "8,global", "--attn-softcap", "20",
            "--document-masking"] + TINY
    assert main(base + ["--max-steps", "3"]) == 0
    model, tok, kind = load_model(out)
    assert model.config.window == [8, -1] and model.config.attn_softcap == 20.0
    assert [blk.attn.variant for blk in model.transformer.h] == [((8, 0), 20.0), ((-1, 0), 20.0)]
    assert main(base + ["--max-steps", "5", "--resume"]) == 0  # resumes with the same model
    capsys.readouterr()
    assert main(["generate", out, "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_two_process_ddp_and_fsdp_with_document_masking_match_one_process(tiny_data, tmp_path):
    """Document masking, windows and softcap under DDP and FSDP2 (2 gloo processes x batch 2) follow
    one process x batch 4: a row's documents do not depend on which rank reads it."""
    from gptkernels.gpt.train import train
    from test_train import _torchrun
    from train_helpers import tiny_cfg
    kw = dict(max_steps=4, eval_interval=4, document_masking=True, window=[8, -1], attn_softcap=10.0)
    one = train(tiny_cfg(tiny_data, str(tmp_path / "one"), batch_size=4, **kw), log=lambda s: None)
    _torchrun([dataclasses.asdict(tiny_cfg(tiny_data, str(tmp_path / name), batch_size=2, fsdp=name == "fsdp", **kw))
               for name in ("ddp", "fsdp")])
    for name in ("ddp", "fsdp"):
        losses = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / name)) if "loss" in r}
        assert sorted(losses) == [1, 2, 3, 4]
        for step, loss in losses.items():
            assert loss == pytest.approx(one.losses[step], rel=2e-5, abs=2e-5), (name, step)


@pytest.mark.parametrize("extra, needle", [
    (["--window", "abc"], "--window"),
    (["--window", "-2"], "--window"),
    (["--window", "8,1.5"], "--window"),
    (["--window", "8,8,8"], "window: expected one entry per layer (2)"),
    (["--attn-softcap", "nan"], "--attn-softcap"),
    (["--attn-softcap", "-1"], "--attn-softcap"),
])
def test_bad_window_or_softcap_is_one_line(extra, needle, tiny_data, tmp_path, capsys):
    from test_cli_bad_inputs import one_line_error
    line = one_line_error(capsys, ["train", "--data", tiny_data, "--out-dir", str(tmp_path / "r")] + TINY + extra, 2)
    assert needle in line
