"""benchmarks/e2e_hf.py as a CPU smoke test: every provider and phase runs on the same weights (equal
first losses, equal greedy tokens) and the outputs have the fields the GPU run reports."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import e2e_hf  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke configuration")
def test_e2e_hf_benchmark_cpu_smoke(tmp_path):
    rc = e2e_hf.main(["--out", str(tmp_path), "--stem", "hf", "--models", "gpt2-tiny", "--steps", "1",
                      "--warmup", "0"])
    assert rc == 0
    d = json.load(open(tmp_path / "hf.json"))
    assert d["env"]["torch"] == torch.__version__
    rows = {(r["phase"], r["provider"]): r for r in d["rows"]}
    assert set(rows) == {(ph, p) for ph in e2e_hf.PHASES for p in e2e_hf.PROVIDERS}
    for r in rows.values():
        assert "error" not in r and "warning" not in r, r
        assert r["tokens_per_s"] > 0 and r["speedup_vs_eager"] > 0 and r["speedup_vs_sdpa"] > 0
    assert rows[("train", "gptkernels")]["patched"].startswith("gptkernels.hf.patch(gpt2): 5 LayerNorm, 2 MLP")
    for p in e2e_hf.PROVIDERS:
        assert rows[("train", p)]["loss_first"] == pytest.approx(rows[("train", "eager")]["loss_first"], rel=1e-5)
        assert rows[("generate", p)]["tokens_head"] == rows[("generate", "eager")]["tokens_head"]
    assert os.path.isfile(tmp_path / "hf.csv") and os.path.isfile(tmp_path / "hf.png")
