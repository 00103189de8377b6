"""GPT feed-forward block, fwd / bwd / fwd+bwd: gptkernels FusedMLP (cuBLASLt GEMMs with fused
epilogues) vs torch eager (nn.Sequential(Linear, GELU, Linear) with autograd) vs torch.compile of
the same module.

FLOPs: the four GEMMs' multiply-adds, 2 per MAC: forward 2 GEMMs = 4*N*C*H, backward 4 GEMMs =
8*N*C*H (H = 4C), fwd+bwd 12*N*C*H. Elementwise work (bias, GELU) is not counted.
On a CPU (harness smoke test only) the grid shrinks and runs in float32.
"""
import torch
from torch import nn

from benchmarks.harness import Case
from gptkernels.nn import FusedMLP

TORCH_ACT = {"gelu_tanh": lambda: nn.GELU(approximate="tanh"), "gelu": nn.GELU, "relu": nn.ReLU}


def cases(quick: bool):
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    n = 16384 if cuda else 64
    dtype = torch.bfloat16 if cuda else torch.float32
    grid = [(768, "gelu_tanh")] if quick else [(768, "gelu_tanh"), (2048, "gelu_tanh"), (768, "gelu"), (768, "relu")]
    if not cuda:
        grid = [(64, "gelu_tanh")]
    out = []
    for c, act in grid:
        h = 4 * c

        def mk(build, n=n, c=c):
            def factory():
                m = build().to(dev, dtype)
                x = torch.randn(n, c, device=dev, dtype=dtype, requires_grad=True)
                return (lambda: m(x)), [x] + list(m.parameters())
            return factory

        def ours(c=c, h=h, act=act):
            return FusedMLP(c, h, activation=act)

        def ref(c=c, h=h, act=act):
            return nn.Sequential(nn.Linear(c, h), TORCH_ACT[act](), nn.Linear(h, c))

        providers = {"gptkernels": mk(ours), "torch": mk(ref)}
        if cuda:
            providers["torch.compile"] = mk(lambda ref=ref: torch.compile(ref()))
        out.append(Case(
            op="mlp", name=f"N{n} C{c} H{h} {act} {str(dtype)[6:]}",
            params={"N": n, "C": c, "H": h, "activation": act, "dtype": str(dtype)[6:]},
            providers=providers, modes=("fwd", "bwd", "fwd+bwd"),
            flops=lambda mode, n=n, c=c, h=h: {"fwd": 4, "bwd": 8, "fwd+bwd": 12}[mode] * n * c * h,
        ))
    return out
