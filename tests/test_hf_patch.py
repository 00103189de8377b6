"""gptkernels.hf.patch on tiny random Hugging Face models, CPU fp32: patched vs unpatched logits (eval),
loss and every parameter gradient (train, dropout 0), greedy generation token for token, padded
batches; what is swapped per architecture; state_dict / save_pretrained unchanged; errors undo
everything. Tolerances: hf_models.check (the unpatched fp32 error against a float64 copy of the
same model, times 3, plus a floor of a few fp32 roundings)."""
import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import gptkernels.hf  # noqa: E402
import hf_models as M  # noqa: E402
from gptkernels.hf import attention as A  # noqa: E402
from gptkernels.hf import layers as L  # noqa: E402
from gptkernels.hf import loss as LS  # noqa: E402

REQUIRED = ["gpt2", "gpt_neo", "opt", "gpt_neox", "llama"]
ALL = list(M.configs())
# What patch() must swap per architecture: (LayerNorms, fused MLPs, attention patched, loss fused)
EXPECTED = {
    "gpt2": (5, 2, True, True), "gpt_neo": (5, 2, True, True), "opt": (5, 2, True, True),
    "gpt_neox": (5, 2, True, True), "llama": (0, 0, True, True), "gptj": (3, 2, True, True),
    "phi": (3, 2, True, True), "gpt_bigcode": (5, 2, True, True), "starcoder2": (5, 2, True, True),
    "falcon": (3, 2, False, True), "bloom": (6, 0, False, True), "mistral": (0, 0, True, True),
}


def _tokens(b=2, t=13, seed=1):
    return torch.randint(3, M.V, (b, t), generator=torch.Generator().manual_seed(seed))


def _right_padded(x):
    am = torch.ones_like(x)
    am[1, 9:] = 0
    return am


def _eval_logits(models, x, am=None):
    with torch.no_grad():
        return [m.eval()(x, attention_mask=am).logits for m in models]


def _train_step(model, x, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x, labels=labels)
    out.loss.backward()
    return out


@pytest.mark.parametrize("model_type", ALL)
def test_report_says_what_was_swapped(model_type):
    _, patched, _ = M.trio(model_type)
    r = patched.gptkernels_patched
    n_ln, n_mlp, attn, ce = EXPECTED[model_type]
    assert (len(r.layer_norm), len(r.mlp), r.attention is not None, r.cross_entropy) == (n_ln, n_mlp, attn, ce), \
        r.summary()
    assert sum(isinstance(m, L.LayerNorm) for m in patched.modules()) == n_ln
    # every LayerNorm left is not a torch one (all were swapped), and they are still nn.LayerNorm
    assert not any(type(m) is nn.LayerNorm for m in patched.modules())
    assert all(isinstance(m, nn.LayerNorm) for m in patched.modules() if isinstance(m, L.LayerNorm))
    assert r.model_type in r.summary()


@pytest.mark.parametrize("model_type", ALL)
def test_parameters_and_state_dict_are_kept(model_type):
    ref = M.make(model_type)
    params = {n: p for n, p in ref.named_parameters()}
    keys = list(ref.state_dict())
    gptkernels.hf.patch(ref)
    assert list(ref.state_dict()) == keys
    assert all(p is params[n] for n, p in ref.named_parameters())


@pytest.mark.parametrize("model_type", ALL)
def test_eval_logits_match(model_type):
    ref, patched, truth = M.trio(model_type)
    x = _tokens()
    A.PATHS.clear()
    r, p, t = _eval_logits((ref, patched, truth), x)
    M.check(f"{model_type} logits", p, r, t)
    if EXPECTED[model_type][2]:  # mistral: its window (8) bites at 13 tokens, flash_attention's window
        assert A.PATHS["flash_attention"] > 0, dict(A.PATHS)


@pytest.mark.parametrize("model_type", ALL)
def test_train_loss_and_every_gradient_match(model_type):
    ref, patched, truth = M.trio(model_type)
    x = _tokens()
    labels = x.clone()
    labels[0, :3] = -100  # ignored positions count in neither loss
    outs = [_train_step(m, x, labels) for m in (ref, patched, truth)]
    if EXPECTED[model_type][3]:
        assert outs[1].logits is None  # the fused loss never formed the logits
    M.check(f"{model_type} loss", outs[1].loss.detach(), outs[0].loss.detach(), outs[2].loss.detach())
    named = list(ref.named_parameters())
    assert len(named) == len(list(patched.parameters()))
    for (name, p), q, t in zip(named, patched.parameters(), truth.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            M.check(f"{model_type} grad {name}", q.grad, p.grad, t.grad)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_bf16_autocast_training(model_type):
    """Under autocast (bf16) the kernels' inputs are cast as torch's sdpa would (Llama's RoPE leaves q, k
    in float32 next to a bfloat16 v): attention still runs through flash_attention."""
    ref, patched, truth = M.trio(model_type)
    x = _tokens()
    A.PATHS.clear()
    outs = []
    for m in (ref, patched):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(_train_step(m, x, x))
    outs.append(_train_step(truth, x, x))
    assert A.PATHS["flash_attention"] == 2 and A.PATHS["sdpa"] == 0, dict(A.PATHS)
    floor = 2 * 2.0**-8
    M.check("loss", outs[1].loss.detach(), outs[0].loss.detach(), outs[2].loss.detach(), floor=floor)
    for (n, p), q, t in zip(ref.named_parameters(), patched.parameters(), truth.parameters()):
        M.check(f"{model_type} grad {n}", q.grad, p.grad, t.grad, floor=floor)


@pytest.mark.parametrize("model_type", REQUIRED + ["mistral"])
def test_padded_batches(model_type):
    """Right padding (kernel + sdpa for the padded rows) matches everywhere; left padding (sdpa) at
    the valid positions (GPT-Neo's eager original fills fully masked rows differently)."""
    ref, patched, truth = M.trio(model_type)
    x = _tokens(3, 12)
    right = torch.ones_like(x)
    right[1, 9:] = 0
    right[2, 5:] = 0
    A.PATHS.clear()
    r, p, t = _eval_logits((ref, patched, truth), x, right)
    M.check(f"{model_type} right-padded logits", p, r, t)
    assert A.PATHS["split"] > 0, dict(A.PATHS)
    left = right.flip(1)
    r, p, t = _eval_logits((ref, patched, truth), x, left)
    keep = left.bool()
    M.check(f"{model_type} left-padded logits", p[keep], r[keep], t[keep])


@pytest.mark.parametrize("model_type", REQUIRED + ["mistral"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generate_token_for_token(model_type, cache):
    ref, patched, _ = M.trio(model_type)
    x = _tokens(2, 6)
    kw = dict(max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(x))
    if cache == "static":
        kw["cache_implementation"] = "static"
    A.PATHS.clear()
    out = patched.eval().generate(x, **kw)
    assert torch.equal(out, ref.eval().generate(x, **kw))
    assert A.PATHS["flash_attention"] > 0, dict(A.PATHS)  # decoding ran through the op (kv_lens when static)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_left_padded_generate(model_type):
    ref, patched, _ = M.trio(model_type)
    x = _tokens(3, 6)
    am = torch.ones_like(x)
    am[1, :2] = 0
    am[2, :4] = 0
    kw = dict(max_new_tokens=8, do_sample=False, attention_mask=am)
    assert torch.equal(patched.eval().generate(x, **kw), ref.eval().generate(x, **kw))


def test_eval_with_labels_returns_logits_and_hf_loss():
    ref, patched, _ = M.trio("gpt2")
    x = _tokens()
    with torch.no_grad():
        a, b = ref.eval()(input_ids=x, labels=x), patched.eval()(input_ids=x, labels=x)
    assert b.logits is not None and b.logits.shape == a.logits.shape
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-6, atol=1e-6)


def test_fused_loss_options_match_hf():
    """num_items_in_batch (sum / count), shift_labels, ignore_index, return_dict=False."""
    ref, patched, _ = M.trio("llama")
    x = _tokens()
    labels = x.clone()
    labels[1, 5:] = -100
    n = (labels[:, 1:] != -100).sum()
    for kw in (dict(labels=labels, num_items_in_batch=n), dict(labels=labels, shift_labels=labels.roll(-1, 1)),
               dict(labels=labels.masked_fill(labels == -100, -1), ignore_index=-1)):
        a = ref.train()(input_ids=x, **kw).loss
        b = patched.train()(input_ids=x, **kw).loss
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=str(list(kw)))
    out = patched.train()(input_ids=x, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0
    assert not any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in out)


def test_unpatched_forms_are_left_alone():
    """No labels (logits_to_keep honoured) and a user's own loss function take HF's path."""
    _, patched, _ = M.trio("gpt2")
    x = _tokens()
    patched.train()
    assert patched(input_ids=x, logits_to_keep=1).logits.shape[1] == 1
    assert patched(input_ids=x).logits is not None
    patched.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()
    out = patched(input_ids=x, labels=x)
    assert out.logits is not None and torch.allclose(out.loss, out.logits.float().mean())


def test_trainer_sees_the_same_forward_signature():
    import inspect
    ref, patched, _ = M.trio("gpt2")
    assert inspect.signature(patched.forward) == inspect.signature(ref.forward)


def test_patch_twice_and_bad_model_raise():
    _, patched, _ = M.trio("gpt2")
    with pytest.raises(ValueError, match="already patched"):
        gptkernels.hf.patch(patched)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        gptkernels.hf.patch("gpt2")


def test_error_while_patching_undoes_everything(monkeypatch):
    model = M.make("gpt2")
    before = {n: (type(m), dict(vars(m))) for n, m in model.named_modules()}
    attn = model.config._attn_implementation

    def boom(m):
        raise RuntimeError("injected")
    monkeypatch.setattr(LS, "install", boom)
    with pytest.raises(RuntimeError, match="injected"):
        gptkernels.hf.patch(model)
    assert model.config._attn_implementation == attn
    assert not hasattr(model, "gptkernels_patched")
    for n, m in model.named_modules():
        assert type(m) is before[n][0], n
        assert set(vars(m)) == set(before[n][1]), n


def test_parts_can_be_switched_off():
    model = gptkernels.hf.patch(M.make("gpt2"), layer_norm=False, mlp=False, attention=False, cross_entropy=True)
    r = model.gptkernels_patched
    assert (r.layer_norm, r.mlp, r.attention, r.cross_entropy) == ([], [], None, True)
    assert model.config._attn_implementation != A.NAME


def test_unknown_architecture_gets_a_summary_warning(monkeypatch):
    from gptkernels.hf import patching as P
    monkeypatch.setattr(P, "TESTED", ())
    with pytest.warns(UserWarning, match=r"gptkernels.hf.patch\(gpt2\): 5 LayerNorm"):
        gptkernels.hf.patch(M.make("gpt2"))


def test_model_that_changes_logits_before_its_loss_keeps_hf_loss():
    """A forward that scales the logits before the loss (as softcapping models do) fails the probe."""
    model = M.make("gpt2")
    cls = type(model)
    forward = cls.forward

    class Scaled(cls):
        def forward(self, *a, labels=None, **kw):
            out = forward(self, *a, **kw)
            logits = out.logits * 0.5
            loss = self.loss_function(logits, labels, self.config.vocab_size) if labels is not None else None
            return type(out)(loss=loss, logits=logits)
    model.__class__ = Scaled
    gptkernels.hf.patch(model)
    assert not model.gptkernels_patched.cross_entropy
    assert "cross_entropy" in model.gptkernels_patched.skipped


# ---- the comparisons can fail: deliberately wrong variants must be caught ----------------------------

def _loss_and_grads_check(model_type, patched_hook=None):
    ref, patched, truth = M.trio(model_type)
    if patched_hook:
        patched_hook(patched)
    x = _tokens()
    outs = [_train_step(m, x, x) for m in (ref, patched, truth)]
    M.check("loss", outs[1].loss.detach(), outs[0].loss.detach(), outs[2].loss.detach())
    for (n, p), q, t in zip(ref.named_parameters(), patched.parameters(), truth.parameters()):
        M.check(n, q.grad, p.grad, t.grad)


def test_check_catches_erf_gelu_for_tanh_gelu():
    def wrong(model):
        for m in model.modules():
            if hasattr(m, "_gptkernels_mlp"):
                fc, _act, proj, drop = m._gptkernels_mlp
                m._gptkernels_mlp = (fc, "gelu", proj, drop)
    with pytest.raises(AssertionError, match="exceeds"):
        _loss_and_grads_check("gpt2", wrong)


def test_check_catches_unshifted_labels(monkeypatch):
    real = LS.causal_lm_loss

    def unshifted(h, head, labels, vocab_size, *rest):
        return real(h, head, labels, vocab_size, shift_labels=labels)
    # after patching: the patch-time probe would notice and keep HF's loss
    hook = lambda model: monkeypatch.setattr(LS, "causal_lm_loss", unshifted)  # noqa: E731
    with pytest.raises(AssertionError, match="exceeds"):
        _loss_and_grads_check("gpt_neox", hook)


def test_check_catches_wrong_attention_scale(monkeypatch):
    real = A._flash
    monkeypatch.setattr(A, "_flash", lambda q, k, v, causal, scale, *a, **kw: real(q, k, v, causal, None, *a, **kw))
    ref, patched, truth = M.trio("opt")  # OPT scales the queries itself and asks for scaling=1.0
    r, p, t = _eval_logits((ref, patched, truth), _tokens())
    with pytest.raises(AssertionError, match="exceeds"):
        M.check("opt logits", p, r, t)


def test_check_catches_kernel_rows_kept_for_padding(monkeypatch):
    monkeypatch.setattr(A, "_split_rows", lambda module, q, k, v, mask, plan, scaling, out, *a: out)
    ref, patched, truth = M.trio("llama")
    x = _tokens()
    r, p, t = _eval_logits((ref, patched, truth), x, _right_padded(x))
    with pytest.raises(AssertionError, match="exceeds"):
        M.check("llama right-padded logits", p, r, t)


class _LoraLike(nn.Module):
    """What PEFT's LoRA does to a Linear: keeps it as base_layer and adds a low-rank term."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.a = nn.Linear(base.in_features, 2, bias=False)
        self.b = nn.Linear(2, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.b(self.a(x))


@pytest.mark.parametrize("model_type,path", [("gpt_neo", "mlp.c_fc"), ("opt", "fc1"),
                                             ("gpt_neox", "mlp.dense_4h_to_h")])
def test_projection_wrapped_after_patching(model_type, path):
    """A LoRA-style wrapper added after patch() (the fused MLP / linear_act would bypass it)."""
    ref, patched, truth = M.trio(model_type)
    for model in (ref, patched, truth):
        torch.manual_seed(5)
        for layer in (model.transformer.h if model_type == "gpt_neo" else model.model.decoder.layers
                      if model_type == "opt" else model.gpt_neox.layers):
            owner_name, _, name = path.rpartition(".")
            owner = layer.get_submodule(owner_name) if owner_name else layer
            setattr(owner, name, _LoraLike(getattr(owner, name)).to(next(model.parameters()).dtype))
    r, p, t = _eval_logits((ref, patched, truth), _tokens())
    M.check(f"{model_type} with {path} wrapped", p, r, t)


def test_pickling_a_patched_model_says_what_to_do(tmp_path):
    _, patched, _ = M.trio("gpt2")
    with pytest.raises(TypeError, match="save its state_dict"):
        torch.save(patched, tmp_path / "model.pt")
    torch.save(patched.state_dict(), tmp_path / "sd.pt")  # the usual way keeps working


def test_deepcopy_of_a_patched_model_is_patched_on_its_own():
    _, patched, _ = M.trio("gpt2")
    twin = copy.deepcopy(patched)
    assert twin.forward.__self__ is twin
    assert twin.lm_head.forward.__self__ is twin.lm_head
    assert twin._gptkernels_fusion is not patched._gptkernels_fusion
    assert twin.gptkernels_patched == patched.gptkernels_patched
    x = _tokens()
    twin.train()(input_ids=x, labels=x).loss.backward()
    assert twin.lm_head.weight.grad is not None and patched.lm_head.weight.grad is None
