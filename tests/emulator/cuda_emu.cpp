// cuda_emu.cpp: the execution engine of the CUDA emulator (see cuda_emu.h for what it is and what
// it proves). Linked into every emulated kernel library.
//
// - A launch runs its blocks one after another (forward, reverse or seeded-shuffled block order).
// - The threads of a block are fibers on the calling OS thread (a small assembly context switch on
//   x86-64, ucontext elsewhere or with -DGPTK_EMU_UCONTEXT). The scheduler runs each ready thread
//   until it waits (block barrier, warp collective) or exits, either sweeping over the threads in
//   a configured order (forward / reverse / shuffled: warps advance together) or greedily (lowest
//   or highest ready thread first: one warp runs ahead to the next block barrier). No progress
//   while threads remain is a deadlock, reported as a kernel fault with the places they wait at.
// - A kernel fault (deadlock, bad mask, out-of-range shared address, launch-bounds violation, ...)
//   abandons the launch, records a message (gptk_emu_fault()) and makes the emulated context
//   sticky-failed (cudaErrorLaunchFailure) until gptk_emu_reset(), like a faulted CUDA context.
//   Memory errors on global or shared memory are AddressSanitizer's to report (they abort).
#include "cuda_emu_internal.h"

#include <sys/mman.h>

#if GPTK_EMU_ASM_SWITCH
// gptk_emu_switch(save, to): saves the callee-saved registers, MXCSR and the x87 control word on
// the current stack, stores the stack pointer in *save, and resumes the context whose stack
// pointer is `to` (no signal-mask system call, unlike swapcontext).
extern "C" void gptk_emu_switch(void** save, void* to);
asm(R"(
  .text
  .globl gptk_emu_switch
  .hidden gptk_emu_switch
  .type gptk_emu_switch, @function
gptk_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size gptk_emu_switch, .-gptk_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace gptk_emu {
namespace detail {

Config g_cfg;

std::vector<Thread> g_threads;
Launch* g_launch = nullptr;
Block* g_block = nullptr;
Thread* g_cur = nullptr;
#if GPTK_EMU_ASM_SWITCH
void* g_sched_sp = nullptr;
#else
ucontext_t g_sched_uc;
#endif
void* g_sched_fake = nullptr;
const void* g_main_bottom = nullptr;
size_t g_main_size = 0;
bool g_fault_now = false;  // the running launch has faulted
std::string g_fault;       // message of the first fault since the last reset
bool g_sticky = false;
cudaError_t g_last_error = cudaSuccess;
std::string g_log;
std::map<const void*, int> g_max_dyn_smem;
std::vector<void*> g_stacks_to_clean;

std::string vformat(const char* fmt, va_list ap) {
  char buf[2048];
  vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vformat(fmt, ap);
  va_end(ap);
  return s;
}

const char* base_name(const char* path) {
  const char* s = strrchr(path, '/');
  return s ? s + 1 : path;
}
bool same_site(const char* f1, int l1, const char* f2, int l2) {
  return l1 == l2 && (f1 == f2 || (f1 && f2 && strcmp(f1, f2) == 0));
}

// ---- fiber switching ------------------------------------------------------------------------------------
void switch_to(Thread* t) {
  g_cur = t;
  threadIdx = t->tid;
#if GPTK_EMU_ASAN
  __sanitizer_start_switch_fiber(&g_sched_fake, t->stack, g_cfg.stack_bytes);
#endif
#if GPTK_EMU_ASM_SWITCH
  gptk_emu_switch(&g_sched_sp, t->sp);
#else
  swapcontext(&g_sched_uc, &t->uc);
#endif
#if GPTK_EMU_ASAN
  __sanitizer_finish_switch_fiber(g_sched_fake, nullptr, nullptr);
#endif
  g_cur = nullptr;
}

// From a fiber: back to the scheduler; returns when the scheduler resumes this thread.
void yield_fiber() {
  Thread* t = g_cur;
#if GPTK_EMU_ASAN
  __sanitizer_start_switch_fiber(t->st == St::Exited ? nullptr : &t->fake_stack, g_main_bottom, g_main_size);
#endif
#if GPTK_EMU_ASM_SWITCH
  gptk_emu_switch(&t->sp, g_sched_sp);
#else
  swapcontext(&t->uc, &g_sched_uc);
#endif
#if GPTK_EMU_ASAN
  __sanitizer_finish_switch_fiber(t->fake_stack, &g_main_bottom, &g_main_size);
#endif
}

Thread* require_fiber(const char* what) {
  if (g_cur == nullptr || g_block == nullptr) {
    fprintf(stderr, "gptk_emu: %s called outside an emulated kernel\n", what);
    abort();
  }
  return g_cur;
}

std::string thread_desc(const Thread* t) {
  return format("block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z, t->tid.x, t->tid.y,
                t->tid.z);
}

std::string alloc_where(uint32_t addr) {
  if (g_block != nullptr)
    for (const SharedAlloc& a : g_block->allocs)
      if (addr >= a.base && addr < a.base + a.size) return format("%s+0x%x", a.name, addr - a.base);
  return format("0x%x (no shared allocation)", addr);
}

void release_held(Thread* t) {
  if (t->held != nullptr) {
    if (--t->held->refs == 0) delete t->held;
    t->held = nullptr;
  }
}

void run_cp_group(std::vector<CpOp>& ops) {
  for (CpOp& op : ops) {
    if (op.src_size > 0) std::memcpy(op.dst, op.src, (size_t)op.src_size);
    if (op.src_size < op.cp_size) std::memset(static_cast<char*>(op.dst) + op.src_size, 0, op.cp_size - op.src_size);
  }
  ops.clear();
}

void release_block_barrier_if_complete() {
  Block& B = *g_block;
  if (B.arrived == 0 || B.arrived < B.live) return;
  B.count_result = B.count_acc;
  B.count_acc = 0;
  B.arrived = 0;
  B.bfile = nullptr;
  for (unsigned i = 0; i < B.nthreads; ++i)
    if (g_threads[i].st == St::WaitBlock) g_threads[i].st = St::Ready;
}

void thread_exit(Thread* t);

// Not instrumented: its frame never unwinds (the fiber ends by switching away), so ASan must not
// leave redzones of it on the reused stack.
__attribute__((no_sanitize_address)) void fiber_main() {
#if GPTK_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_main_bottom, &g_main_size);
#endif
  g_launch->body(g_launch->closure);
  Thread* t = g_cur;
  thread_exit(t);
  t->st = St::Exited;
  yield_fiber();
  abort();  // an exited fiber is never resumed
}

void thread_exit(Thread* t) {
  for (auto& g : t->cp_groups) run_cp_group(g);  // outstanding async copies complete
  t->cp_groups.clear();
  run_cp_group(t->cp_open);
  release_held(t);
  Block& B = *g_block;
  Warp& w = B.warps[t->warp];
  const unsigned bit = 1u << t->lane;
  for (Collective* c : w.gathering) {
    if ((c->mask & bit) && !(c->arrived & bit)) {
      fault("%s exits while lanes %08x wait for it at a warp collective (%s:%d, mask %08x)", thread_desc(t).c_str(),
            c->arrived, base_name(c->file), c->line, c->mask);
    }
  }
  w.exited |= bit;
  --B.live;
  release_block_barrier_if_complete();
  if (t->sm90 != nullptr || B.sm90 != nullptr) sm90_thread_exit(t);
}

// ---- blocks and launches ------------------------------------------------------------------------------
char* alloc_shared(size_t size) {
  void* p = nullptr;
  if (posix_memalign(&p, 1024, size) != 0 || (p == nullptr && size != 0)) {
    fprintf(stderr, "gptk_emu: out of host memory for shared memory\n");
    abort();
  }
  if (size) std::memset(p, g_cfg.poison, size);
  return static_cast<char*>(p);
}

uint32_t reserve_window(Block& B, size_t size) {
  const uint32_t base = (B.next_base + 1023u) & ~1023u;
  B.next_base = base + (uint32_t)size + 1024u;  // a gap: an address past the end matches nothing
  return base;
}

void ensure_pool(unsigned n) {
  if (g_threads.size() >= n) return;
  const size_t old = g_threads.size();
  g_threads.resize(n);
  for (size_t i = old; i < n; ++i) {
    void* s = mmap(nullptr, g_cfg.stack_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (s == MAP_FAILED) {
      fprintf(stderr, "gptk_emu: cannot map fiber stacks\n");
      abort();
    }
    mprotect(s, 4096, PROT_NONE);  // guard page: a fiber's stack overflow faults instead of corrupting the next
    g_threads[i].stack = static_cast<char*>(s);
  }
}

std::vector<unsigned> make_order(unsigned n, int order, std::mt19937& rng) {
  std::vector<unsigned> v(n);
  for (unsigned i = 0; i < n; ++i) v[i] = order == 1 ? n - 1 - i : i;
  if (order == 2) std::shuffle(v.begin(), v.end(), rng);
  return v;
}

std::string describe_deadlock(Block& B) {
  std::map<std::string, int> where;
  for (unsigned i = 0; i < B.nthreads; ++i) {
    const Thread& t = g_threads[i];
    if (t.st == St::WaitBlock) {
      where[format("__syncthreads at %s:%d", base_name(t.wfile), t.wline)]++;
    } else if (t.st == St::WaitWarp) {
      const Collective* c = t.waiting;
      where[format("warp %u collective at %s:%d (mask %08x, arrived %08x)", t.warp, base_name(c->file), c->line,
                   c->mask, c->arrived)]++;
    } else if (t.st == St::WaitGroup || t.st == St::Spin) {
      where[sm90_wait_desc(t)]++;
    }
  }
  std::string s = format("deadlock in block (%u,%u,%u): %u threads left, ", blockIdx.x, blockIdx.y, blockIdx.z, B.live);
  bool first = true;
  for (auto& [k, n] : where) {
    s += format("%s%d waiting at %s", first ? "" : "; ", n, k.c_str());
    first = false;
  }
  return s;
}

#if !GPTK_EMU_ASM_SWITCH
ucontext_t g_template_uc;
bool g_have_template = false;
#endif

// A fresh context for `t` that starts in fiber_main on its own stack.
void init_context(Thread& t) {
#if GPTK_EMU_ASM_SWITCH
  // The frame gptk_emu_switch pops: control words, r15..rbp, the return address (fiber_main), and
  // above it a null "return address" of fiber_main (which never returns), so that fiber_main is
  // entered with the stack alignment of a call (rsp = 8 mod 16).
  uintptr_t* sp = reinterpret_cast<uintptr_t*>(t.stack + g_cfg.stack_bytes);
  *--sp = 0;
  *--sp = reinterpret_cast<uintptr_t>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = 0;
  *--sp = (uintptr_t)0x037f << 32 | 0x1f80;  // default x87 control word | MXCSR
  t.sp = sp;
#else
  std::memcpy(&t.uc, &g_template_uc, sizeof t.uc);  // getcontext once, not per thread (a syscall)
  t.uc.uc_mcontext.fpregs = &t.uc.__fpregs_mem;
  t.uc.uc_stack.ss_sp = t.stack;
  t.uc.uc_stack.ss_size = g_cfg.stack_bytes;
  t.uc.uc_link = nullptr;
  makecontext(&t.uc, fiber_main, 0);
  // ASan's swapcontext interceptor clears the shadow of the target's uc_stack on every switch
  // (32 KiB per switch for a 256 KiB stack); makecontext has used it already, so hide it. Stacks
  // stay consistent without it: every frame on them unwinds normally (faulted launches excepted,
  // whose stacks are unpoisoned explicitly).
  t.uc.uc_stack.ss_size = 0;
#endif
}

void run_block(Launch& L, uint3 bid, std::mt19937& rng) {
  const dim3 bd = L.cfg.block;
  const unsigned n = bd.x * bd.y * bd.z;
  Block B;
  B.nthreads = B.live = n;
  B.warps.resize((n + 31) / 32);
  for (unsigned w = 0; w < B.warps.size(); ++w) {
    const unsigned lanes = n - w * 32 >= 32 ? 32 : n - w * 32;
    B.warps[w].exists = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  }
  B.dyn = alloc_shared(L.cfg.smem);
  B.allocs.push_back(SharedAlloc{nullptr, B.dyn, L.cfg.smem, reserve_window(B, L.cfg.smem), "extern __shared__"});
  g_block = &B;
  blockIdx = bid;
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = g_threads[i];
    t.st = St::Ready;
    t.tid = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
    t.lin = i, t.warp = i / 32, t.lane = i % 32;
    t.held = t.waiting = nullptr;
    t.cp_open.clear(), t.cp_groups.clear();
    t.fake_stack = nullptr;
    init_context(t);
  }
  const int to = g_cfg.thread_order;
  const std::vector<unsigned> order = make_order(n, to == 3 ? 0 : to == 4 ? 1 : to, rng);
  const bool greedy = to >= 3;
  while (!g_fault_now && B.live > 0) {
    bool ran = false;
    for (unsigned i : order) {
      Thread& t = g_threads[i];
      if (t.st != St::Ready && !(t.st == St::Spin && sm90_runnable(t))) continue;
      ran = true;
      switch_to(&t);
      if (g_fault_now || greedy) break;  // greedy: rescan from the first thread after every switch
    }
    if (!g_fault_now && !ran && B.live > 0) {
      g_fault_now = true;
      if (g_fault.empty()) g_fault = L.name + ": " + describe_deadlock(B);
    }
  }
  // Tear down (also after a fault: abandoned fibers are never resumed).
  std::set<Collective*> left;
  for (unsigned i = 0; i < n; ++i) {
    if (g_threads[i].held) left.insert(g_threads[i].held);
    g_threads[i].held = g_threads[i].waiting = nullptr;
  }
  for (Warp& w : B.warps)
    for (Collective* c : w.gathering) left.insert(c);
  for (Collective* c : left) delete c;
#if GPTK_EMU_ASAN
  if (g_fault_now)
    for (unsigned i = 0; i < n; ++i) __asan_unpoison_memory_region(g_threads[i].stack, g_cfg.stack_bytes);
#endif
  if (B.sm90 != nullptr) sm90_block_end(B);
  for (SharedAlloc& a : B.allocs) free(a.host);
  g_block = nullptr;
}

cudaError_t set_error(cudaError_t e) {
  if (e != cudaSuccess && g_last_error == cudaSuccess) g_last_error = e;
  return e;
}

}  // namespace detail

using namespace detail;

// ---- hooks called by the translated kernels -------------------------------------------------------------
void fault(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string msg = vformat(fmt, ap);
  va_end(ap);
  if (g_cur == nullptr || g_launch == nullptr) {
    fprintf(stderr, "gptk_emu: fault outside a kernel: %s\n", msg.c_str());
    abort();
  }
  if (g_fault.empty()) g_fault = g_launch->name + ": " + msg;
  g_fault_now = true;
  g_cur->st = St::Faulted;
  yield_fiber();
  abort();  // a faulted fiber is never resumed
}

void kernel_entry(const char* name, long long max_threads, long long min_blocks) {
  (void)min_blocks;
  Launch& L = *g_launch;
  if (!L.entered) {
    L.entered = true;
    L.name = name;
  }
  const long long n = (long long)blockDim.x * blockDim.y * blockDim.z;
  if (max_threads > 0 && n > max_threads)
    fault("launched with %lld threads per block, above its __launch_bounds__ of %lld (too many resources requested "
          "for launch)",
          n, max_threads);
}

void syncthreads(const char* file, int line) {
  Thread* t = require_fiber("__syncthreads");
  Block& B = *g_block;
  if (B.arrived > 0 && !same_site(B.bfile, B.bline, file, line))
    fault("divergent __syncthreads: %s is at %s:%d while other threads wait at %s:%d", thread_desc(t).c_str(),
          base_name(file), line, base_name(B.bfile), B.bline);
  if (B.arrived == 0) B.bfile = file, B.bline = line;
  ++B.arrived;
  t->st = St::WaitBlock;
  t->wfile = file, t->wline = line;
  release_block_barrier_if_complete();
  if (t->st == St::WaitBlock) yield_fiber();
}

int syncthreads_count(int pred, const char* file, int line) {
  require_fiber("__syncthreads_count");
  g_block->count_acc += pred;
  syncthreads(file, line);
  return g_block->count_result;
}

void* shared_var(const void* tag, size_t size, size_t align, const char* name) {
  require_fiber("__shared__");
  Block& B = *g_block;
  for (SharedAlloc& a : B.allocs)
    if (a.tag == tag) return a.host;
  if (align > 1024) fault("__shared__ %s: alignment %zu above 1024 is not emulated", name, align);
  B.static_bytes += size;
  if (B.static_bytes > kStaticSmemLimit)
    fault("static shared memory of %zu bytes (with __shared__ %s) exceeds the 48 KiB limit", B.static_bytes, name);
  if (B.static_bytes + g_launch->cfg.smem > smem_optin_max(g_cfg.cc))
    fault("static (%zu) + dynamic (%zu) shared memory exceed the %zu bytes a block may have", B.static_bytes,
          g_launch->cfg.smem, smem_optin_max(g_cfg.cc));
  char* p = alloc_shared(size);
  B.allocs.push_back(SharedAlloc{tag, p, size, reserve_window(B, size), name});
  return p;
}

void* dynamic_shared(size_t align) {
  require_fiber("extern __shared__");
  if (align > 1024) fault("extern __shared__ alignment %zu above 1024 is not emulated", align);
  return g_block->dyn;
}

const unsigned char* warp_collective(unsigned mask, int op, const void* data, size_t n, const char* file, int line) {
  Thread* t = require_fiber("a warp collective");
  Warp& w = g_block->warps[t->warp];
  release_held(t);
  const unsigned bit = 1u << t->lane;
  if (!(mask & bit))
    fault("%s:%d: warp collective called by lane %u with mask %08x, which does not include it", base_name(file), line,
          t->lane, mask);
  if (mask & ~w.exists)
    fault("%s:%d: warp collective mask %08x names lanes %08x that do not exist (warp %u has %d threads)",
          base_name(file), line, mask, mask & ~w.exists, t->warp, std::popcount(w.exists));
  if (mask & w.exited)
    fault("%s:%d: warp collective mask %08x names lanes %08x that have exited", base_name(file), line, mask,
          mask & w.exited);
  if (n > (size_t)kSlot) fault("%s:%d: warp collective payload of %zu bytes", base_name(file), line, n);
  Collective* c = nullptr;
  // Collectives of different masks may gather at the same time (half-warps shuffling separately,
  // then a full-warp __syncwarp that the early half reaches first); mismatched masks that can never
  // complete end in the deadlock report.
  for (Collective* g : w.gathering) {
    if (g->mask == mask) {
      c = g;
      break;
    }
  }
  if (c == nullptr) {
    c = new Collective;
    c->mask = mask, c->op = op, c->file = file, c->line = line;
    std::memset(c->slots, 0xab, sizeof c->slots);
    w.gathering.push_back(c);
  } else if (c->op != op || (op != kSyncwarp && !same_site(c->file, c->line, file, line))) {
    fault("lanes of warp %u meet at different warp collectives: lane %u at %s:%d, lanes %08x at %s:%d",
          t->warp, t->lane, base_name(file), line, c->arrived, base_name(c->file), c->line);
  }
  if (n) std::memcpy(c->slots[t->lane], data, n);
  c->arrived |= bit;
  c->refs++;
  t->held = c;
  if (c->arrived == mask) {
    for (size_t i = 0; i < w.gathering.size(); ++i)
      if (w.gathering[i] == c) {
        w.gathering.erase(w.gathering.begin() + (long)i);
        break;
      }
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u) || l == (int)t->lane) continue;
      Thread& o = g_threads[t->warp * 32 + l];
      o.st = St::Ready;
      o.waiting = nullptr;
    }
  } else {
    t->st = St::WaitWarp;
    t->waiting = c;
    yield_fiber();
  }
  return &c->slots[0][0];
}

unsigned lane_id() { return require_fiber("lane_id")->lane; }

unsigned live_lanes() {
  Thread* t = require_fiber("__activemask");
  const Warp& w = g_block->warps[t->warp];
  return w.exists & ~w.exited;
}

void bad_shfl_source(const char* what, unsigned lane, unsigned src, unsigned mask, const char* file, int line) {
  fault("%s:%d: %s: lane %u reads lane %u, which is not in the mask %08x (undefined on the GPU)", base_name(file),
        line, what, lane, src, mask);
}

uint32_t cvta_to_shared(const void* p, const char* file, int line) {
  require_fiber("__cvta_generic_to_shared");
  const char* c = static_cast<const char*>(p);
  for (const SharedAlloc& a : g_block->allocs)
    if (c >= a.host && c <= a.host + a.size) return a.base + (uint32_t)(c - a.host);
  fault("%s:%d: __cvta_generic_to_shared of %p, which is not shared memory", base_name(file), line, p);
}

void* shared_ptr(uint32_t addr, size_t bytes, size_t align, const char* what, const char* file, int line) {
  require_fiber(what);
  if (align > 1 && addr % align != 0)
    fault("%s:%d: %s: shared address 0x%x is not %zu-byte aligned (misaligned address)", base_name(file), line, what,
          addr, align);
  for (const SharedAlloc& a : g_block->allocs)
    if (addr >= a.base && (uint64_t)addr + bytes <= (uint64_t)a.base + a.size) return a.host + (addr - a.base);
  std::string allocs;
  for (const SharedAlloc& a : g_block->allocs) allocs += format(" [%s: 0x%x+%zu]", a.name, a.base, a.size);
  fault("%s:%d: %s: shared address 0x%x (+%zu bytes) is outside every shared allocation:%s", base_name(file), line,
        what, addr, bytes, allocs.c_str());
}

void cp_async(uint32_t dst, const void* src, int cp_size, int src_size, const char* file, int line) {
  Thread* t = require_fiber("cp.async");
  if (cp_size != 4 && cp_size != 8 && cp_size != 16)
    fault("%s:%d: cp.async of %d bytes (4, 8 or 16)", base_name(file), line, cp_size);
  if (src_size < 0 || src_size > cp_size)
    fault("%s:%d: cp.async src-size %d outside [0, %d]", base_name(file), line, src_size, cp_size);
  void* d = shared_ptr(dst, (size_t)cp_size, (size_t)cp_size, "cp.async destination", file, line);
  if (reinterpret_cast<uintptr_t>(src) % (uintptr_t)cp_size != 0)
    fault("%s:%d: cp.async source %p is not %d-byte aligned (misaligned address)", base_name(file), line, src,
          cp_size);
  t->cp_open.push_back(CpOp{d, src, cp_size, src_size});
}

void cp_async_commit() {
  Thread* t = require_fiber("cp.async.commit_group");
  t->cp_groups.push_back(std::move(t->cp_open));
  t->cp_open.clear();
}

void cp_async_wait(int n) {
  Thread* t = require_fiber("cp.async.wait_group");
  if (n < 0) {  // wait_all: the uncommitted copies too
    for (auto& g : t->cp_groups) run_cp_group(g);
    t->cp_groups.clear();
    run_cp_group(t->cp_open);
    return;
  }
  while (t->cp_groups.size() > (size_t)n) {
    run_cp_group(t->cp_groups.front());
    t->cp_groups.erase(t->cp_groups.begin());
  }
}

namespace ptx {
void unsupported(const char* text, const char* file, int line) {
  fault("%s:%d: inline PTX that the emulator does not implement: %s", base_name(file), line, text);
}

void ldmatrix(int num, bool trans, uint32_t addr, uint32_t* regs, const char* file, int line) {
  Thread* t = require_fiber("ldmatrix");
  struct {
    uint32_t addr;
    int num, trans;
  } mine{addr, num, trans ? 1 : 0};
  const unsigned char* s = warp_collective(0xffffffffu, kLdmatrix, &mine, sizeof mine, file, line);
  const unsigned l = t->lane;
  for (int i = 0; i < num; ++i) {
    uint32_t v = 0;
    for (int h = 0; h < 2; ++h) {
      // non-trans: row l/4, elements 2(l%4)+h; trans: row 2(l%4)+h, element l/4.
      const int row = trans ? 2 * (int)(l % 4) + h : (int)(l / 4);
      const int col = trans ? (int)(l / 4) : 2 * (int)(l % 4) + h;
      decltype(mine) src;
      std::memcpy(&src, s + (8 * i + row) * kSlot, sizeof src);
      if (src.num != num || src.trans != mine.trans)
        fault("%s:%d: lanes of one ldmatrix disagree on its shape", base_name(file), line);
      const char* p = static_cast<const char*>(shared_ptr(src.addr, 16, 16, "ldmatrix row", file, line));
      sm90_check_generic_read(src.addr, 16, "ldmatrix", file, line);
      uint16_t e;
      std::memcpy(&e, p + 2 * col, 2);
      v |= (uint32_t)e << (16 * h);
    }
    regs[i] = v;
  }
}

void mma_m16n8k16(bool bf16, float* d, const uint32_t* a, const uint32_t* b, const float* c, const char* file,
                  int line) {
  Thread* t = require_fiber("mma.sync");
  struct {
    uint32_t a[4], b[2];
    int bf16;
  } mine;
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  mine.bf16 = bf16 ? 1 : 0;
  const unsigned char* s = warp_collective(0xffffffffu, kMma, &mine, sizeof mine, file, line);
  for (int l = 0; l < 32; ++l) {
    int f;
    std::memcpy(&f, s + l * kSlot + offsetof(decltype(mine), bf16), sizeof f);
    if (f != mine.bf16) fault("%s:%d: lanes of one mma.sync disagree on its type", base_name(file), line);
  }
  auto reg = [&](int lane, size_t off, int i) {
    uint32_t v;
    std::memcpy(&v, s + lane * kSlot + off + 4 * i, 4);
    return v;
  };
  auto elem = [&](uint32_t r, int half) {
    const uint16_t h = (uint16_t)(r >> (16 * half));
    return (double)(bf16 ? bf16_bits_to_float(h) : half_bits_to_float(h));
  };
  // Fragments (PTX ISA, mma.m16n8k16, 16-bit A/B, fp32 C/D), g = lane / 4, q = lane % 4:
  //   A[r][k]: lane (r % 8) * 4 + (k % 8) / 2, register (r / 8) + 2 * (k / 8), half k % 2
  //   B[k][n]: lane n * 4 + (k % 8) / 2, register k / 8, half k % 2
  //   C/D: d0, d1 = [g][2q, 2q+1], d2, d3 = [g+8][2q, 2q+1]
  const size_t oa = offsetof(decltype(mine), a), ob = offsetof(decltype(mine), b);
  const int g = (int)t->lane / 4, q = (int)t->lane % 4;
  double arow[2][16], bcol[2][16];
  for (int i = 0; i < 2; ++i) {
    const int r = g + 8 * i, n = 2 * q + i;
    for (int k = 0; k < 16; ++k) {
      arow[i][k] = elem(reg((r % 8) * 4 + (k % 8) / 2, oa, (r / 8) + 2 * (k / 8)), k % 2);
      bcol[i][k] = elem(reg(n * 4 + (k % 8) / 2, ob, k / 8), k % 2);
    }
  }
  // The products of 16-bit values are exact in double, and so is their sum to within 2^-50
  // relative: D is the exact result rounded once to fp32 (the hardware's order and internal
  // precision are not modelled).
  for (int i = 0; i < 4; ++i) {
    double acc = c[i];
    for (int k = 0; k < 16; ++k) acc += arow[i / 2][k] * bcol[i % 2][k];
    d[i] = (float)acc;
  }
}
}  // namespace ptx

cudaError_t set_func_attribute(const void* fn, int attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || (size_t)value > smem_optin_max(g_cfg.cc)) return set_error(cudaErrorInvalidValue);
    g_max_dyn_smem[fn] = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) {
    return value >= -1 && value <= 100 ? cudaSuccess : set_error(cudaErrorInvalidValue);
  }
  return set_error(cudaErrorInvalidValue);
}

cudaError_t occupancy(int* n, const void* fn, int block, size_t smem) {
  (void)fn;
  if (n == nullptr || block <= 0 || block > kMaxThreadsPerBlock) return set_error(cudaErrorInvalidValue);
  const int warps = (block + 31) / 32;
  int by_threads = kMaxThreadsPerSm / (warps * 32);
  int by_smem = (int)(smem_per_sm(g_cfg.cc) / (smem + kSmemReservedPerBlock));
  int r = std::min({by_threads, by_smem, kMaxBlocksPerSm});
  if (g_cfg.max_blocks_per_sm > 0) r = std::min(r, g_cfg.max_blocks_per_sm);
  *n = r;
  return cudaSuccess;
}

cudaError_t run_launch(const void* fn, const LaunchCfg& cfg, void (*body)(void*), void* closure) {
  if (g_sticky) return set_error(cudaErrorLaunchFailure);
  const dim3 g = cfg.grid, b = cfg.block;
  const unsigned long long nthreads = (unsigned long long)b.x * b.y * b.z;
  if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 || nthreads > kMaxThreadsPerBlock ||
      g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    g_log += format("rejected launch grid (%u,%u,%u) block (%u,%u,%u): invalid configuration\n", g.x, g.y, g.z, b.x,
                    b.y, b.z);
    return set_error(cudaErrorInvalidConfiguration);
  }
  if (cfg.smem > kStaticSmemLimit) {
    auto it = g_max_dyn_smem.find(fn);
    const size_t allowed = it == g_max_dyn_smem.end() ? kStaticSmemLimit : (size_t)it->second;
    if (cfg.smem > allowed) {
      g_log += format("rejected launch with %zu bytes of dynamic shared memory (allowed %zu)\n", cfg.smem, allowed);
      return set_error(cudaErrorInvalidValue);
    }
  }
  if (cfg.smem > smem_optin_max(g_cfg.cc)) return set_error(cudaErrorInvalidValue);
  ensure_pool((unsigned)nthreads);
  Launch L;
  L.fn = fn, L.cfg = cfg, L.body = body, L.closure = closure;
  L.name = "kernel";
  g_launch = &L;
  gridDim = g;
  blockDim = b;
  g_fault_now = false;
  std::mt19937 rng(g_cfg.seed);
  const unsigned long long nblocks = (unsigned long long)g.x * g.y * g.z;
  std::vector<unsigned long long> shuffled;
  if (g_cfg.block_order == 2 && nblocks <= (1u << 20)) {
    shuffled.resize(nblocks);
    for (unsigned long long i = 0; i < nblocks; ++i) shuffled[i] = i;
    std::shuffle(shuffled.begin(), shuffled.end(), rng);
  }
  for (unsigned long long k = 0; k < nblocks && !g_fault_now; ++k) {
    unsigned long long i = k;
    if (!shuffled.empty()) i = shuffled[k];
    else if (g_cfg.block_order == 1) i = nblocks - 1 - k;
    const uint3 bid{(unsigned)(i % g.x), (unsigned)((i / g.x) % g.y), (unsigned)(i / ((unsigned long long)g.x * g.y))};
    run_block(L, bid, rng);
  }
  g_log += format("%s grid (%u,%u,%u) block (%u,%u,%u) smem %zu%s\n", L.name.c_str(), g.x, g.y, g.z, b.x, b.y, b.z,
                  cfg.smem, g_fault_now ? " FAULT" : "");
  g_launch = nullptr;
  if (g_fault_now) {
    g_sticky = true;
    return set_error(cudaErrorLaunchFailure);
  }
  return cudaSuccess;
}

}  // namespace gptk_emu

// ---- runtime API ----------------------------------------------------------------------------------------
using namespace gptk_emu;
using namespace gptk_emu::detail;

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNoKernelImageForDevice: return "cudaErrorNoKernelImageForDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulated kernel fault; see gptk_emu_fault())";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    default: return cudaGetErrorName(e);
  }
}
cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last_error;
  g_last_error = g_sticky ? cudaErrorLaunchFailure : cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return g_last_error; }
cudaError_t cudaGetDevice(int* dev) {
  if (dev) *dev = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int dev) { return dev == 0 ? cudaSuccess : set_error(cudaErrorInvalidDevice); }
cudaError_t cudaGetDeviceCount(int* n) {
  if (n) *n = 1;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (value == nullptr || dev != 0) return set_error(cudaErrorInvalidValue);
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = kMaxThreadsPerBlock; break;
    case cudaDevAttrMaxBlockDimX: *value = 1024; break;
    case cudaDevAttrMaxGridDimX: *value = 0x7fffffff; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = (int)kStaticSmemLimit; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = 65536; break;
    case cudaDevAttrMultiProcessorCount: *value = g_cfg.num_sms; break;
    case cudaDevAttrL2CacheSize: *value = 50 * 1024 * 1024; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = kMaxThreadsPerSm; break;
    case cudaDevAttrComputeCapabilityMajor: *value = g_cfg.cc / 10; break;
    case cudaDevAttrComputeCapabilityMinor: *value = g_cfg.cc % 10; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = (int)smem_per_sm(g_cfg.cc); break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *value = 65536; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = (int)smem_optin_max(g_cfg.cc); break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = kMaxBlocksPerSm; break;
    default: return set_error(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int dev) {
  if (p == nullptr || dev != 0) return set_error(cudaErrorInvalidValue);
  std::memset(p, 0, sizeof *p);
  snprintf(p->name, sizeof p->name, "gptk_emu (CPU emulation, %d SMs)", g_cfg.num_sms);
  p->major = g_cfg.cc / 10, p->minor = g_cfg.cc % 10;
  p->multiProcessorCount = g_cfg.num_sms;
  p->sharedMemPerBlock = kStaticSmemLimit, p->sharedMemPerBlockOptin = smem_optin_max(g_cfg.cc);
  p->sharedMemPerMultiprocessor = smem_per_sm(g_cfg.cc);
  p->maxThreadsPerBlock = kMaxThreadsPerBlock, p->maxThreadsPerMultiProcessor = kMaxThreadsPerSm;
  p->maxBlocksPerMultiProcessor = kMaxBlocksPerSm;
  p->warpSize = 32;
  p->l2CacheSize = 50 * 1024 * 1024;
  p->totalGlobalMem = (size_t)141 << 30;
  return cudaSuccess;
}
cudaError_t cudaMalloc(void** p, size_t bytes) {
  if (p == nullptr) return set_error(cudaErrorInvalidValue);
  *p = nullptr;
  if (posix_memalign(p, 256, bytes ? bytes : 1) != 0) return set_error(cudaErrorMemoryAllocation);
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  free(p);
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  if (g_sticky) return set_error(cudaErrorLaunchFailure);
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) { return cudaMemset(p, value, bytes); }
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (g_sticky) return set_error(cudaErrorLaunchFailure);
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind, cudaStream_t) {
  if (g_sticky) return set_error(cudaErrorLaunchFailure);
  if (width > dpitch || width > spitch) return set_error(cudaErrorInvalidValue);
  for (size_t r = 0; r < height; ++r)
    std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return g_sticky ? cudaErrorLaunchFailure : cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return g_sticky ? cudaErrorLaunchFailure : cudaSuccess; }

// ---- control interface for the test harness (ctypes) ------------------------------------------------------
extern "C" {
__attribute__((visibility("default"))) int gptk_emu_configure(int num_sms, int max_blocks_per_sm, int thread_order,
                                                              int block_order, unsigned seed, int poison_byte) {
  if (num_sms < 1 || thread_order < 0 || thread_order > 4 || block_order < 0 || block_order > 2 || poison_byte < 0 ||
      poison_byte > 255)
    return 1;
  g_cfg.num_sms = num_sms;
  g_cfg.max_blocks_per_sm = max_blocks_per_sm;
  g_cfg.thread_order = thread_order;
  g_cfg.block_order = block_order;
  g_cfg.seed = seed;
  g_cfg.poison = poison_byte;
  return 0;
}
// The sm_90 asynchrony schedule: wgmma math and TMA copies happen at the latest point the program
// may observe them (wgmma.wait_group / a waiter on the mbarrier: the default, 0) or at issue (1).
__attribute__((visibility("default"))) int gptk_emu_configure_async(int wgmma_at_issue, int tma_at_issue) {
  if (wgmma_at_issue < 0 || wgmma_at_issue > 1 || tma_at_issue < 0 || tma_at_issue > 1) return 1;
  g_cfg.wgmma_at_issue = wgmma_at_issue;
  g_cfg.tma_at_issue = tma_at_issue;
  return 0;
}
// The emulated device's compute capability: 90 (the default) or 80 (sm_90 instructions then fault).
__attribute__((visibility("default"))) int gptk_emu_configure_device(int cc) {
  if (cc != 80 && cc != 90) return 1;
  g_cfg.cc = cc;
  return 0;
}
__attribute__((visibility("default"))) const char* gptk_emu_fault() { return g_fault.c_str(); }
__attribute__((visibility("default"))) const char* gptk_emu_log() { return g_log.c_str(); }
__attribute__((visibility("default"))) void gptk_emu_reset() {
  g_fault.clear();
  g_log.clear();
  g_sticky = false;
  g_last_error = cudaSuccess;
}
__attribute__((visibility("default"))) int gptk_emu_asan() { return GPTK_EMU_ASAN; }
__attribute__((visibility("default"))) int gptk_emu_num_sms() { return g_cfg.num_sms; }
}
