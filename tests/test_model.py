"""The GPT model (gptkernels/gpt/model.py) on CPU: config, forward and loss against a plain-PyTorch
implementation, initialisation, sizes, bad input, training of the variants; kernel-vs-reference
parity on CUDA (marked cuda)."""
import math

import pytest
import torch
import torch.nn.functional as F

import gptkernels
from gptkernels import GPT, GPTConfig
from gptkernels.gpt.model import sinusoidal_positions

from helpers import UNIT_ROUNDOFF


def tiny_config(**kw):
    d = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32)
    d.update(kw)
    return GPTConfig(**d)


def plain_gpt_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The same network written with torch ops only (F.layer_norm, F.linear, SDPA), reading the
    model's parameters: an independent check of the wiring (fused adds, QKV split, GQA, tying)."""
    c = model.config
    B, T = idx.shape
    H, Hkv, D, C = c.n_head, c.n_kv_head, c.head_dim, c.n_embd
    tr = model.transformer
    if c.pos_embedding == "learned":
        x = tr.wte.weight[idx] + tr.wpe.weight[:T]
    else:
        x = tr.wte.weight[idx] * math.sqrt(C) + sinusoidal_positions(T, C)
    act = {"gelu_tanh": lambda u: F.gelu(u, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}[c.activation]
    for blk in tr.h:
        a = F.layer_norm(x, (C,), blk.ln_1.weight, blk.ln_1.bias, c.layer_norm_eps)
        q, k, v = F.linear(a, blk.attn.c_attn.weight, blk.attn.c_attn.bias).split([H * D, Hkv * D, Hkv * D], -1)
        q, k, v = (t.reshape(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
        x = x + F.linear(y.transpose(1, 2).reshape(B, T, C), blk.attn.c_proj.weight, blk.attn.c_proj.bias)
        a = F.layer_norm(x, (C,), blk.ln_2.weight, blk.ln_2.bias, c.layer_norm_eps)
        x = x + F.linear(act(F.linear(a, blk.mlp.fc.weight, blk.mlp.fc.bias)), blk.mlp.proj.weight, blk.mlp.proj.bias)
    x = F.layer_norm(x, (C,), tr.ln_f.weight, tr.ln_f.bias, c.layer_norm_eps)
    return F.linear(x, model.lm_head.weight)


def randomize_norms(model):
    """LayerNorms start at weight 1, bias 0; perturb them so the test sees which norm is used where."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))


# ---- config ------------------------------------------------------------------------------------
def test_config_defaults_and_roundtrip():
    c = GPTConfig()
    assert c.n_kv_head == c.n_head and c.activation == "gelu_tanh" and c.tie_embeddings
    c2 = tiny_config(n_kv_head=2, pos_embedding="sinusoidal", activation="relu", bias=False)
    d = c2.to_dict()
    assert d["n_kv_head"] == 2 and d["pos_embedding"] == "sinusoidal"
    assert GPTConfig.from_dict(d) == c2
    with pytest.raises(ValueError, match="unknown fields.*n_inner"):
        GPTConfig.from_dict({**d, "n_inner": 7})


@pytest.mark.parametrize("kw, match", [
    (dict(activation="swish"), "activation.*swish"),
    (dict(pos_embedding="rope"), "pos_embedding"),
    (dict(n_embd=30), "n_embd.*divisible"),
    (dict(n_kv_head=3), "n_kv_head"),
    (dict(n_layer=0), "n_layer"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kw)


def test_gpt_rejects_non_config():
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT({"n_layer": 2})


# ---- forward -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(),
    dict(n_kv_head=2),
    dict(n_kv_head=1, activation="relu"),
    dict(pos_embedding="sinusoidal", activation="gelu"),
    dict(bias=False, tie_embeddings=False),
])
def test_forward_matches_plain_torch(kw):
    model = GPT(tiny_config(**kw))
    randomize_norms(model)
    idx = torch.randint(0, 61, (3, 17))
    logits, loss = model(idx)
    assert loss is None and logits.shape == (3, 17, 61)
    torch.testing.assert_close(logits, plain_gpt_logits(model, idx), atol=2e-5, rtol=1e-5)


def test_loss_is_cross_entropy_with_ignore_index():
    """With targets the loss comes from the hidden states through linear_cross_entropy (no logits
    returned); it and its gradients equal torch's cross-entropy of the full logits."""
    model = GPT(tiny_config(tie_embeddings=False))
    randomize_norms(model)
    idx = torch.randint(0, 61, (2, 9))
    targets = torch.randint(0, 61, (2, 9))
    targets[0, :4] = -100
    logits, loss = model(idx, targets)
    assert logits is None
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    full, _ = model(idx)
    expected = F.cross_entropy(full.reshape(-1, 61), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    expected.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_reference_backend_gives_the_same_on_cpu():
    model = GPT(tiny_config())
    idx = torch.randint(0, 61, (2, 8))
    with gptkernels.backend("reference"):
        ref, _ = model(idx)
    out, _ = model(idx)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_qkv_views_are_bshd_without_copies():
    """The attention receives q, k, v as strided views of the fused projection's output."""
    model = GPT(tiny_config(n_kv_head=2))
    seen = {}
    import gptkernels.gpt.model as M

    orig = M.flash_attention

    def spy(q, k, v, **kw):
        seen.update(q=q, k=k, v=v, kw=kw)
        return orig(q, k, v, **kw)

    M.flash_attention = spy
    try:
        model(torch.randint(0, 61, (2, 5)))
    finally:
        M.flash_attention = orig
    q, k, v = seen["q"], seen["k"], seen["v"]
    assert seen["kw"]["layout"] == "bshd" and seen["kw"]["causal"]
    assert q.shape == (2, 5, 4, 8) and k.shape == v.shape == (2, 5, 2, 8)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert q.stride(1) == (4 + 2 * 2) * 8


def test_torch_compile_fullgraph():
    """The forward traces as one graph (the id check is skipped while compiling), same logits."""
    model = GPT(tiny_config(n_kv_head=2))
    idx = torch.randint(0, 61, (2, 9))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, _ = compiled(idx)
    torch.testing.assert_close(out, model(idx)[0], atol=1e-6, rtol=1e-6)
    out.float().pow(2).mean().backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None


# ---- init and sizes ----------------------------------------------------------------------------
def test_init_scales_residual_projections():
    c = GPTConfig(vocab_size=64, block_size=8, n_layer=8, n_head=4, n_embd=256)
    model = GPT(c)
    blk = model.transformer.h[3]
    scaled = 0.02 / math.sqrt(2 * 8)
    for w in (blk.attn.c_proj.weight, blk.mlp.proj.weight):
        assert abs(w.std().item() - scaled) < 0.1 * scaled
    for w in (blk.attn.c_attn.weight, blk.mlp.fc.weight, model.transformer.wte.weight):
        assert abs(w.std().item() - 0.02) < 0.1 * 0.02
    assert torch.all(blk.attn.c_attn.bias == 0) and torch.all(blk.ln_1.weight == 1)
    # sinusoidal positions: token embeddings as in the original Transformer (std n_embd^-0.5, scaled by sqrt(n_embd))
    sin = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=4, n_embd=256, pos_embedding="sinusoidal"))
    assert abs(sin.transformer.wte.weight.std().item() - 256 ** -0.5) < 0.1 * 256 ** -0.5


def test_tied_and_untied_embeddings():
    tied = GPT(tiny_config())
    assert tied.lm_head.weight is tied.transformer.wte.weight
    untied = GPT(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False), dict(pos_embedding="sinusoidal", n_kv_head=1)])
def test_num_params(kw):
    c = tiny_config(**kw)
    model = GPT(c)
    C, V, L, D = c.n_embd, c.vocab_size, c.n_layer, c.head_dim
    qkv = (c.n_head + 2 * c.n_kv_head) * D
    per_block = 2 * 2 * C + (C * qkv + qkv) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    matmul_and_norms = L * per_block + 2 * C + V * C  # + ln_f + the LM head (tied or not)
    wpe = c.block_size * C if c.pos_embedding == "learned" else 0
    wte = 0 if c.tie_embeddings else V * C
    assert model.num_params() == matmul_and_norms
    assert model.num_params(non_embedding=False) == matmul_and_norms + wpe + wte


def test_estimate_mfu():
    c = tiny_config()
    model = GPT(c)
    n = model.num_params()
    per_token = 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size
    assert model.flops_per_token() == per_token
    assert model.estimate_mfu(1000.0, 1e12) == pytest.approx(1000.0 * per_token / 1e12)
    assert model.estimate_mfu(1000.0, 1e12, seq_len=8) < model.estimate_mfu(1000.0, 1e12)
    with pytest.raises(ValueError, match="peak_flops"):
        model.estimate_mfu(1000.0, 0)


def test_sinusoidal_positions_formula():
    pe = sinusoidal_positions(50, 16)
    pos, i = 37, 3
    assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    model = GPT(tiny_config(pos_embedding="sinusoidal"))
    assert "transformer.wpe.weight" not in model.state_dict() and not hasattr(model.transformer, "wpe")


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_crop_block_size(pos):
    model = GPT(tiny_config(pos_embedding=pos))
    idx = torch.randint(0, 61, (2, 12))
    before, _ = model(idx)
    model.crop_block_size(12)
    assert model.config.block_size == 12
    torch.testing.assert_close(model(idx)[0], before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        model.crop_block_size(20)


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_inputs():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 61\); found 61"):
        model(torch.tensor([[1, 2, 61]]))
    with pytest.raises(ValueError, match="found -1"):
        model(torch.tensor([[1, -1, 3]]))
    with pytest.raises(ValueError, match="int64 or int32"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="batch, seq_len"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), 99))


# ---- training ----------------------------------------------------------------------------------
def train_steps(model, data, steps=40, lr=3e-3, batch=8, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        ix = torch.randint(0, len(data) - T - 1, (batch,), generator=g)
        x = torch.stack([data[i:i + T] for i in ix])
        y = torch.stack([data[i + 1:i + T + 1] for i in ix])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def tiny_corpus(vocab=61):
    """A repetitive sequence with structure a model picks up in a few dozen steps."""
    pattern = torch.tensor([3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 32, 38, 46, 26, 43])
    return pattern.repeat(40) % vocab


@pytest.mark.parametrize("kw", [dict(pos_embedding="sinusoidal", activation="relu"), dict(n_kv_head=1, dropout=0.1)])
def test_variants_train(kw):
    model = GPT(tiny_config(**kw))
    losses = train_steps(model, tiny_corpus())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 3.5  # at least ~ln(61) at init
    assert last < 0.5 * first, losses


# ---- CUDA: kernel path vs reference path --------------------------------------------------------
def _bf16_parity_model(**kw):
    torch.manual_seed(0)
    c = GPTConfig(vocab_size=1000, block_size=256, n_layer=2, n_head=4, n_embd=256, **kw)
    return GPT(c).cuda()


@pytest.mark.cuda
@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=2, activation="relu", pos_embedding="sinusoidal")])
def test_cuda_kernel_logits_match_reference(kw):
    """bf16 kernel path vs bf16 reference path, both against an fp32 reference: the kernel path's
    error may be at most 2x the bf16 reference's error plus a few bf16 ulps of the logits' scale."""
    model = _bf16_parity_model(**kw)
    idx = torch.randint(0, 1000, (3, 200), device="cuda")
    with torch.no_grad(), gptkernels.backend("reference"):
        exact, _ = model(idx)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        with gptkernels.backend("reference"):
            ref, _ = model(idx)
        out, _ = model(idx)
    assert torch.isfinite(out).all()
    ref_err = (ref.float() - exact).abs().max().item()
    err = (out.float() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert err <= 2 * ref_err + 4 * UNIT_ROUNDOFF[torch.bfloat16] * scale, (err, ref_err)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16_weights", "autocast"])
def test_cuda_training_step_gradients_match_reference(precision):
    """One forward + backward in bf16 (bf16 weights, or fp32 weights under bf16 autocast) on the
    kernel path and on the reference path; each parameter's gradient is compared with the fp32
    gradient: kernel error <= 2x the bf16 reference's error + a bf16 floor."""
    import copy

    model = _bf16_parity_model(n_kv_head=2)
    idx = torch.randint(0, 1000, (2, 128), device="cuda")
    tgt = torch.randint(0, 1000, (2, 128), device="cuda")
    low = copy.deepcopy(model).to(torch.bfloat16) if precision == "bf16_weights" else model

    def grads(m, mode, autocast):
        m.zero_grad(set_to_none=True)
        with gptkernels.backend(mode), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            _, loss = m(idx, tgt)
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in m.named_parameters()}

    autocast = precision == "autocast"
    exact_loss, exact = grads(model, "reference", False)
    ref_loss, ref = grads(low, "reference", autocast)
    loss, out = grads(low, "auto", autocast)
    assert abs(loss - exact_loss) <= 2 * abs(ref_loss - exact_loss) + 1e-2
    for name in exact:
        scale = exact[name].abs().max().item()
        ref_err = (ref[name] - exact[name]).abs().max().item()
        err = (out[name] - exact[name]).abs().max().item()
        assert math.isfinite(err) and err <= 2 * ref_err + 8 * UNIT_ROUNDOFF[torch.bfloat16] * scale, \
            (name, err, ref_err)


@pytest.mark.cuda
def test_cuda_model_runs_every_op_on_its_kernel():
    """backend("kernel") raises when an op cannot run its kernel: the bf16 model's forward, backward
    and cached decoding (flash_attention with kv_lens, query length 1) must all be kernel calls."""
    model = _bf16_parity_model(n_kv_head=2).to(torch.bfloat16)
    idx = torch.randint(0, 1000, (2, 64), device="cuda")
    with gptkernels.backend("kernel"):
        _, loss = model(idx, idx)
        loss.backward()
        out = model.generate(idx[:, :20], 8, temperature=0, prompt_lens=[20, 13])
    assert torch.isfinite(loss) and out.shape == (2, 28)


def test_token_id_check_can_be_turned_off_for_trusted_data():
    """The training loop turns the range check (a host sync) off; shape checks stay on."""
    model = GPT(tiny_config())
    ok = torch.tensor([[1, 2, 3]])
    model.check_token_ids = False
    logits, _ = model(ok)
    assert logits.shape == (1, 3, model.config.vocab_size)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    model.check_token_ids = True
    with pytest.raises(ValueError, match="token ids must be in"):
        model(torch.tensor([[1, 2, 61]]))
