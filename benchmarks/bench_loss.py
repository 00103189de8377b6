"""Softmax cross-entropy, N=16384 rows x V=50304 (GPT-2 vocabulary padded to a multiple of 64):
gptkernels (one fused kernel) vs torch (F.cross_entropy with the fp32 upcast, as under autocast) vs
torch.compile of the same. And the LM head + loss: gptkernels linear_cross_entropy (chunked, the
logits never exist) vs torch F.linear + F.cross_entropy (+ torch.compile in the full grid).

fwd+bwd is what a training step does: the loss, then `loss.backward()`. Every provider's loss passes
through a node whose backward hands it an upstream gradient of exactly 1 (the harness would otherwise
feed a random one), so gptkernels' backward takes the path a training step takes (the gradient
computed in the forward, rescaling skipped); torch's backward is the same work for any value.
The "bwd" mode is not run: gptkernels' backward rescales the stored gradient in place and may run
once per forward.

GB/s counts the minimum traffic: read the logits once, write their gradient once (2*N*V*elt; the
loss alone, "fwd" without grad: N*V*elt). peak_mem_gib is the allocator's peak during the row: it
includes the logits themselves (N*V*2 bytes = 1.53 GiB here) and the harness's 0.25 GiB L2-flush
buffer; what differs between providers is the temporaries (torch: fp32 copies of the logits).
linear_cross_entropy: TFLOP/s of its three GEMMs (2*N*C*V each; fwd without grad: one).
"""
import torch
import torch.nn.functional as F

from benchmarks.harness import Case
from gptkernels.nn import functional as GF


class _UnitGrad(torch.autograd.Function):
    """Identity whose backward passes an upstream gradient of exactly 1 (as loss.backward())."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.ones_like(g)


def _torch_ce(logits, t):
    return F.cross_entropy(logits.float(), t)


def cases(quick: bool):
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    n, vocab, c = (16384, 50304, 768) if cuda else (64, 1000, 64)
    dtype = torch.bfloat16 if cuda else torch.float32
    elt = torch.tensor([], dtype=dtype).element_size()
    out = []

    def mk_ce(fn, grad):
        def factory():
            logits = torch.randn(n, vocab, device=dev, dtype=dtype, requires_grad=grad)
            t = torch.randint(0, vocab, (n,), device=dev)
            return (lambda: _UnitGrad.apply(fn(logits, t))), ([logits] if grad else [])
        return factory

    providers = lambda grad: {  # noqa: E731
        "gptkernels": mk_ce(GF.cross_entropy, grad), "torch": mk_ce(_torch_ce, grad),
        **({"torch.compile": mk_ce(torch.compile(_torch_ce), grad)} if cuda else {})}
    name = f"N{n} V{vocab} {str(dtype)[6:]}"
    params = {"N": n, "V": vocab, "dtype": str(dtype)[6:]}
    out.append(Case(op="cross_entropy", name=name, params=params, providers=providers(True), modes=("fwd+bwd",),
                    bytes=lambda mode: 2 * n * vocab * elt))
    out.append(Case(op="cross_entropy_nograd", name=name, params=params, providers=providers(False), modes=("fwd",),
                    bytes=lambda mode: n * vocab * elt))

    def mk_lce(fn, compiled=False):
        def factory():
            x = torch.randn(n, c, device=dev, dtype=dtype, requires_grad=True)
            w = (torch.randn(vocab, c, device=dev) / c**0.5).to(dtype).requires_grad_()
            t = torch.randint(0, vocab, (n,), device=dev)
            f = torch.compile(fn) if compiled else fn
            return (lambda: _UnitGrad.apply(f(x, w, t))), [x, w]
        return factory

    lce = {"gptkernels": mk_lce(lambda x, w, t: GF.linear_cross_entropy(x, w, t)),
           "torch": mk_lce(lambda x, w, t: _torch_ce(F.linear(x, w), t))}
    if cuda and not quick:
        lce["torch.compile"] = mk_lce(lambda x, w, t: _torch_ce(F.linear(x, w), t), compiled=True)
    out.append(Case(op="linear_cross_entropy", name=f"N{n} C{c} V{vocab} {str(dtype)[6:]}",
                    params={"N": n, "C": c, "V": vocab, "dtype": str(dtype)[6:]}, providers=lce,
                    modes=("fwd+bwd",), flops=lambda mode: 6 * n * c * vocab))
    return out
