"""benchmarks/bench_generate.py as a CPU smoke test: every provider generates from the same weights
and prompts; on the CPU in float32 they must all produce the same greedy tokens (the baselines are
the same model), and the JSON / CSV / PNG have the fields the GPU run reports."""
import json
import os

import pytest
import torch

from benchmarks import bench_generate


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke configuration")
def test_generate_benchmark_cpu_smoke(tmp_path):
    rc = bench_generate.main(["--out", str(tmp_path), "--stem", "gen", "--quick", "--batches", "1,3",
                              "--compile-backend", "aot_eager"])
    assert rc == 0
    d = json.load(open(tmp_path / "gen.json"))
    assert d["env"]["torch"] == torch.__version__
    rows = d["rows"]
    assert {r["case"] for r in rows} == {"cpu-tiny B1 prompt8 new8", "cpu-tiny B3 prompt8 new8"}
    for case in {r["case"] for r in rows}:
        by = {r["provider"]: r for r in rows if r["case"] == case}
        assert set(by) == set(bench_generate.PROVIDERS)
        for r in by.values():
            assert "error" not in r, r
            assert r["tokens_per_s"] > 0 and r["ms_per_token"] > 0 and r["speedup_vs_compile"] > 0
            assert r["match_vs_gptkernels_eager"] == 1.0, (case, r["provider"])
    assert os.path.isfile(tmp_path / "gen.csv") and os.path.isfile(tmp_path / "gen-generate.png")


def test_static_baseline_is_the_same_model():
    """StaticGPT (the torch.compile baseline) loads gptkernels.GPT's state_dict and gives its logits."""
    from gptkernels import GPT, GPTConfig
    kw = bench_generate.MODELS["cpu-tiny"]
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**kw)).eval()
    base = bench_generate.StaticGPT(**kw, batch=2, capacity=20).eval()
    base.load_state_dict(ours.state_dict())  # strict: the same names and shapes
    x = torch.randint(0, kw["vocab_size"], (2, 12))
    with torch.no_grad():
        ref, _ = ours(x)
        pre = base(x[:, :10], torch.arange(10))  # prefill, then two cached steps
        steps = [base(x[:, t:t + 1], torch.tensor([t])) for t in (10, 11)]
    torch.testing.assert_close(torch.cat([pre] + steps, 1), ref, rtol=1e-4, atol=1e-4)
