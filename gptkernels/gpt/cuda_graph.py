"""Generation with the per-token step captured in a CUDA graph and replayed.

A decode step of a small model is mostly launch overhead when Python launches its ~10 kernels per
layer one by one; replaying a captured graph launches them all at once. generate() comes here
when cuda_graph is on (the default on a GPU):

  1. The request's batch is padded to a bucket (decode.batch_bucket) and its length
     (prompt + new tokens) rounded to a KV-cache capacity (decode.capacity_bucket).
  2. A Runner per (batch bucket, capacity) owns the static tensors: the KV cache and the
     DecodeState (last tokens, positions, step counter, finished flags, output ids, the call's
     uniform numbers, sampling scalars). Runners are kept per model and reused across calls.
  3. The prefill runs eagerly (its length varies) into the runner's cache and emits the first
     token; the one-token step (DecodeState.step) is captured once per sampling mode
     (decode.Sampling: greedy, top_k, nucleus on/off, EOS on/off) and replayed for the rest.
  4. EOS: the finished flags live on the device; the host reads them every CHECK_EVERY steps and
     stops once all are set (tokens after a sequence's EOS are the fill token, as in the eager loop).

The eager loop runs the same DecodeState code on the same padded shapes (on a GPU), so the graph
reproduces its tokens exactly: a replay runs the kernels an eager step launches, on the same
tensors' shapes. Without capture (capture=False, or on the CPU for the tests) the runner runs its
step op by op: the code a graph holds, checkable anywhere.

Invalidation: a graph holds raw pointers to the parameters and the static tensors. The runners of
a model are dropped when any parameter or buffer moved (data pointer, dtype, device: model.to(),
load_state_dict(assign=True)), when the kernel/reference backend mode or the autocast state
changed. In-place updates of the weights (an optimizer step, load_state_dict) are seen by the graphs;
model.train() needs nothing: generation always runs (and captures) in eval mode.
At most MAX_RUNNERS runners per model are kept (least recently used dropped);
release(model) frees them all (GPT.release_generation_graphs).
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import OrderedDict

import torch

from gptkernels import _backend
from gptkernels.gpt.decode import DecodeState, KVCache, Sampling, decode_loop

CHECK_EVERY = 16  # decode steps between host checks of the EOS flags
MAX_RUNNERS = 4  # (batch bucket, capacity) runners kept per model; each holds a KV cache
WARMUP_STEPS = 2  # eager steps on a side stream before a capture (lazy initialisations, GEMM heuristics)


class Runner:
    """The static tensors of one (batch, capacity) shape and the graphs captured over them."""

    def __init__(self, n_layer: int, batch: int, capacity: int, device):
        self.cache = KVCache(n_layer, batch, capacity)
        self.state = DecodeState(batch, capacity, device)
        self.graphs: dict[Sampling, torch.cuda.CUDAGraph | None] = {}  # None: capture failed, step eagerly
        self.failures: dict[Sampling, str] = {}

    def warm_up(self, model, s: Sampling) -> None:
        """Run WARMUP_STEPS steps (on a side stream on a GPU: lazy initialisations, GEMM heuristics,
        workspaces happen before a capture), then undo their changes to the state. Their KV writes
        (at pos, pos + 1, ...) are rewritten by the real steps before any step reads them."""
        st = self.state
        saved = [t.clone() for t in st.mutable()]
        if st.tok.is_cuda:
            current = torch.cuda.current_stream(st.tok.device)
            side = torch.cuda.Stream(st.tok.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    st.step(model, self.cache, s)
            current.wait_stream(side)
        else:
            for _ in range(WARMUP_STEPS):
                st.step(model, self.cache, s)
        for t, v in zip(st.mutable(), saved):
            t.copy_(v)

    def capture(self, model, s: Sampling) -> torch.cuda.CUDAGraph | None:
        """Warm up, then capture state.step for sampling mode s over the state the prefill left (a
        capture records the kernels without running them). A capture that fails (an op that syncs
        with the host, say) warns and returns None: the caller steps eagerly, with the same tokens."""
        dev = self.state.tok.device
        # Autocast's weight-cast cache must stay out of a graph (a cached cast would be freed when
        # the caller's autocast region ends while the graph still reads it).
        amp = (torch.autocast(dev.type, dtype=torch.get_autocast_dtype(dev.type), cache_enabled=False)
               if torch.is_autocast_enabled(dev.type) else contextlib.nullcontext())
        with amp:
            self.warm_up(model, s)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.state.step(model, self.cache, s)
            except RuntimeError as e:
                graph = None
                self.failures[s] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                warnings.warn(f"gptkernels generate: CUDA graph capture failed ({self.failures[s]}); "
                              "stepping without a graph", stacklevel=4)
        self.graphs[s] = graph
        return graph


class _ModelRunners:
    def __init__(self):
        self.key = None
        self.runners: OrderedDict[tuple, Runner] = OrderedDict()


_RUNNERS: "weakref.WeakKeyDictionary[torch.nn.Module, _ModelRunners]" = weakref.WeakKeyDictionary()


def _validity_key(model, device) -> tuple:
    """What the captured graphs depend on besides the runner's own tensors."""
    tensors = tuple((t.data_ptr(), t.dtype, t.device, tuple(t.shape))
                    for t in list(model.parameters()) + list(model.buffers()))
    autocast = torch.is_autocast_enabled(device.type)
    amp = (autocast, torch.get_autocast_dtype(device.type) if autocast else None)
    return tensors, _backend.get_backend(), amp


def get_runner(model, batch: int, capacity: int, device) -> Runner:
    """The model's runner for this shape (created on first use; all dropped when the model changed)."""
    entry = _RUNNERS.get(model)
    if entry is None:
        entry = _RUNNERS[model] = _ModelRunners()
    key = _validity_key(model, device)
    if entry.key != key:
        entry.runners.clear()
        entry.key = key
    shape = (batch, capacity, str(device))
    runner = entry.runners.get(shape)
    if runner is None:
        runner = entry.runners[shape] = Runner(model.config.n_layer, batch, capacity, device)
        while len(entry.runners) > MAX_RUNNERS:
            entry.runners.popitem(last=False)
    entry.runners.move_to_end(shape)
    return runner


def release(model) -> None:
    """Drop the model's runners: their KV caches and graphs are freed."""
    _RUNNERS.pop(model, None)


def cached_shapes(model) -> list[tuple]:
    """(batch, capacity, device) of the runners kept for the model, least recently used first."""
    entry = _RUNNERS.get(model)
    return [] if entry is None else list(entry.runners)


def decode_static(model, prompt: torch.Tensor, lens: torch.Tensor, real_rows: int, max_new_tokens: int,
                  capacity: int, s: Sampling, u, temperature: float, top_p, eos_token_id, fill: int,
                  capture: bool) -> torch.Tensor:
    """Generate with the model's runner for (prompt's batch, capacity): prefill eagerly, then replay
    the captured step (capture=True, CUDA) or run it op by op. Returns the runner's output ids
    (batch, capacity), a copy."""
    runner = get_runner(model, prompt.shape[0], capacity, prompt.device)
    st = runner.state
    st.reset(prompt, lens, real_rows, u, temperature, top_p, eos_token_id, fill)
    if not capture:
        st.prefill(model, runner.cache, prompt, s)
        decode_loop(st, max_new_tokens, s, lambda: st.step(model, runner.cache, s), CHECK_EVERY)
        return st.out.clone()
    with torch.cuda.device(prompt.device):  # capture and replay on the model's GPU
        st.prefill(model, runner.cache, prompt, s)
        graph = runner.graphs[s] if s in runner.graphs else runner.capture(model, s)
        run_step = graph.replay if graph is not None else (lambda: st.step(model, runner.cache, s))
        decode_loop(st, max_new_tokens, s, run_step, CHECK_EVERY)
        return st.out.clone()
