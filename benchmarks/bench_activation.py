"""bias + GELU(tanh) / ReLU: gptkernels vs torch unfused `F.gelu(x + b)` vs torch.compile.

Bytes: forward = read x + write y (2*N*F elements); backward = read x, dy + write dx
(3*N*F elements). The bias (F elements) is left out.
"""
import torch
import torch.nn.functional as F

from benchmarks.harness import Case
from gptkernels.nn import functional as GF


def _inputs(n, f, dtype, dev):
    x = torch.randn(n, f, device=dev, dtype=dtype, requires_grad=True)
    b = torch.randn(f, device=dev, dtype=dtype, requires_grad=True)
    return x, b


def cases(quick: bool):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 16384 if dev == "cuda" else 256
    widths = [3072] if quick else [3072, 4096, 8192]
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    out = []
    for act in ["gelu_tanh", "relu"]:
        for f in widths:
            for dtype in dtypes:
                elt = torch.tensor([], dtype=dtype).element_size()

                def mk(fn, n=n, f=f, dtype=dtype):
                    def factory():
                        x, b = _inputs(n, f, dtype, dev)
                        return (lambda: fn(x, b)), [x, b]
                    return factory

                ours = (lambda x, b: GF.bias_gelu(x, b)) if act == "gelu_tanh" else GF.bias_relu
                ref = (lambda x, b: F.gelu(x + b, approximate="tanh")) if act == "gelu_tanh" else (lambda x, b: F.relu(x + b))
                providers = {"gptkernels": mk(ours), "torch": mk(ref)}
                if dev == "cuda":
                    providers["torch.compile"] = mk(torch.compile(ref))
                out.append(Case(
                    op=f"bias_{act}", name=f"N{n} F{f} {str(dtype)[6:]}",
                    params={"N": n, "F": f, "dtype": str(dtype)[6:]},
                    providers=providers, modes=("fwd", "bwd"),
                    bytes=lambda mode, n=n, f=f, elt=elt: (2 if mode == "fwd" else 3) * n * f * elt,
                ))
    return out
