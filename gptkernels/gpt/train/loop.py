"""The pretraining loop: `gptkernels train` (one process, or one per GPU under torchrun).

  from gptkernels.gpt.train import TrainConfig, train
  train(TrainConfig.from_preset("demo", max_steps=200))

What a step does: grad_accum micro-batches of (B, T) tokens per rank (DDP's gradient all-reduce
only on the last one), bf16 autocast on GPU (fp32 on CPU), gradient clipping, AdamW (torch's
fused implementation on GPU; weight decay on the >= 2-D parameters only), a cosine learning-rate
schedule after a linear warm-up. With document_masking each batch also carries its documents
(gptkernels/gpt/documents.py: cu_seqlens and positions, computed from the CPU tokens by
gdata.to_device before the copy, so no host sync); evaluation uses them too. The loss comes from
GPT.forward(x, y): the LM head and the cross-entropy run chunked in linear_cross_entropy, the
(B*T, vocab) logits never exist in full.

Multi-GPU / multi-node: run under torchrun; DistributedDataParallel (NCCL on GPU, gloo on CPU),
or FSDP2 (`fsdp=True`: fully_shard on each Block, then the root) for models that do not fit one
GPU (run_setup.py). Every rank reads its own slice of each global batch (gptkernels.gpt.data).

Checkpoints (out_dir/ckpt.pt, see gptkernels/gpt/checkpoint.py): model, optimizer, scheduler, data
position, RNG states of every rank, model + train config as plain dicts, and the tokenizer.
Written atomically every ckpt_interval steps, at the end, and on SIGINT/SIGTERM. `resume=True`
continues exactly: on the CPU the losses after resuming equal those of an uninterrupted run bit
for bit. A non-finite loss or gradient norm stops the run with a message; no checkpoint is
written after it, so the last one on disk is the last good one.

Logs: a tqdm bar (loss, tokens/s, MFU, ETA), out_dir/metrics.jsonl, out_dir/loss.png at the end.

Default path: our kernels (backend "auto"), no torch.compile, no CUDA graphs. Reasons: the
kernels are what this package is for and run on every supported GPU without the compile start-up
cost (minutes for a GPT-2 on one GPU), and compile over custom ops plus CUDA graphs has not been
measured against them yet (`compile=True`, `compile_mode="reduce-overhead"` for CUDA graphs, are
options). benchmarks/e2e_train.py measures the choices side by side.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

from gptkernels._backend import backend, get_backend
from gptkernels.gpt import data as gdata
from gptkernels.gpt.checkpoint import CKPT_FORMAT, CKPT_VERSION, full_state_dicts, save_atomic
from gptkernels.gpt.device import peak_flops
from gptkernels.gpt.train.config import TrainConfig, TrainError
from gptkernels.gpt.train.metrics import MetricsLog, plot_metrics
from gptkernels.gpt.train.run_setup import Dist, Run, gather_rng, setup_run
from gptkernels.ops import loss as ops_loss


@dataclass
class TrainResult:
    step: int
    stopped: str  # "done", "interrupted", "stop_at"
    losses: dict = field(default_factory=dict)  # step -> train loss (at log intervals)
    val_losses: dict = field(default_factory=dict)
    checkpoint: str | None = None
    tokens_per_s: float | None = None
    signal: int | None = None  # the signal that interrupted the run (SIGINT, SIGTERM)


def train(cfg: TrainConfig, log=None) -> TrainResult:
    """Run (or resume) a pretraining run; see the module docstring."""
    cfg.validate()
    d = Dist(cfg.device)
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    msg = say if d.master else (lambda s: None)
    stop_signal = {"sig": None}
    old_handlers = {}
    get_backend()  # first use of GPTKERNELS_BACKEND (checked there); the run itself uses cfg.backend
    old_target_check = ops_loss.get_target_check()

    def on_signal(signum, frame):
        stop_signal["sig"] = signum
        signal.signal(signum, old_handlers.get(signum, signal.SIG_DFL))  # a second one stops at once

    try:
        with backend(cfg.backend):
            # Targets come from the checked shards: the loss checks their range without a host sync
            # per step ("deferred": a bad target still raises, a step later).
            ops_loss.set_target_check("deferred")
            run = setup_run(cfg, d, msg)
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ValueError):  # not the main thread
                    old_handlers[sig] = signal.signal(sig, on_signal)
            return _loop(run, say, msg, stop_signal)
    finally:
        for sig, h in old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, h)
        ops_loss.set_target_check(old_target_check)
        d.close()


def _loop(run: Run, say, msg, stop_signal) -> TrainResult:
    cfg, d, raw, model, tok, mcfg = run.cfg, run.dist, run.raw, run.model, run.tok, run.mcfg
    optimizer, sched, loader, amp = run.optimizer, run.sched, run.loader, run.amp
    tps, accum, ckpt_path, step = run.tokens_per_step, run.accum, run.ckpt_path, run.step
    eos = tok.eos_id if cfg.document_masking else None  # document masking: documents start at end-of-text
    n_params = raw.num_params()
    peak = peak_flops(d.device, cfg.peak_tflops)
    msg(f"model: {n_params / 1e6:.2f}M parameters (non-embedding), {mcfg.n_layer} layers x {mcfg.n_head} heads x "
        f"{mcfg.n_embd}, vocab {mcfg.vocab_size}, T={cfg.block_size}"
        f"{f', attention window {mcfg.window}' if mcfg.window is not None else ''}"
        f"{f', attention softcap {mcfg.attn_softcap:g}' if mcfg.attn_softcap else ''}")
    msg(f"data: {run.data_dir}: {run.train_split.n_tokens:,} train tokens ({run.train_split.n_windows:,} sequences)"
        f"{f', {run.val_split.n_tokens:,} val' if run.val_split else ', no val split'}")
    msg(f"step: {tps:,} tokens = {cfg.batch_size} x {cfg.block_size} x {d.world} process(es) x {accum} "
        f"accumulation; {run.dtype} on {d.device}{', FSDP' if cfg.fsdp else ', DDP' if d.enabled else ''}"
        f"{', torch.compile' if cfg.compile else ''}{', document masking' if eos is not None else ''}; "
        f"gptkernels backend {cfg.backend}")

    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    metrics = MetricsLog(metrics_path, enabled=d.master, append=run.resumed is not None)
    # Loss records average the steps since the previous log step. A checkpoint written between log
    # steps (an interrupt, --stop-at, --ckpt-interval) carries the partial sums, so a resumed run
    # records the same averages as one that never stopped.
    partial = (run.resumed or {}).get("metrics_partial") or {}
    if d.master and run.resumed is None:
        if os.path.isfile(ckpt_path):
            msg(f"note: {ckpt_path} from an earlier run will be overwritten (pass --resume to continue it)")
        metrics.record({"event": "start", "train_config": dataclasses.asdict(cfg), "model_config": mcfg.to_dict(),
                        "world_size": d.world, "device": str(d.device), "dtype": run.dtype})
    bar = None

    def save_checkpoint(s, part):
        msd, osd = full_state_dicts(raw, optimizer)
        rng = gather_rng(d)
        if d.master:
            save_atomic({
                "format": CKPT_FORMAT, "version": CKPT_VERSION, "step": s, "tokens": s * tps,
                "model": msd, "optimizer": osd, "scheduler": sched.state_dict(), "data": loader.state_dict(),
                "rng": rng, "model_config": mcfg.to_dict(), "train_config": dataclasses.asdict(cfg),
                "world_size": d.world, "data_dir": os.path.abspath(run.data_dir), "tokenizer": tok.to_json_str(),
                "metrics_partial": {"loss_sum": part[0], "micro_steps": part[1], "since_step": step_last},
            }, ckpt_path, "the checkpoint")
        d.barrier()

    def evaluate():
        if run.val_split is None:
            return None
        raw.eval()
        wins = gdata.eval_windows(run.val_split, cfg.eval_samples, d.rank, d.world)
        tot = torch.zeros(2, device=d.device, dtype=torch.float64)
        with torch.no_grad(), amp:
            for w in gdata.batched(wins, cfg.batch_size):
                buf = torch.from_numpy(run.val_split.gather(w))
                x, y, docs = gdata.to_device(buf[:, :-1].contiguous(), buf[:, 1:].contiguous(), d.device, eos)
                _, loss = raw(x, y, docs=docs)
                tot[0] += loss.double() * y.numel()
                tot[1] += y.numel()
        d.all_reduce(tot)
        raw.train()
        return (tot[0] / tot[1]).item() if tot[1] > 0 else None

    def sample(s):
        if not d.master or cfg.fsdp:  # (FSDP: sampling not supported)
            return
        ids = [tok.eos_id] + tok.encode(cfg.sample_prompt)  # documents start with end-of-text
        n = min(cfg.sample_tokens, mcfg.block_size - len(ids))  # (setup_run made sure there is room for one)
        if n <= 0:
            return
        with amp:
            out = raw.generate(torch.tensor([ids], device=d.device), n, temperature=0.8, top_k=50,
                               eos_token_id=tok.eos_id, seed=cfg.seed + s)
        text = tok.decode([t for t in out[0, 1:].tolist() if t < tok.vocab_size])
        _write(f"--- sample at step {s} ---\n{text}\n---", bar, say)
        metrics.record({"step": s, "sample": text})

    if d.master and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    result = TrainResult(step=step, stopped="done")
    model.train()
    acc = torch.zeros(3, device=d.device, dtype=torch.float32)  # loss sum, micro-steps, non-finite count
    if d.master and partial:
        acc[0], acc[1] = partial["loss_sum"], partial["micro_steps"]
    last_norm = torch.zeros((), device=d.device)
    # step_last: the last log step (the loss window starts after it); timed_from: where tokens/s counts from
    t_last, step_last, timed_from, paused = time.perf_counter(), int(partial.get("since_step", step)), step, 0.0
    last_good_ckpt = step if run.resumed is not None else None
    stopped = "done"
    while step < cfg.max_steps:
        for m in range(accum):
            x, y, docs = gdata.to_device(*loader.next_batch(), d.device, eos)
            sync = not d.enabled or cfg.fsdp or m == accum - 1
            ctx = model.no_sync() if not sync else contextlib.nullcontext()
            if cfg.fsdp and d.enabled:
                raw.set_requires_gradient_sync(m == accum - 1)
            with ctx, amp:
                _, loss = model(x, y, docs=docs)
            if cfg.inject_nan_at is not None and step + 1 == cfg.inject_nan_at:
                loss = loss * float("nan")
            (loss / accum).backward()
            acc[0] += loss.detach().float()
            acc[1] += 1
        if cfg.grad_clip > 0:
            last_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            if hasattr(last_norm, "full_tensor"):
                last_norm = last_norm.full_tensor()
            acc[2] += (~torch.isfinite(last_norm)).float()
        acc[2] += (~torch.isfinite(acc[0])).float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        if bar is not None:
            bar.update(1)

        boundary = (step % cfg.log_interval == 0 or step == cfg.max_steps or step % cfg.eval_interval == 0
                    or step % cfg.ckpt_interval == 0 or step == cfg.stop_at
                    or (cfg.sample_interval and step % cfg.sample_interval == 0))
        if not d.enabled and stop_signal["sig"] is not None:
            boundary = True
        if not boundary:
            continue
        # One all-reduce (and host sync) per log boundary: loss, count, non-finite flag, stop signal.
        red = torch.cat([acc, torch.tensor([1.0 if stop_signal["sig"] is not None else 0.0], device=d.device)])
        d.all_reduce(red)
        loss_sum, n_micro, bad, sigs = red.tolist()
        if bad > 0 or not math.isfinite(loss_sum):
            where = (f"the last good checkpoint is {ckpt_path} (step {last_good_ckpt}); to go on, resume from it "
                     f"(--resume) with a lower --lr" if last_good_ckpt else
                     "no checkpoint was written; try again with a lower --lr")
            raise TrainError(f"non-finite loss or gradient (loss {loss_sum / max(n_micro, 1)}) in steps "
                             f"{step_last + 1}..{step}; stopping. {where}.")
        running = loss_sum / max(n_micro, 1)
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            acc.zero_()
            now = time.perf_counter()
            dt = now - t_last - paused
            tok_s = (step - timed_from) * tps / dt if dt > 0 else float("nan")
            t_last, step_last, timed_from, paused = now, step, step, 0.0
            train_loss = running
            mfu = raw.estimate_mfu(tok_s, peak, cfg.block_size) if peak else None
            norm = float(last_norm) if cfg.grad_clip > 0 else None
            rec = {"step": step, "loss": train_loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": norm,
                   "tokens": step * tps, "tokens_per_s": tok_s, "mfu": mfu, "time": time.time()}
            metrics.record(rec)
            result.losses[step] = train_loss
            result.tokens_per_s = tok_s
            if bar is not None:
                post = {"loss": f"{train_loss:.4f}", "tok/s": f"{tok_s:,.0f}"}
                if mfu is not None:
                    post["mfu"] = f"{100 * mfu:.1f}%"
                bar.set_postfix(post, refresh=False)
            elif d.master:
                say(f"step {step}/{cfg.max_steps}: loss {train_loss:.4f}, lr {rec['lr']:.2e}, {tok_s:,.0f} tok/s"
                    + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""))
        t_pause = time.perf_counter()  # evaluation, samples and checkpoints are not training time
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            vl = evaluate()
            if vl is not None:
                metrics.record({"step": step, "val_loss": vl})
                result.val_losses[step] = vl
                if d.master:
                    _write(f"step {step}: train loss {running:.4f}, val loss {vl:.4f}", bar, say)
        if cfg.sample_interval and step % cfg.sample_interval == 0 and step != cfg.max_steps:
            sample(step)
        interrupted = sigs > 0
        if interrupted or step % cfg.ckpt_interval == 0 or step == cfg.max_steps or step == cfg.stop_at:
            logged = step_last == step
            save_checkpoint(step, (0.0, 0.0) if logged else (loss_sum, n_micro))
            last_good_ckpt = step
            result.checkpoint = ckpt_path
        paused += time.perf_counter() - t_pause
        if interrupted:
            stopped = "interrupted"
            result.signal = stop_signal["sig"]
            break
        if step == cfg.stop_at:
            stopped = "stop_at"
            break
    if bar is not None:
        bar.close()
    result.step, result.stopped = step, stopped
    if stopped == "done":
        sample(step)
    if d.master:
        metrics.record({"event": "end", "step": step, "stopped": stopped})
        metrics.close()
        png = os.path.join(cfg.out_dir, "loss.png")
        if plot_metrics(metrics_path, png, f"{n_params / 1e6:.1f}M params, {cfg.out_dir}"):
            say(f"loss curve: {png}")
        if stopped == "interrupted":
            say(f"interrupted at step {step}; checkpoint {ckpt_path}; continue with --resume")
        elif stopped == "stop_at":
            say(f"stopped at step {step} (stop_at); checkpoint {ckpt_path}; continue with --resume")
        else:
            say(f"done: {step} steps; checkpoint {ckpt_path}")
    return result


def _write(s: str, bar, say) -> None:
    if bar is not None:
        bar.write(s, file=sys.stderr)
    else:
        say(s)
