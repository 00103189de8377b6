"""The attention family's check: the forward (with and without a KV cache's kv_lens), the backward
(default and deterministic reduction order, with and without a log-sum-exp gradient) and the
split-KV forward (flash_attn_decode: its CUDA-core kernel and the tensor-core forward split over the
keys), each against gptkernels.ops.attention.attention_ref in fp64 (the reference, fp32 softmax) and
in the half dtype (the baseline). Shapes: odd sequence lengths on both sides of the tile sizes,
Sq > Sk with causal masking (fully masked rows: out 0, lse -inf), grouped-query heads, both layouts
and padded head dims (40, 96). The variants (sliding window, softcap, packed variable-length
batches) are checked when the extension lists them in limits()["attention"]["variants"]: dense
calls with a window and/or softcap through the same three ops, and flash_attn_varlen_{fwd,bwd,decode}
on packed batches with an empty sequence and sequences of 1 and 17 tokens."""
from __future__ import annotations

import math

import torch

from gptkernels._selftest.harness import HALF, dtype_name, generator, poison, randn, run_case, select, sync
from gptkernels._selftest.harness import torch_math as tm
from gptkernels.ops.attention import LIMITS, attention_ref
from gptkernels.ops.attention_ref import per_sequence

BF16, FP16 = HALF
F64 = torch.float64
FLOOR_ULPS, MIN_SCALE = 1.0, 1.0  # the floor: one unit roundoff of max(|ref|, 1)

FWD_CASES = [  # quick, dtype, B, Hq, Hkv, Sq, Sk, D, causal, layout, kv_lens
    (True, BF16, 2, 4, 2, 17, 113, 64, True, "bhsd", None),
    (True, FP16, 1, 2, 1, 113, 17, 128, True, "bshd", None),
    (False, BF16, 1, 3, 3, 1, 1, 64, False, "bhsd", None),
    (False, FP16, 2, 8, 2, 203, 113, 128, False, "bhsd", None),
    (False, BF16, 1, 8, 1, 1000, 1000, 64, True, "bshd", None),
    (False, FP16, 2, 4, 4, 17, 17, 40, False, "bhsd", None),
    (False, BF16, 1, 2, 2, 64, 300, 96, True, "bshd", None),
    (False, FP16, 2, 4, 2, 17, 200, 64, True, "bhsd", (150, 200)),
]
BWD_CASES = [  # quick, dtype, B, Hq, Hkv, Sq, Sk, D, causal, layout, deterministic, with dlse
    (True, FP16, 2, 4, 2, 17, 113, 64, True, "bhsd", False, False),
    (False, BF16, 1, 2, 2, 113, 17, 128, False, "bshd", False, True),
    (False, BF16, 1, 4, 1, 113, 203, 128, True, "bhsd", True, False),
    (False, FP16, 2, 2, 2, 1, 1, 64, False, "bhsd", False, False),
    (False, BF16, 1, 8, 2, 1000, 1000, 64, True, "bshd", False, False),
    (False, FP16, 1, 4, 4, 113, 17, 96, True, "bhsd", True, True),
]
DECODE_CASES = [  # quick, dtype, B, Hq, Hkv, Sq, Sk, D, causal, layout, kv_lens
    (True, BF16, 2, 8, 2, 1, 1023, 128, True, "bhsd", (700, 1023)),
    (False, FP16, 3, 4, 4, 1, 77, 64, False, "bshd", None),
    (False, BF16, 1, 16, 1, 1, 4099, 64, True, "bhsd", None),
    (False, FP16, 2, 4, 2, 4, 300, 128, True, "bhsd", (5, 300)),
    # more than decode_max_rows rows per K/V head: the tensor-core forward, its keys split over CTAs
    (False, BF16, 1, 4, 2, 40, 1000, 128, True, "bshd", (600,)),
    (False, FP16, 2, 2, 2, 33, 500, 96, False, "bhsd", None),
]


# Variants. Dense: quick, dtype, B, Hq, Hkv, Sq, Sk, D, causal, layout, window, softcap
VARIANT_CASES = [
    (True, BF16, 1, 4, 2, 300, 300, 64, True, "bshd", (100, 0), 0.0),
    (True, FP16, 2, 2, 2, 129, 129, 128, False, "bhsd", (-1, -1), 30.0),
    (False, BF16, 1, 4, 4, 77, 300, 128, False, "bhsd", (64, 17), 5.0),
    (False, FP16, 2, 4, 1, 200, 200, 64, True, "bshd", (0, 0), 0.0),
]
# Varlen: quick, dtype, Hq, Hkv, query lengths, key lengths, D, causal, window, softcap
VARLEN_CASES = [
    (True, BF16, 4, 2, (17, 0, 1, 130), (17, 0, 1, 130), 64, True, (-1, -1), 0.0),
    (False, FP16, 2, 2, (5, 17, 64), (40, 17, 200), 128, False, (32, 8), 0.0),
    (False, BF16, 4, 1, (129, 1, 0, 65), (129, 1, 3, 65), 64, True, (48, 0), 20.0),
]


def _variant_names(window, softcap):
    return (("window",) if window[0] >= 0 or window[1] > 0 else ()) + (("softcap",) if softcap else ())


def _kernels_take(names) -> bool:
    return set(names) <= set(LIMITS.get("variants", ()))


def _variant_fwd(o, k, dev, g, dtype, B, Hq, Hkv, Sq, Sk, D, causal, layout, window, softcap, op):
    q, kk, v, _ = _qkv(g, dev, dtype, B, Hq, Hkv, Sq, Sk, D, layout)
    q = q * 4  # large scores, so that a softcap matters
    scale = 1.0 / math.sqrt(D)
    wl, wr = window
    dout = randn(g, q.shape, dtype, dev)
    poison(dev, 8 * (q.numel() + 2 * kk.numel()) * q.element_size())
    if op == "decode":
        out, lse = k.flash_attn_decode(q, kk, v, causal, scale, layout, None, wl, wr, softcap)
    else:
        out, lse = k.flash_attn_fwd(q, kk, v, causal, scale, layout, None, False, wl, wr, softcap)
    grads = None
    if op == "bwd":
        grads = k.flash_attn_bwd(dout, q, kk, v, out, lse, None, causal, scale, layout, False, wl, wr, softcap)
    sync(dev)

    def f(q, kk, v):
        return attention_ref(q, kk, v, causal, scale, layout, upcast=False, window=window, softcap=softcap)

    _compare(o, f, q, kk, v, dout, dtype, out, lse, grads)


def _compare(o, f, q, kk, v, dout, dtype, out, lse, grads):
    douts = [dout, None] if grads is not None else [None, None]
    (o64, lse64), g64 = tm(f, [q, kk, v], douts, F64)
    (ol, lsel), gl = tm(f, [q, kk, v], douts, dtype)
    o.add("out", out, o64, ol)
    o.expect(torch.equal(torch.isneginf(lse), torch.isneginf(lse64)), "lse: the -inf (fully masked) rows differ")
    o.add("lse", lse, lse64, lsel, torch.float32)
    for name, got, ref, base in zip(("dq", "dk", "dv"), grads or (), g64, gl):
        o.add(name, got, ref, base)


def _varlen(o, k, dev, g, dtype, Hq, Hkv, lens_q, lens_k, D, causal, window, softcap, op):
    def cu(lens):
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)

    cu_q, cu_k = cu(lens_q), cu(lens_k)
    q = randn(g, (sum(lens_q), Hq, D), dtype, dev, 4.0)
    kk, v = randn(g, (sum(lens_k), Hkv, D), dtype, dev), randn(g, (sum(lens_k), Hkv, D), dtype, dev)
    scale = 1.0 / math.sqrt(D)
    wl, wr = window
    args = (cu_q, cu_k, max(lens_q), max(lens_k), causal, scale, wl, wr, softcap)
    dout = randn(g, q.shape, dtype, dev)
    poison(dev, 8 * (q.numel() + 2 * kk.numel()) * q.element_size())
    if op == "decode":
        out, lse = k.flash_attn_varlen_decode(q, kk, v, *args)
    else:
        out, lse = k.flash_attn_varlen_fwd(q, kk, v, *args, False)
    grads = None
    if op == "bwd":
        grads = k.flash_attn_varlen_bwd(dout, q, kk, v, out, lse, None, *args, False)
    sync(dev)

    def f(q, kk, v):
        return per_sequence(lambda a, b, c: attention_ref(a, b, c, causal, scale, "bshd", upcast=False, window=window,
                                                         softcap=softcap), q, kk, v, cu_q, cu_k)

    _compare(o, f, q, kk, v, dout, dtype, out, lse, grads)


def _variant_results(k, device, quick, g):
    results = []
    for op in ("fwd", "bwd", "decode"):
        for c in select(VARIANT_CASES, quick):
            if not (_kernels_take(_variant_names(c[9], c[10])) and hasattr(k, "flash_attn_fwd")):
                continue
            desc = _describe(*c[:9]) + f" window={c[9]} softcap={c[10]}"
            results.append(run_case("attention", f"flash_attn_{op} variants", desc, c[0],
                                    lambda o, c=c, op=op: _variant_fwd(o, k, device, g, *c, op), FLOOR_ULPS, MIN_SCALE))
        for c in select(VARLEN_CASES, quick):
            if not (_kernels_take(("varlen",) + _variant_names(c[7], c[8])) and hasattr(k, "flash_attn_varlen_fwd")):
                continue
            desc = (f"{dtype_name(c[0])} H{c[1]}/{c[2]} q{list(c[3])} k{list(c[4])} D{c[5]}"
                    f"{' causal' if c[6] else ''} window={c[7]} softcap={c[8]}")
            results.append(run_case("attention", f"flash_attn_varlen_{op}", desc, c[0],
                                    lambda o, c=c, op=op: _varlen(o, k, device, g, *c, op), FLOOR_ULPS, MIN_SCALE))
    return results


def _qkv(g, dev, dtype, B, Hq, Hkv, Sq, Sk, D, layout, kv_lens=None):
    def mk(H, S):
        t = randn(g, (B, H, S, D), dtype, dev)
        return t if layout == "bhsd" else t.transpose(1, 2).contiguous()

    q, k, v = mk(Hq, Sq), mk(Hkv, Sk), mk(Hkv, Sk)
    lens = None
    if kv_lens is not None:
        lens = torch.tensor(kv_lens, device=dev, dtype=torch.int32)
        for b, n in enumerate(kv_lens):  # a cache past its fill holds garbage: it must not be read
            (k[b, :, n:] if layout == "bhsd" else k[b, n:]).fill_(float("nan"))
            (v[b, :, n:] if layout == "bhsd" else v[b, n:]).fill_(float("nan"))
    return q, k, v, lens


def _describe(dtype, B, Hq, Hkv, Sq, Sk, D, causal, layout, *rest):
    extra = " ".join(str(r) for r in rest if isinstance(r, str))
    text = f"{dtype_name(dtype)} B{B} H{Hq}/{Hkv} {Sq}x{Sk} D{D}{' causal' if causal else ''} {layout}"
    return text + (f" {extra}" if extra else "")


def _forward(o, k, dev, g, dtype, B, Hq, Hkv, Sq, Sk, D, causal, layout, kv_lens, decode=False):
    q, kk, v, lens = _qkv(g, dev, dtype, B, Hq, Hkv, Sq, Sk, D, layout, kv_lens)
    scale = 1.0 / math.sqrt(D)
    poison(dev, 4 * q.numel() * q.element_size())
    if decode:
        out, lse = k.flash_attn_decode(q, kk, v, causal, scale, layout, lens)
    else:
        out, lse = k.flash_attn_fwd(q, kk, v, causal, scale, layout, lens, False)
    sync(dev)
    f = lambda q, kk, v: attention_ref(q, kk, v, causal, scale, layout, lens, upcast=False)  # noqa: E731
    (o64, lse64), _ = tm(f, [q, kk, v], [None, None], F64)
    (ol, lsel), _ = tm(f, [q, kk, v], [None, None], dtype)
    o.expect(out.dtype == dtype and lse.dtype == torch.float32, f"dtypes out {out.dtype}, lse {lse.dtype}")
    o.add("out", out, o64, ol)
    o.expect(torch.equal(torch.isneginf(lse), torch.isneginf(lse64)), "lse: the -inf (fully masked) rows differ")
    o.add("lse", lse, lse64, lsel, torch.float32)


def _backward(o, k, dev, g, dtype, B, Hq, Hkv, Sq, Sk, D, causal, layout, deterministic, with_dlse):
    q, kk, v, _ = _qkv(g, dev, dtype, B, Hq, Hkv, Sq, Sk, D, layout)
    scale = 1.0 / math.sqrt(D)
    dout = randn(g, q.shape, dtype, dev)
    dlse = randn(g, (B, Hq, Sq), torch.float32, dev) if with_dlse else None
    poison(dev, 8 * (q.numel() + 2 * kk.numel()) * q.element_size())
    out, lse = k.flash_attn_fwd(q, kk, v, causal, scale, layout, None, deterministic)
    dq, dk, dv = k.flash_attn_bwd(dout, q, kk, v, out, lse, dlse, causal, scale, layout, deterministic)
    sync(dev)

    def f(q, kk, v):
        out, lse = attention_ref(q, kk, v, causal, scale, layout, upcast=False)
        return out, lse.masked_fill(torch.isneginf(lse), 0.0)

    (_, _), g64 = tm(f, [q, kk, v], [dout, dlse], F64)
    (_, _), gl = tm(f, [q, kk, v], [dout, dlse], dtype)
    for name, got, ref, base in zip(("dq", "dk", "dv"), (dq, dk, dv), g64, gl):
        o.add(name, got, ref, base)


def check_attention(k, device, quick=False):
    g = generator(device)
    results = []
    for impl, cases, body in (
            ("flash_attn_fwd", FWD_CASES, lambda o, c: _forward(o, k, device, g, *c)),
            ("flash_attn_bwd", BWD_CASES, lambda o, c: _backward(o, k, device, g, *c)),
            ("flash_attn_decode", DECODE_CASES, lambda o, c: _forward(o, k, device, g, *c, decode=True))):
        for c in select(cases, quick):
            desc = _describe(*c[:9]) + (" kv_lens" if impl != "flash_attn_bwd" and c[9] else "") + \
                (" deterministic" if impl == "flash_attn_bwd" and c[9] else "") + \
                (" dlse" if impl == "flash_attn_bwd" and c[10] else "")
            results.append(run_case("attention", impl, desc, c[0], lambda o, c=c, body=body: body(o, c),
                                    FLOOR_ULPS, MIN_SCALE))
    return results + _variant_results(k, device, quick, g)
