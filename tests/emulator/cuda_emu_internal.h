// cuda_emu_internal.h: the emulator runtime's internal state, shared by cuda_emu.cpp (fibers,
// scheduler, barriers, warp collectives, the runtime API) and cuda_emu_sm90.cpp (the sm_90
// instructions: wgmma, mbarrier, TMA, named barriers, setmaxnreg, elect). Not for kernels.
#pragma once

#include "cuda_emu.h"

#include <ucontext.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#if defined(__x86_64__) && !defined(GPTK_EMU_UCONTEXT)
#define GPTK_EMU_ASM_SWITCH 1
#else
#define GPTK_EMU_ASM_SWITCH 0
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define GPTK_EMU_ASAN 1
#else
#define GPTK_EMU_ASAN 0
#endif

namespace gptk_emu {
namespace detail {

// ---- device model and configuration ---------------------------------------------------------------
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kMaxThreadsPerSm = 2048;
constexpr int kMaxBlocksPerSm = 32;
constexpr size_t kStaticSmemLimit = 48 * 1024;
// Shared memory per block (opt-in) and per SM: sm_90 227 / 228 KiB, sm_80 163 / 164 KiB.
inline size_t smem_optin_max(int cc) { return cc >= 90 ? 232448 : 166912; }
inline size_t smem_per_sm(int cc) { return cc >= 90 ? 233472 : 167936; }
constexpr size_t kSmemReservedPerBlock = 1024;

struct Config {
  int num_sms = 4;
  int max_blocks_per_sm = 0;  // 0: from threads and shared memory only
  // Order in which the threads of a block run between waits. 0-2: sweeps over the threads (forward,
  // reverse, shuffled), each running every ready thread once: warps advance together. 3-4: greedy
  // (lowest / highest ready thread first): the first warp runs ahead as far as it can, up to a
  // block barrier, so a missing __syncthreads between warps (a warp reading shared data another
  // warp has not yet written, or overwriting data another warp still reads) shows.
  int thread_order = 0;
  int block_order = 0;        // 0 forward, 1 reverse, 2 shuffled
  unsigned seed = 0;
  int poison = 0xff;          // fill byte of shared memory (0xff: NaN floats, -1 integers)
  size_t stack_bytes = 256 * 1024;
  // sm_90 asynchrony: 0 = at the latest point the program may observe it (the default: exposes
  // missing waits), 1 = at issue.
  int wgmma_at_issue = 0;     // wgmma math at wgmma.mma_async (1) or at wgmma.wait_group (0)
  int tma_at_issue = 0;       // TMA loads at issue (1) or when a waiter polls their mbarrier (0)
  int cc = 90;                // the emulated device's compute capability (90: H100/H200; 80: A100)
};
extern Config g_cfg;

// ---- state ------------------------------------------------------------------------------------------
struct Collective {
  unsigned mask = 0, arrived = 0;
  int op = 0;
  const char* file = nullptr;
  int line = 0;
  int refs = 0;
  unsigned char slots[32][kSlot];
};

// WaitGroup: at a warpgroup collective or a named barrier; Spin: after a failed mbarrier try_wait
// (runnable again once that mbarrier changes state).
enum class St { Ready, WaitBlock, WaitWarp, WaitGroup, Spin, Exited, Faulted };

struct ThreadSm90;  // cuda_emu_sm90.cpp
struct Sm90Block;

struct CpOp {
  void* dst;
  const void* src;
  int cp_size, src_size;
};

struct Thread {
#if GPTK_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  char* stack = nullptr;
  St st = St::Exited;
  uint3 tid{0, 0, 0};
  unsigned lin = 0, warp = 0, lane = 0;
  Collective* held = nullptr;     // the last collective this lane took part in (its slots are being read)
  Collective* waiting = nullptr;  // the collective it waits at
  const char* wfile = nullptr;    // where it waits at the block barrier
  int wline = 0;
  std::vector<CpOp> cp_open;
  std::vector<std::vector<CpOp>> cp_groups;
  void* fake_stack = nullptr;
  ThreadSm90* sm90 = nullptr;  // sm_90 state (created on first use)
};

struct SharedAlloc {
  const void* tag;  // the declaration (nullptr: dynamic shared memory)
  char* host;
  size_t size;
  uint32_t base;    // shared-window address
  const char* name;
};

struct Warp {
  unsigned exists = 0, exited = 0;
  std::vector<Collective*> gathering;
};

struct Block {
  std::vector<SharedAlloc> allocs;
  size_t static_bytes = 0;
  uint32_t next_base = 0;
  char* dyn = nullptr;
  unsigned nthreads = 0, live = 0, arrived = 0;
  const char* bfile = nullptr;
  int bline = 0;
  int count_acc = 0, count_result = 0;
  std::vector<Warp> warps;
  Sm90Block* sm90 = nullptr;  // sm_90 state (created on first use)
};

struct Launch {
  const void* fn = nullptr;
  LaunchCfg cfg{};
  void (*body)(void*) = nullptr;
  void* closure = nullptr;
  std::string name;
  bool entered = false;
};

extern std::vector<Thread> g_threads;  // fiber pool (stacks kept between launches)
extern Launch* g_launch;
extern Block* g_block;
extern Thread* g_cur;
extern bool g_fault_now;  // the running launch has faulted
extern std::string g_fault;
extern std::string g_log;

std::string vformat(const char* fmt, va_list ap);
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
const char* base_name(const char* path);
bool same_site(const char* f1, int l1, const char* f2, int l2);
void yield_fiber();
Thread* require_fiber(const char* what);
std::string thread_desc(const Thread* t);
void release_block_barrier_if_complete();
std::string alloc_where(uint32_t addr);  // "name+0xoff" of a shared-window address

// Hooks into cuda_emu_sm90.cpp.
bool sm90_runnable(const Thread& t);          // a St::Spin thread whose mbarrier has changed
std::string sm90_wait_desc(const Thread& t);  // where a WaitGroup / Spin thread waits
void sm90_thread_exit(Thread* t);
void sm90_block_end(Block& B);
void sm90_check_generic_read(uint32_t addr, size_t bytes, const char* what, const char* file, int line);

}  // namespace detail
}  // namespace gptk_emu
