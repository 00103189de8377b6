"""benchmarks/bench_attention_variants.py as a CPU smoke test: the gptkernels providers run (torch's
flash backends are reported unavailable on the CPU), the rows carry tokens/s, the JSON / CSV / PNG
are written; and the two layouts the varlen case compares compute the same thing for real tokens."""
import json
import os

import pytest
import torch

import gptkernels
from benchmarks import bench_attention_variants as bench
from benchmarks import run


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke configuration")
def test_attention_variants_benchmark_cpu_smoke(tmp_path, capsys):
    rc = run.main(["--ops", "attention_variants", "--out", str(tmp_path), "--stem", "av", "--warmup", "1",
                   "--rep", "2"])
    assert rc == 0
    rows = json.load(open(tmp_path / "av.json"))["rows"]
    assert {r["op"] for r in rows} == {"attention_varlen", "attention_window"}
    ours = [r for r in rows if r["provider"].startswith("gptkernels")]
    assert {(r["provider"], r["mode"]) for r in ours} == {
        (p, m) for p in ("gptkernels_varlen", "gptkernels_padded", "gptkernels_window", "gptkernels_causal")
        for m in ("fwd", "bwd")}
    for r in ours:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["ms"] > 0
    varlen = next(r for r in ours if r["op"] == "attention_varlen")
    assert varlen["tokens"] == sum(bench.CPU_LENS) and varlen["padded_tokens"] == len(bench.CPU_LENS) * 40
    assert os.path.isfile(tmp_path / "av.csv")
    assert os.path.isfile(tmp_path / "av-attention_varlen.png") and os.path.isfile(tmp_path / "av-attention_window.png")
    assert "tok/s" in capsys.readouterr().out


def test_padded_causal_equals_varlen_on_real_tokens():
    """What the varlen case compares: right padding under causal leaves the real tokens' outputs
    exact, so both providers do the same useful work."""
    torch.manual_seed(0)
    lens, H, D = bench.CPU_LENS, 2, 16
    top = max(lens)
    pad = torch.randn(3, len(lens), top, H, D)
    packed = [torch.cat([t[b, :n] for b, n in enumerate(lens)]) for t in pad]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    out_v, lse_v = gptkernels.flash_attention_varlen(*packed, cu, cu, top, top, causal=True)
    out_p, lse_p = gptkernels.flash_attention(*pad, causal=True, layout="bshd")
    torch.testing.assert_close(out_v, torch.cat([out_p[b, :n] for b, n in enumerate(lens)]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_v, torch.cat([lse_p[b, :, :n] for b, n in enumerate(lens)], 1), atol=1e-5,
                               rtol=1e-5)
