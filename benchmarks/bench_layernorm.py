"""LayerNorm and the fused residual add + LayerNorm: gptkernels vs torch (F.layer_norm; for the
fused op, `r + x` then F.layer_norm), torch.compile, and Liger-Kernel's LayerNorm when it is
importable.

Bytes (weight, bias, statistics and parameter gradients are left out: they are O(C) or O(N)):
  layer_norm      fwd = read x + write y                    = 2*N*C elements
                  bwd = read x, dy + write dx               = 3*N*C elements
  add_layer_norm  fwd = read residual, x + write s, y       = 4*N*C elements
                  bwd = read s, dy, ds + write dx           = 4*N*C elements (d residual = d x)
The backward includes dweight and dbias (the harness takes gradients of x, weight and bias).
"""
import torch
import torch.nn.functional as F

from benchmarks.harness import Case
from gptkernels.nn import functional as GF


def _liger_layer_norm():
    """Liger-Kernel's LayerNorm as f(x, w, b, eps), or None when it is not installed."""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except Exception:  # not installed, or incompatible with this torch/triton
        return None
    return lambda x, w, b, eps: LigerLayerNormFunction.apply(x, w, b, eps)


def cases(quick: bool):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 16384 if dev == "cuda" else 256
    widths = [768, 4096] if quick else [768, 1024, 2048, 4096, 8192]
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    liger = _liger_layer_norm() if dev == "cuda" else None
    eps = 1e-5
    out = []
    for c in widths:
        for dtype in dtypes:
            elt = torch.tensor([], dtype=dtype).element_size()

            def mk(fn, n=n, c=c, dtype=dtype):
                def factory():
                    x = torch.randn(n, c, device=dev, dtype=dtype, requires_grad=True)
                    w = (1 + 0.1 * torch.randn(c, device=dev)).to(dtype).requires_grad_()
                    b = (0.1 * torch.randn(c, device=dev)).to(dtype).requires_grad_()
                    return (lambda: fn(x, w, b)), [x, w, b]
                return factory

            def ref(x, w, b, c=c):
                return F.layer_norm(x, (c,), w, b, eps)

            providers = {"gptkernels": mk(lambda x, w, b, c=c: GF.layer_norm(x, (c,), w, b, eps)), "torch": mk(ref)}
            if dev == "cuda":
                providers["torch.compile"] = mk(torch.compile(ref))
            if liger is not None:
                providers["liger"] = mk(lambda x, w, b: liger(x, w, b, eps))
            out.append(Case(
                op="layer_norm", name=f"N{n} C{c} {str(dtype)[6:]}",
                params={"N": n, "C": c, "dtype": str(dtype)[6:]},
                providers=providers, modes=("fwd", "bwd"),
                bytes=lambda mode, n=n, c=c, elt=elt: (2 if mode == "fwd" else 3) * n * c * elt,
            ))

    # The fused residual add: the GPT-2 width and a wide one, bf16.
    for c in ([768] if quick else [768, 4096]):
        dtype = torch.bfloat16

        def mk2(fn, n=n, c=c, dtype=dtype):
            def factory():
                r = torch.randn(n, c, device=dev, dtype=dtype, requires_grad=True)
                x = torch.randn(n, c, device=dev, dtype=dtype, requires_grad=True)
                w = (1 + 0.1 * torch.randn(c, device=dev)).to(dtype).requires_grad_()
                b = (0.1 * torch.randn(c, device=dev)).to(dtype).requires_grad_()
                return (lambda: fn(r, x, w, b)), [r, x, w, b]
            return factory

        def unfused(r, x, w, b, c=c):
            s = r + x
            return s, F.layer_norm(s, (c,), w, b, eps)

        providers = {"gptkernels": mk2(lambda r, x, w, b: GF.add_layer_norm(r, x, w, b, eps)), "torch": mk2(unfused)}
        if dev == "cuda":
            providers["torch.compile"] = mk2(torch.compile(unfused))
        out.append(Case(
            op="add_layer_norm", name=f"N{n} C{c} bfloat16",
            params={"N": n, "C": c, "dtype": "bfloat16"},
            providers=providers, modes=("fwd", "bwd"),
            bytes=lambda mode, n=n, c=c: 4 * n * c * 2,
        ))
    return out
