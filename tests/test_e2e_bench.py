"""benchmarks/e2e_train.py as a CPU smoke test: every provider runs the same model on the same
batches (equal first losses), and the JSON has the fields the GPU run reports."""
import json
import os

import pytest
import torch

from benchmarks import e2e_train
from gptkernels import GPT, GPTConfig


def test_baseline_is_the_same_model():
    kw, _ = e2e_train.MODELS["cpu-tiny"]
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**kw))
    base = e2e_train.NanoGPT(**kw)
    base.load_state_dict(ours.state_dict())  # strict: the same parameter names and shapes
    x = torch.randint(0, kw["vocab_size"], (2, 16))
    _, l1 = ours(x, x)
    _, l2 = base(x, x)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke configuration")
def test_e2e_benchmark_cpu_smoke(tmp_path):
    rc = e2e_train.main(["--out", str(tmp_path), "--stem", "e2e", "--steps", "2", "--warmup", "1",
                         "--providers", "gptkernels,eager,compile", "--compile-backend", "aot_eager"])
    assert rc == 0
    d = json.load(open(tmp_path / "e2e.json"))
    assert d["env"]["torch"] == torch.__version__
    rows = {r["provider"]: r for r in d["rows"]}
    assert set(rows) == {"gptkernels", "eager", "compile"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["speedup_vs_eager"] > 0 and r["speedup_vs_compile"] > 0
        assert r["loss_first"] == pytest.approx(rows["eager"]["loss_first"], rel=1e-4)
    assert os.path.isfile(tmp_path / "e2e.csv") and os.path.isfile(tmp_path / "e2e-e2e_train.png")
