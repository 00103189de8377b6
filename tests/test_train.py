"""Training loop on the CPU: loss falls, exact resume, DDP/FSDP over gloo match one process,
NaN guard, checkpoints, signals."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gptkernels.gpt import data
from gptkernels.gpt.checkpoint import CheckpointError, load_checkpoint
from gptkernels.gpt.optim import CosineSchedule, adamw
from gptkernels.gpt.train import TrainConfig, TrainError, train

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import make_tiny_dataset, read_metrics, tiny_cfg  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(log=lambda s: None)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_dataset(str(tmp_path_factory.mktemp("data") / "ds"))


def test_loss_falls_on_the_bundled_corpus(tmp_path, monkeypatch):
    """No data arguments: the bundled standard-library corpus is prepared into the cache and used."""
    monkeypatch.setenv("GPTKERNELS_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig.from_preset("tiny", out_dir=str(tmp_path / "run"), max_steps=40, eval_interval=40,
                                  progress=False)
    assert cfg.data is None
    res = train(cfg, **QUIET)
    assert os.path.isfile(os.path.join(tmp_path, "cache", "data", os.listdir(tmp_path / "cache" / "data")[0],
                                       "meta.json"))
    first = res.losses[1]
    assert abs(first - math.log(2048)) < 0.5  # starts near uniform over the 2048-token vocabulary
    last = sum(res.losses[s] for s in range(36, 41)) / 5
    assert last < first - 0.6, (first, last)
    assert res.val_losses[40] < first - 0.6
    # A second run finds the prepared corpus in the cache.
    meta_dir = data.default_dataset("stdlib-small", progress=False, log=lambda s: None)
    assert meta_dir.startswith(str(tmp_path / "cache"))


def test_resume_equals_uninterrupted(tiny_data, tmp_path):
    """Stop after step 5, resume, and the losses of steps 6..12 (and the val losses) equal those of
    a run that never stopped, exactly. Dropout and gradient accumulation are on, so the RNG and
    the data position must both come back."""
    kw = dict(dropout=0.1, tokens_per_step=2 * 4 * 32)
    full = train(tiny_cfg(tiny_data, str(tmp_path / "a"), **kw), **QUIET)
    part = train(tiny_cfg(tiny_data, str(tmp_path / "b"), stop_at=5, **kw), **QUIET)
    assert part.stopped == "stop_at" and part.step == 5
    rest = train(tiny_cfg(tiny_data, str(tmp_path / "b"), resume=True, **kw), **QUIET)
    assert rest.step == 12 and min(rest.losses) == 6
    for s in range(1, 6):
        assert part.losses[s] == full.losses[s]
    for s in range(6, 13):
        assert rest.losses[s] == full.losses[s], s
    assert rest.val_losses == full.val_losses
    # The resumed run's final weights equal the uninterrupted run's.
    a, b = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # metrics.jsonl of the resumed run continues the first part's.
    steps = [r["step"] for r in read_metrics(str(tmp_path / "b")) if "loss" in r]
    assert steps == list(range(1, 13))


def _torchrun(configs, timeout=240):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "tests", "_dist_train.py"), json.dumps(configs)],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_interrupted_between_log_steps_records_the_same_losses(tiny_data, tmp_path):
    """A stop between two log steps (here step 6 of log_interval 4) writes no loss record of its own;
    the partial sums travel in the checkpoint, so the record at step 8 averages steps 5..8 exactly
    as in a run that never stopped (it used to average a partial interval and spike the chart)."""
    kw = dict(log_interval=4, eval_interval=100, ckpt_interval=100)
    full = train(tiny_cfg(tiny_data, str(tmp_path / "a"), **kw), **QUIET)
    part = train(tiny_cfg(tiny_data, str(tmp_path / "b"), stop_at=6, **kw), **QUIET)
    assert part.stopped == "stop_at" and sorted(part.losses) == [4]
    rest = train(tiny_cfg(tiny_data, str(tmp_path / "b"), resume=True, **kw), **QUIET)
    assert sorted(rest.losses) == [8, 12]
    assert {**part.losses, **rest.losses} == full.losses
    recs = [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / "b")) if "loss" in r]
    assert recs == sorted(full.losses.items())


def test_two_process_ddp_and_fsdp_match_one_process(tiny_data, tmp_path):
    """2 gloo processes x batch 2 (DDP, and FSDP2 with a stop and resume half-way) follow the loss
    curve of 1 process x batch 4: the same global batches, gradients averaged across ranks."""
    kw = dict(tokens_per_step=2 * 4 * 32, max_steps=8, eval_interval=4)  # 2 accumulation micro-steps
    one = train(tiny_cfg(tiny_data, str(tmp_path / "one"), batch_size=4, **kw), **QUIET)
    ddp = dataclasses.asdict(tiny_cfg(tiny_data, str(tmp_path / "ddp"), batch_size=2, **kw))
    # FSDP stops after step 3 and resumes (sharded state -> full checkpoint -> sharded again).
    fsdp_a = dataclasses.asdict(tiny_cfg(tiny_data, str(tmp_path / "fsdp"), batch_size=2, fsdp=True, stop_at=3, **kw))
    fsdp_b = dataclasses.asdict(tiny_cfg(tiny_data, str(tmp_path / "fsdp"), batch_size=2, fsdp=True, resume=True, **kw))
    _torchrun([ddp, fsdp_a, fsdp_b])
    for name in ("ddp", "fsdp"):
        m = read_metrics(str(tmp_path / name))
        start = next(r for r in m if r.get("event") == "start")
        assert start["world_size"] == 2
        losses = {r["step"]: r["loss"] for r in m if "loss" in r}
        vals = {r["step"]: r["val_loss"] for r in m if "val_loss" in r}
        assert sorted(losses) == list(range(1, 9))
        for s in range(1, 9):
            assert losses[s] == pytest.approx(one.losses[s], rel=2e-5, abs=2e-5), (name, s)
        for s, v in one.val_losses.items():
            assert vals[s] == pytest.approx(v, rel=2e-5, abs=2e-5), (name, s)
    # The 2-process checkpoints hold full (unsharded) weights that load into one process.
    c1, c2 = load_checkpoint(str(tmp_path / "one")), load_checkpoint(str(tmp_path / "fsdp"))
    assert c2["world_size"] == 2 and len(c2["rng"]) == 2
    for k, v in c1["model"].items():
        torch.testing.assert_close(c2["model"][k], v, rtol=1e-4, atol=1e-5)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path):
    cfg = tiny_cfg(tiny_data, str(tmp_path / "run"), inject_nan_at=8, ckpt_interval=3, log_interval=2)
    with pytest.raises(TrainError, match=r"non-finite loss.*steps 7\.\.8.*last good checkpoint.*\(step 6\)") as e:
        train(cfg, **QUIET)
    assert "--resume" in str(e.value) and "no checkpoint was written" not in str(e.value)
    with pytest.raises(TrainError, match="no checkpoint was written") as e:
        train(dataclasses.replace(cfg, out_dir=str(tmp_path / "early"), inject_nan_at=2), **QUIET)
    assert "resume" not in str(e.value)
    ck = load_checkpoint(str(tmp_path / "run"))
    assert ck["step"] == 6
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    # The run can go on from that checkpoint.
    res = train(dataclasses.replace(cfg, inject_nan_at=None, resume=True), **QUIET)
    assert res.step == 12 and all(math.isfinite(v) for v in res.losses.values())


def test_checkpoint_contents_are_plain_data(tiny_data, tmp_path):
    train(tiny_cfg(tiny_data, str(tmp_path / "run"), max_steps=3, ckpt_interval=2), **QUIET)
    path = str(tmp_path / "run" / "ckpt.pt")
    ck = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary unpickling
    assert ck["step"] == 3
    for key in ("model", "optimizer", "scheduler", "data", "rng", "model_config", "train_config", "tokenizer"):
        assert key in ck, key
    assert ck["data"]["consumed"] == 3 * 4 and ck["scheduler"]["step_count"] == 3
    assert isinstance(ck["model_config"], dict) and ck["model_config"]["n_layer"] == 2
    assert ck["optimizer"]["state"] and isinstance(ck["rng"][0], torch.Tensor)
    assert [f for f in os.listdir(tmp_path / "run") if ".tmp" in f] == []
    assert os.path.isfile(tmp_path / "run" / "loss.png")
    recs = read_metrics(str(tmp_path / "run"))
    assert recs[0]["event"] == "start" and recs[-1]["event"] == "end"
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(recs[1])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        with open(path, "r+b") as f:
            f.truncate(100)
        load_checkpoint(path)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_writes_a_checkpoint_and_resume_finishes(sig, code, tiny_data, tmp_path):
    """SIGINT and SIGTERM: a checkpoint, then exit status 128 + the signal's number (130, 143)."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "gptkernels", "train", "--preset", "tiny", "--data", tiny_data, "--out-dir", out,
           "--max-steps", "100000", "--ckpt-interval", "100000", "--eval-interval", "100000", "--no-progress",
           "--log-interval", "50"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:  # wait until it is training
        if os.path.isfile(metrics) and sum(1 for _ in open(metrics)) >= 2:
            break
        time.sleep(0.2)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err[-2000:]
    assert "interrupted at step" in err and "Traceback" not in err
    ck = load_checkpoint(out)
    assert ck["step"] >= 50
    res = train(tiny_cfg(tiny_data, out, max_steps=ck["step"] + 2, resume=True, block_size=32, batch_size=4,
                         n_embd=32), **QUIET)
    assert res.step == ck["step"] + 2


def test_config_errors(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="tokens_per_step: 100 is not a multiple"):
        train(tiny_cfg(tiny_data, str(tmp_path), tokens_per_step=100), **QUIET)
    with pytest.raises(ValueError, match="batch_size"):
        train(tiny_cfg(tiny_data, str(tmp_path), batch_size=0), **QUIET)
    with pytest.raises(ValueError, match="dtype"):
        train(tiny_cfg(tiny_data, str(tmp_path), dtype="float16"), **QUIET)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_cfg(tiny_data, str(tmp_path / "fresh"), resume=True), **QUIET)
    with pytest.raises(data.DataError, match="too few"):
        train(tiny_cfg(tiny_data, str(tmp_path), block_size=10_000_000, force=True), **QUIET)
    with pytest.raises(ValueError, match="preset"):
        TrainConfig.from_preset("huge")


def test_schedule_and_weight_decay_groups():
    from gptkernels import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    opt = adamw(model.parameters(), cfg.lr, cfg.weight_decay, torch.device("cpu"), betas=(cfg.beta1, cfg.beta2))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique
    s = CosineSchedule(opt, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)  # first warm-up step
    assert s.lr_at(9) == pytest.approx(1e-3)
    assert s.lr_at(60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # halfway down the cosine
    assert s.lr_at(110) == pytest.approx(1e-4) and s.lr_at(500) == pytest.approx(1e-4)
    lrs = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.cuda
def test_cuda_training_kernels_match_reference_and_learn(tiny_data, tmp_path):
    """On a GPU (bf16 autocast, fused AdamW): the kernel path and the reference path start from the
    same loss, both learn, and a stop/resume continues with finite losses. Unverified until run
    on a GPU (tools/device_check.sh)."""
    kw = dict(device="cuda", max_steps=30, eval_interval=30, log_interval=1, n_embd=64, block_size=64, batch_size=8)
    ker = train(tiny_cfg(tiny_data, str(tmp_path / "k"), backend="auto", **kw), **QUIET)
    ref = train(tiny_cfg(tiny_data, str(tmp_path / "r"), backend="reference", **kw), **QUIET)
    assert ker.losses[1] == pytest.approx(ref.losses[1], rel=2e-2)
    for res in (ker, ref):
        assert all(math.isfinite(v) for v in res.losses.values())
        assert sum(res.losses[s] for s in range(26, 31)) / 5 < res.losses[1] - 0.5
    ck = load_checkpoint(str(tmp_path / "k"))
    assert ck["train_config"]["device"] == "cuda" and len(ck["rng"][0]) > torch.get_rng_state().numel()
    part = train(tiny_cfg(tiny_data, str(tmp_path / "s"), stop_at=10, **kw), **QUIET)
    rest = train(tiny_cfg(tiny_data, str(tmp_path / "s"), resume=True, **kw), **QUIET)
    assert part.step == 10 and rest.step == 30
    for s in range(11, 31):
        assert rest.losses[s] == pytest.approx(ker.losses[s], rel=1e-2, abs=1e-2)


def test_fsdp_shards_each_block_as_a_unit():
    """FSDP2 in one gloo process: every Block is its own fully_shard unit (it applies only its own
    LayerNorms), the root is one too, and a training step gives the unsharded model's loss and
    gradients."""
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from gptkernels import GPT, GPTConfig
    from gptkernels.gpt.train.run_setup import _shard

    torch.manual_seed(0)
    plain = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=16))
    sharded = copy.deepcopy(plain)
    idx, tgt = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _shard(TrainConfig(fsdp=True), sharded)
        assert isinstance(sharded, FSDPModule)
        assert all(isinstance(b, FSDPModule) for b in sharded.transformer.h)
        assert not any(isinstance(m, FSDPModule) for b in sharded.transformer.h for m in b.modules() if m is not b)
        _, loss = sharded(idx, tgt)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters()}
    finally:
        dist.destroy_process_group()
    _, ref = plain(idx, tgt)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for n, p in plain.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
