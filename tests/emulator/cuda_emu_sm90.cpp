// cuda_emu_sm90.cpp: the sm_90 (Hopper) instructions of the CPU emulator: wgmma (fence, commit_group,
// wait_group, mma_async SS and RS with shared-memory matrix descriptors), TMA tensor loads and
// stores against emulated tensor maps (cuTensorMapEncodeTiled), mbarrier (init, arrive, expect_tx,
// complete_tx, try_wait.parity), fence.proxy.async, named barriers (bar.sync/bar.arrive id, n),
// setmaxnreg, elect.sync and stmatrix. The kernel contract is /work/notes/HOPPER_CONTRACT.md.
//
// Where the semantics come from (cited next to each encoding below):
//   [desc]    CUTLASS include/cute/arch/mma_sm90_desc.hpp (GmmaDescriptor bit fields, LayoutType)
//   [traits]  CUTLASS include/cute/atom/mma_traits_sm90_gmma.hpp (canonical shared-memory layouts of
//             a descriptor, make_gmma_desc; accumulator and register-A fragment layouts)
//   [gmma]    CUTLASS include/cute/arch/mma_sm90_gmma.hpp (Major/ScaleIn/ScaleOut, the PTX forms)
//   [swizzle] CUTLASS include/cute/swizzle.hpp (Swizzle<B,M,S>), include/cute/pointer_swizzle.hpp
//             (a swizzle acts on the byte address)
//   [tma]     CUTLASS include/cute/arch/copy_sm90_tma.hpp, copy_sm90_desc.hpp (PTX forms, barriers)
//   [cuda.h]  CUDA 13.0 cuda.h, cuTensorMapEncodeTiled's documented requirements
//   [ptx]     PTX ISA 9.0, by section: 5.5.3.3 (out-of-bounds fill), 5.5.7 (TMA swizzling modes),
//             9.7.9.25.5 (cp.async.bulk.tensor), 9.7.13.1 (barrier), 9.7.13.14 (elect.sync),
//             9.7.13.15 (mbarrier: phases, tx-count, try_wait), 9.7.15 (wgmma: 9.7.15.5.1.1 register
//             fragments, 9.7.15.5.1.2 shared memory matrix layout and Matrix Descriptor Format,
//             9.7.15.7 fence / commit_group / wait_group), 9.7.19.5 (setmaxnreg), fence.proxy.
//   CUTLASS lines are those of NVIDIA/cutlass at 7107b05535f8977f5ecb9d01ee203205b1fd9bc4. (The PTX ISA's
//   own canonical-layout table, 9.7.15.5.1.2.1.3, states the same layouts as CUTLASS's make_gmma_desc;
//   its fragment figures are the layouts CUTLASS's CLayout_64xN / ALayout_64x16 encode.)
//
// Asynchrony is modelled so that missing waits show: by default (Config::wgmma_at_issue = 0) a
// wgmma's math happens at the wgmma.wait_group that completes it, and its accumulator registers
// hold a NaN poison in between (a read before the wait sees NaN; a write before the wait is
// reported); a TMA load is performed at the latest point a waiter could observe it (when a thread
// polls its mbarrier and only the load's bytes are missing), TMA stores at
// cp.async.bulk.wait_group(.read). Shared memory keeps an "async-proxy view": what wgmma and TMA
// stores may read is what was there at the last fence.proxy.async (or what TMA wrote); bytes that
// differ were written by ordinary stores without the fence, which is reported.
#include "cuda_emu_internal.h"

#include <algorithm>
#include <deque>
#include <unordered_map>

namespace gptk_emu {
namespace detail {

// =====================================================================================================
// Layouts (pure functions; the layout test enumerates them against a model written from CUTLASS)
// =====================================================================================================
namespace sm90 {

// [desc] mma_sm90_desc.hpp:108-125 (GmmaDescriptor::bitfield): start_address bits [0,14),
// leading_byte_offset [16,30), stride_byte_offset [32,46) (all three "4LSB not included": in units
// of 16 bytes), base_offset [49,52), layout_type [62,64). Bits 14-15, 30-31, 46-48 and 52-61 are
// unused (CUTLASS leaves them 0; the emulator reports them set).
struct Desc {
  uint32_t start, lbo, sbo, base_offset, layout;
  uint64_t reserved;
};
inline Desc decode_desc(uint64_t d) {
  Desc r;
  r.start = (uint32_t)(d & 0x3fff) << 4;
  r.lbo = (uint32_t)((d >> 16) & 0x3fff) << 4;
  r.sbo = (uint32_t)((d >> 32) & 0x3fff) << 4;
  r.base_offset = (uint32_t)((d >> 49) & 7);
  r.layout = (uint32_t)(d >> 62);
  r.reserved = d & (0x3ull << 14 | 0x3ull << 30 | 0x7ull << 46 | 0x3ffull << 52);
  return r;
}

// [desc] mma_sm90_desc.hpp:48-53 (LayoutType: INTERLEAVE = 0, B128 = 1, B64 = 2, B32 = 3) and
// [traits] mma_traits_sm90_gmma.hpp:145-150 (LayoutType <-> Swizzle<B,4,3>: B = 0, 3, 2, 1).
inline int desc_swizzle_bits(uint32_t layout) {
  static const int kBits[4] = {0, 3, 2, 1};
  return kBits[layout & 3];
}

// [swizzle] swizzle.hpp:54-79: Swizzle<B,M,S>::apply(o) = o ^ ((o & yyy_msk) >> S), yyy_msk = (2^B - 1)
// << (M + S). The GMMA and TMA swizzles are Swizzle<B,4,3> (mma_traits_sm90_gmma.hpp:75-84;
// copy_traits_sm90_tma_swizzle.hpp:44-56), applied to the byte address (pointer_swizzle.hpp:86-88):
// bits [4, 4+B) (the 16-byte chunk within a 2^B * 16-byte row) ^= bits [7, 7+B).
inline uint32_t swizzle(uint32_t addr, int b) {
  if (b == 0) return addr;
  return addr ^ ((addr & (((1u << b) - 1u) << 7)) >> 3);
}

// Byte offset, before the swizzle, of element (mn, k) (mn: the M row of A or the N column of B; k in
// [0, 16)) of a 16-bit operand tile described by a descriptor: the canonical layouts of
// [traits] mma_traits_sm90_gmma.hpp:162-189 (in elements, T = 8 elements per 16 bytes):
//   K-major  INTERLEAVE ((8,m),(T,2)):((1T,SBO),(1,LBO))   SW32 ((8,m),(T,2)):((2T,SBO),(1,T))
//            SW64       ((8,m),(T,2)):((4T,SBO),(1,T))     SW128 ((8,m),(T,2)):((8T,SBO),(1,T))
//   MN-major INTERLEAVE ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))
//            SWxx ((T,W,m),(8,k)):((1,T,LBO),(WT,SBO)), W = 2, 4, 8 for SW32, SW64, SW128
// (make_gmma_desc, lines 227-293, fills SBO/LBO from exactly these strides). A is K-major unless
// imm-trans-a, B unless imm-trans-b ([gmma] mma_sm90_gmma.hpp:107-110: Major::K = 0, MN = 1, passed
// as the imm-trans operands).
inline uint32_t desc_offset(const Desc& d, bool mn_major, int mn, int k) {
  const int b = desc_swizzle_bits(d.layout);
  const uint32_t w = 1u << b;  // 16-byte chunks per swizzle row: 1, 2, 4, 8
  if (!mn_major) {
    const uint32_t r0 = (uint32_t)mn % 8, r1 = (uint32_t)mn / 8, c = (uint32_t)k / 8, e = (uint32_t)k % 8;
    if (b == 0) return r0 * 16 + r1 * d.sbo + c * d.lbo + e * 2;
    return r0 * 16 * w + r1 * d.sbo + c * 16 + e * 2;
  }
  const uint32_t e = (uint32_t)mn % 8, r = (uint32_t)k % 8, kk = (uint32_t)k / 8;
  if (b == 0) return e * 2 + ((uint32_t)mn / 8) * d.sbo + r * 16 + kk * d.lbo;
  const uint32_t c = ((uint32_t)mn / 8) % w, j = (uint32_t)mn / (8 * w);
  return e * 2 + c * 16 + j * d.lbo + r * 16 * w + kk * d.sbo;
}
inline uint32_t desc_addr(const Desc& d, bool mn_major, int mn, int k) {
  return swizzle(d.start + desc_offset(d, mn_major, mn, k), desc_swizzle_bits(d.layout));
}

// [traits] mma_traits_sm90_gmma.hpp:433-435, CLayout_64xN = ((4,8,4),(2,2,N/8)):((128,1,16),(64,8,512)),
// mapping (thread t of the warpgroup, value v) to the column-major index m + 64 n of the 64 x N
// accumulator: t = t0 + 4 t1 + 32 t2, v = v0 + 2 v1 + 4 v2 -> m = t1 + 16 t2 + 8 v1, n = 2 t0 + v0 + 8 v2.
// (Restricted to one warp this is the mma.sync m16n8 C fragment: rows lane/4 (+8), columns 2(lane%4) (+1).)
inline void d_coord(int t, int v, int* m, int* n) {
  *m = (t / 4) % 8 + 16 * (t / 32) + 8 * ((v / 2) % 2);
  *n = 2 * (t % 4) + v % 2 + 8 * (v / 4);
}
// [traits] mma_traits_sm90_gmma.hpp:450-452, ALayout_64x16 = ((4,8,4),(2,2,2)):((128,1,16),(64,8,512)) over
// the column-major 64 x 16 A tile (16-bit values): m = t1 + 16 t2 + 8 v1, k = 2 t0 + v0 + 8 v2. Value v
// is half v % 2 (low half first) of the thread's 32-bit register v / 2 (the recast to uint32_t
// registers of mma_unpack, lines 413-415).
inline void a_coord(int t, int v, int* m, int* k) {
  *m = (t / 4) % 8 + 16 * (t / 32) + 8 * ((v / 2) % 2);
  *k = 2 * (t % 4) + v % 2 + 8 * (v / 4);
}

}  // namespace sm90

namespace {

// =====================================================================================================
// State
// =====================================================================================================
constexpr uint32_t kAccPoison = 0xffc0deadu;  // a quiet NaN: accumulator registers of a wgmma in flight
constexpr uint64_t kMbarSig = 0x4d42415253494721ull;  // written into an mbarrier's 8 bytes by init

enum GatherOp { kGFence = 1, kGCommit, kGWait, kGMma, kGSetmaxnreg };

struct Gather {  // a warpgroup collective (.sync.aligned over the 128 threads of a warpgroup)
  int op = 0;
  const char* what = nullptr;
  const char* file = nullptr;
  int line = 0;
  unsigned wg = 0, arrived = 0;
  void* data[128] = {};
  bool blocked = false;  // setmaxnreg.inc waiting for registers
  int want_regs = 0;
};

struct TensorMap;  // decoded CUtensorMap

struct TmaOp {  // a TMA load (to shared memory) or store (from shared memory) in flight
  uint64_t id = 0;
  bool load = true;
  int rank = 0;
  int32_t c[5] = {};
  uint32_t smem = 0;  // destination (load) / source (store)
  uint32_t mbar = 0;  // load: the mbarrier it completes bytes on
  size_t bytes = 0;
  const char* file = nullptr;
  int line = 0;
  CUtensorMap map{};      // a copy (the issuing thread's parameter may be gone at completion)
  std::vector<char> src;  // store: the source bytes at issue
};

struct Mbar {
  uint32_t addr = 0;
  uint32_t expected = 0, pending = 0;  // arrivals per phase / still missing in the current phase
  int64_t tx = 0;                      // tx-count of the current phase (expected - completed bytes)
  uint64_t phase = 0;                  // completed phases
  uint64_t version = 1;                // bumped on every change (spinning waiters wake on a change)
  std::vector<TmaOp*> inflight;        // TMA loads signalling it, not yet performed
  int64_t inflight_bytes = 0;
  const char* file = nullptr;
  int line = 0;
};

struct WgmmaOp {
  uint64_t id = 0;
  int n = 0;
  bool bf16 = true;
  int scale_d = 1;
  double sign = 1.0;
  uint64_t desc_a = 0, desc_b = 0;
  int trans_a = 0, trans_b = 0;
  bool rs = false;
  const char* file = nullptr;
  int line = 0;
  int64_t group = -1;                 // commit group (-1: not committed yet)
  std::vector<uint16_t> a, b;         // A[m][k] (64 x 16), B[k][n] (16 x n) at issue
  std::vector<uint32_t> a_addr, b_addr;  // their shared addresses (SS A, B)
  std::vector<uint32_t> chunks;       // 16-byte chunks of shared memory it reads (sorted, unique)
  std::vector<void*> regs;            // [t][v]: the accumulator registers (128 x n/2)
  std::vector<float> c;               // C inputs at issue (unless chained)
  std::vector<char> chained;          // the input is the result of an earlier wgmma in flight
};

struct NamedBar {
  int count = 0;  // threads expected in the current phase (0: idle)
  unsigned warps_arrived = 0;
  std::vector<unsigned> lanes;   // per warp: lanes arrived
  std::vector<char> warp_done;   // per warp: counted
  const char* file = nullptr;
  int line = 0;
};

struct WarpgroupState {
  std::deque<WgmmaOp*> ops;      // in flight, in issue order
  std::deque<int64_t> groups;    // committed groups not yet waited, oldest first
  int64_t next_group = 0;
  bool fenced = false;           // wgmma.fence since the last wgmma.wait_group
  Gather* gathering = nullptr;
  int regs = 0;                  // per-thread registers (setmaxnreg; at launch: the most the block can have)
  bool regs_known = false;       // set by a setmaxnreg (the launch's count is unknown here)
};

}  // namespace

struct ThreadSm90 {
  Gather* gather = nullptr;  // St::WaitGroup at a warpgroup collective
  int named_bar = -1;        // St::WaitGroup at a named barrier
  Mbar* spin = nullptr;      // St::Spin
  uint64_t spin_version = 0;
  uint32_t spin_parity = 0;
  const char* spin_file = nullptr;
  int spin_line = 0;
  std::vector<TmaOp*> bulk_open;                 // TMA stores not yet committed
  std::deque<std::vector<TmaOp*>> bulk_groups;   // committed bulk async-groups, oldest first
};

struct Sm90Block {
  std::map<uint32_t, Mbar*> mbars;
  std::vector<WarpgroupState> wgs;
  NamedBar bars[16];
  std::vector<uint16_t> pending_tma;    // per 16-byte chunk of the shared window: TMA loads writing it
  std::vector<uint16_t> inflight_read;  // per chunk: wgmma ops and TMA stores in flight reading it
  std::vector<char*> views;             // per allocation: the async-proxy view (nullptr: still the poison)
  std::vector<Gather*> waiting_inc;     // setmaxnreg.inc waiting for registers
  std::vector<TmaOp*> loads;            // every TMA load in flight (for messages)
  uint64_t next_id = 1;
  int regs_init = 0;
};

namespace {

// =====================================================================================================
// Helpers
// =====================================================================================================
Sm90Block& S(bool sm90_only = true) {
  if (sm90_only && g_cfg.cc < 90)
    fault("an sm_90 instruction (wgmma, TMA, mbarrier expect_tx/try_wait, fence.proxy.async, setmaxnreg, elect, "
          "stmatrix) on the emulated sm_%d device", g_cfg.cc);
  Block& B = *g_block;
  if (B.sm90 == nullptr) {
    B.sm90 = new Sm90Block;
    B.sm90->wgs.resize((B.nthreads + 127) / 128);
    // The CTA's register pool for setmaxnreg: the most registers per thread a launch of this many
    // threads can have (64K registers per SM, a multiple of 8, at most 256). The actual launch count
    // is at most that, so an increase that cannot fit in this pool cannot fit on the GPU either.
    int r = (int)(65536 / std::max(1u, B.nthreads)) / 8 * 8;
    B.sm90->regs_init = std::min(r, 256);
    for (WarpgroupState& w : B.sm90->wgs) w.regs = B.sm90->regs_init;
  }
  return *B.sm90;
}
ThreadSm90& TS(Thread* t) {
  if (t->sm90 == nullptr) t->sm90 = new ThreadSm90;
  return *t->sm90;
}
WarpgroupState& WG(Thread* t) { return S().wgs[t->lin / 128]; }

std::string site(const char* file, int line) { return format("%s:%d", base_name(file), line); }

int alloc_index(uint32_t addr, size_t bytes) {
  const std::vector<SharedAlloc>& A = g_block->allocs;
  for (size_t i = 0; i < A.size(); ++i)
    if (addr >= A[i].base && (uint64_t)addr + bytes <= (uint64_t)A[i].base + A[i].size) return (int)i;
  return -1;
}

char* view_of(int ai) {
  Sm90Block& s = S();
  if (s.views.size() < g_block->allocs.size()) s.views.resize(g_block->allocs.size(), nullptr);
  if (s.views[ai] == nullptr) {
    const SharedAlloc& a = g_block->allocs[ai];
    s.views[ai] = static_cast<char*>(malloc(a.size ? a.size : 1));
    std::memset(s.views[ai], g_cfg.poison, a.size);  // never fenced: the block-start contents
  }
  return s.views[ai];
}

std::vector<uint16_t>& chunk_map(std::vector<uint16_t>& v, uint32_t last_chunk) {
  if (v.size() <= last_chunk) v.resize(std::max<size_t>(last_chunk + 1, g_block->next_base / 16 + 1), 0);
  return v;
}

// The async proxy reads shared bytes [addr, addr + n): they must equal the view (written through the
// async proxy, or by ordinary stores followed by fence.proxy.async).
bool proxy_clean(uint32_t addr, size_t n, uint32_t* bad) {
  const int ai = alloc_index(addr, n);
  if (ai < 0) return true;  // (bounds are checked elsewhere)
  const SharedAlloc& a = g_block->allocs[ai];
  const char* h = a.host + (addr - a.base);
  const char* v = view_of(ai) + (addr - a.base);
  if (std::memcmp(h, v, n) == 0) return true;
  for (size_t i = 0; i < n; ++i)
    if (h[i] != v[i]) {
      *bad = addr + (uint32_t)i;
      break;
    }
  return false;
}

const TmaOp* pending_load_at(uint32_t chunk) {
  for (const TmaOp* op : S().loads)
    if (chunk >= op->smem / 16 && chunk < (op->smem + op->bytes + 15) / 16) return op;
  return nullptr;
}

std::string reader_at(uint32_t chunk) {
  Sm90Block& s = S();
  for (const WarpgroupState& w : s.wgs)
    for (const WgmmaOp* op : w.ops)
      if (std::binary_search(op->chunks.begin(), op->chunks.end(), chunk))
        return format("the wgmma issued at %s (in flight: not yet completed by wgmma.wait_group)",
                      site(op->file, op->line).c_str());
  for (unsigned i = 0; i < g_block->nthreads; ++i) {
    const ThreadSm90* ts = g_threads[i].sm90;
    if (ts == nullptr) continue;
    auto check = [&](const std::vector<TmaOp*>& ops) -> const TmaOp* {
      for (const TmaOp* op : ops)
        if (chunk >= op->smem / 16 && chunk < (op->smem + op->bytes + 15) / 16) return op;
      return nullptr;
    };
    const TmaOp* op = check(ts->bulk_open);
    for (const auto& g : ts->bulk_groups)
      if (op == nullptr) op = check(g);
    if (op) return format("the TMA store issued at %s (in flight: not yet waited with cp.async.bulk.wait_group)",
                          site(op->file, op->line).c_str());
  }
  return "an operation in flight";
}

// =====================================================================================================
// Warpgroup collectives
// =====================================================================================================
// Every thread of the warpgroup deposits `data`; the last to arrive gets the Gather back and performs
// the operation (the others wait, their `data` stays valid), then wg_release lets them go.
Gather* wg_arrive(int op, void* data, const char* what, const char* file, int line) {
  Thread* t = require_fiber(what);
  Block& B = *g_block;
  if (B.nthreads % 128 != 0)
    fault("%s:%d: %s is a warpgroup instruction (.sync.aligned over 128 threads); the block has %u threads, not a "
          "multiple of 128", base_name(file), line, what, B.nthreads);
  const unsigned wg = t->lin / 128;
  for (unsigned w = wg * 4; w < wg * 4 + 4; ++w)
    if (B.warps[w].exited)
      fault("%s:%d: %s in warpgroup %u, whose warp %u has exited threads (lanes %08x): all 128 threads must execute "
            "it", base_name(file), line, what, wg, w, B.warps[w].exited);
  WarpgroupState& W = S().wgs[wg];
  Gather* g = W.gathering;
  if (g == nullptr) {
    g = new Gather;
    g->op = op, g->what = what, g->file = file, g->line = line, g->wg = wg;
    W.gathering = g;
  } else if (g->op != op || !same_site(g->file, g->line, file, line)) {
    fault("threads of warpgroup %u meet at different warpgroup instructions (.aligned: all must execute the same "
          "one): %s at %s:%d, and %u threads at %s at %s:%d", wg, what, base_name(file), line, g->arrived, g->what,
          base_name(g->file), g->line);
  }
  g->data[t->lin % 128] = data;
  if (++g->arrived == 128) {
    W.gathering = nullptr;
    return g;
  }
  t->st = St::WaitGroup;
  TS(t).gather = g;
  yield_fiber();
  return nullptr;
}

void wg_release(Gather* g) {
  for (unsigned i = 0; i < 128; ++i) {
    Thread& o = g_threads[g->wg * 128 + i];
    if (&o == g_cur) continue;
    o.st = St::Ready;
    if (o.sm90) o.sm90->gather = nullptr;
  }
  delete g;
}

// =====================================================================================================
// Named barriers ([ptx] barrier: 16 per CTA; bar.sync = barrier.sync.aligned; the count is a multiple
// of the warp size and counts warps: a warp arrives when all its non-exited threads have)
// =====================================================================================================
void named_barrier_check(int id) {
  Block& B = *g_block;
  NamedBar& nb = S(false).bars[id];
  if (nb.count == 0) return;
  for (size_t w = 0; w < nb.lanes.size(); ++w) {
    const unsigned live = B.warps[w].exists & ~B.warps[w].exited;
    if (!nb.warp_done[w] && nb.lanes[w] != 0 && (nb.lanes[w] & live) == live) {
      nb.warp_done[w] = 1;
      nb.warps_arrived++;
    }
  }
  if (nb.warps_arrived * 32 < (unsigned)nb.count) return;
  for (unsigned i = 0; i < B.nthreads; ++i) {
    Thread& o = g_threads[i];
    if (o.st == St::WaitGroup && o.sm90 && o.sm90->named_bar == id) {
      o.st = St::Ready;
      o.sm90->named_bar = -1;
    }
  }
  nb.count = 0;
  nb.warps_arrived = 0;
}

// =====================================================================================================
// mbarrier ([ptx] mbarrier: a phase completes when its pending arrival count and its tx-count are
// both zero; the next phase then expects `count` arrivals again. try_wait.parity(p) is true once the
// phase of parity p has completed, i.e. while the current phase's parity differs from p.)
// =====================================================================================================
Mbar* mbar_at(uint32_t addr, const char* what, const char* file, int line) {
  char* host = static_cast<char*>(shared_ptr(addr, 8, 8, what, file, line));
  auto it = S().mbars.find(addr);
  if (it == S().mbars.end())
    fault("%s:%d: %s on shared memory %s, which holds no mbarrier (mbarrier.init it first)", base_name(file), line,
          what, alloc_where(addr).c_str());
  uint64_t sig;
  std::memcpy(&sig, host, 8);
  if (sig != (kMbarSig ^ addr))
    fault("%s:%d: %s: the mbarrier at %s (initialised at %s) was overwritten by ordinary stores", base_name(file),
          line, what, alloc_where(addr).c_str(), site(it->second->file, it->second->line).c_str());
  return it->second;
}

void mbar_phase_check(Mbar& b) {
  if (b.pending == 0 && b.tx == 0) {
    b.phase++;
    b.pending = b.expected;
    b.version++;
  }
}

void tma_perform_load(TmaOp* op);

// A waiter polls `b`: once all arrivals are in and the in-flight loads deliver the expected bytes,
// perform them (the latest point at which a waiter could observe them).
void mbar_complete_late(Mbar& b) {
  if (b.pending != 0 || b.inflight.empty() || b.inflight_bytes < b.tx) return;
  std::vector<TmaOp*> ops;
  ops.swap(b.inflight);
  const int64_t bytes = b.inflight_bytes;
  b.inflight_bytes = 0;
  for (TmaOp* op : ops) {
    tma_perform_load(op);
    delete op;
  }
  b.tx -= bytes;
  b.version++;
  if (b.tx < 0)
    fault("mbarrier at %s: TMA loads completed %lld bytes more than expect_tx announced for phase %llu (tx-count "
          "underflow)", alloc_where(b.addr).c_str(), (long long)-b.tx, (unsigned long long)b.phase);
  mbar_phase_check(b);
}

std::string mbar_state(const Mbar& b) {
  return format("phase %llu (parity %llu): %u of %u arrivals pending, tx-count %lld bytes, %lld bytes of TMA loads in "
                "flight", (unsigned long long)b.phase, (unsigned long long)(b.phase & 1), b.pending, b.expected,
                (long long)b.tx, (long long)b.inflight_bytes);
}

// =====================================================================================================
// Tensor maps ([cuda.h] cuTensorMapEncodeTiled). The opaque CUtensorMap holds the encode arguments:
//   q[0] magic | dtype << 32 | rank << 40 | swizzle << 44 | l2 << 48 | oob << 52 | interleave << 56
//   q[1] global address; q[2..6] globalDim; q[7..10] globalStrides (dims 1..rank-1, bytes);
//   q[11] (boxDim - 1) in bytes 0..4 | (elementStrides - 1) << 40 + 3 bits each
// =====================================================================================================
constexpr uint64_t kTmapMagic = 0x70616d54u;  // "Tmap"

struct TensorMap {
  int dtype = 0, rank = 0, swizzle = 0, oob = 0, esize = 0;
  const char* base = nullptr;
  uint64_t dim[5] = {1, 1, 1, 1, 1};
  uint64_t stride[5] = {0, 0, 0, 0, 0};  // bytes; stride[0] = element size
  uint32_t box[5] = {1, 1, 1, 1, 1};
  uint32_t estride[5] = {1, 1, 1, 1, 1};
};

int dtype_size(int dt) {
  switch (dt) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: return 1;
    case CU_TENSOR_MAP_DATA_TYPE_UINT16:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16: return 2;
    case CU_TENSOR_MAP_DATA_TYPE_UINT32:
    case CU_TENSOR_MAP_DATA_TYPE_INT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32:
    case CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ: return 4;
    case CU_TENSOR_MAP_DATA_TYPE_UINT64:
    case CU_TENSOR_MAP_DATA_TYPE_INT64:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT64: return 8;
    default: return 0;  // the packed 4/6-bit types: not emulated
  }
}
bool dtype_float(int dt) {
  return dt == CU_TENSOR_MAP_DATA_TYPE_FLOAT16 || dt == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 ||
         dt == CU_TENSOR_MAP_DATA_TYPE_FLOAT32 || dt == CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ ||
         dt == CU_TENSOR_MAP_DATA_TYPE_TFLOAT32 || dt == CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ ||
         dt == CU_TENSOR_MAP_DATA_TYPE_FLOAT64;
}
// Swizzle<B,4,3> bits of a TMA swizzle mode ([tma] copy_sm90_desc.hpp:134-139 SmemSwizzleBits: 32B = 1, 64B = 2,
// 128B = 3; copy_traits_sm90_tma_swizzle.hpp:44-56) and its span in bytes ([cuda.h]: "Swizzle 16B
// chunks within 32B / 64B / 128B span").
int tma_swizzle_bits(int swz) { return swz == CU_TENSOR_MAP_SWIZZLE_32B ? 1 : swz == CU_TENSOR_MAP_SWIZZLE_64B ? 2 : swz == CU_TENSOR_MAP_SWIZZLE_128B ? 3 : 0; }

bool decode_tmap(const void* p, TensorMap* m) {
  const uint64_t* q = static_cast<const CUtensorMap*>(p)->opaque;
  if ((q[0] & 0xffffffffu) != kTmapMagic) return false;
  m->dtype = (int)((q[0] >> 32) & 0xff);
  m->rank = (int)((q[0] >> 40) & 0xf);
  m->swizzle = (int)((q[0] >> 44) & 0xf);
  m->oob = (int)((q[0] >> 52) & 0xf);
  m->esize = dtype_size(m->dtype);
  m->base = reinterpret_cast<const char*>(q[1]);
  m->stride[0] = (uint64_t)m->esize;
  for (int i = 0; i < m->rank; ++i) {
    m->dim[i] = q[2 + i];
    if (i > 0) m->stride[i] = q[7 + i - 1];
    m->box[i] = (uint32_t)((q[11] >> (8 * i)) & 0xff) + 1;
    m->estride[i] = (uint32_t)((q[11] >> (40 + 3 * i)) & 7) + 1;
  }
  return m->rank >= 1 && m->rank <= 5 && m->esize > 0;
}

size_t box_bytes(const TensorMap& m) {
  size_t n = (size_t)m.esize;
  for (int i = 0; i < m.rank; ++i) n *= m.box[i];
  return n;
}

// For every 16-byte chunk of the box in shared memory (dense, dimension 0 innermost, then swizzled on
// the shared address), call f(shared address of the chunk, box coordinates of its first element).
template <class F>
void for_box_chunks(const TensorMap& m, uint32_t smem, F&& f) {
  const uint32_t row_bytes = m.box[0] * (uint32_t)m.esize;
  const int b = tma_swizzle_bits(m.swizzle);
  uint32_t rows = 1;
  for (int i = 1; i < m.rank; ++i) rows *= m.box[i];
  for (uint32_t r = 0; r < rows; ++r) {
    uint32_t i[5] = {0, 0, 0, 0, 0}, rr = r;
    for (int d = 1; d < m.rank; ++d) i[d] = rr % m.box[d], rr /= m.box[d];
    for (uint32_t c = 0; c < row_bytes / 16; ++c) {
      i[0] = c * 16 / (uint32_t)m.esize;
      f(sm90::swizzle(smem + r * row_bytes + c * 16, b), i);
    }
  }
}

// The global address of box element i (coordinates c + i), or nullptr when out of bounds.
const char* gaddr(const TensorMap& m, const int32_t* c, const uint32_t* i) {
  uint64_t off = 0;
  for (int d = 0; d < m.rank; ++d) {
    const int64_t g = (int64_t)c[d] + (int64_t)i[d];
    if (g < 0 || (uint64_t)g >= m.dim[d]) return nullptr;
    off += (uint64_t)g * m.stride[d];
  }
  return m.base + off;
}

void validate_tma(const char* what, int rank, const void* tmap, uint32_t smem, TensorMap* m, const char* file,
                  int line) {
  if (!decode_tmap(tmap, m))
    fault("%s:%d: %s with a tensor map that cuTensorMapEncodeTiled did not encode (or that was overwritten)",
          base_name(file), line, what);
  if (m->rank != rank)
    fault("%s:%d: %s: a %dd copy with a tensor map of rank %d", base_name(file), line, what, rank, m->rank);
  for (int i = 1; i < m->rank; ++i)
    if (m->estride[i] != 1)
      fault("%s:%d: %s: elementStrides other than 1 are not emulated", base_name(file), line, what);
  // The shared memory side of a tensor copy is 128-byte aligned (CUDA programming guide, TMA). The
  // swizzle pattern ([ptx] 5.5.7 "Swizzling Modes": 16-byte chunk c of 128-byte line L goes to
  // c ^ (L mod 2^B)) starts at a 1024 / 512 / 256-byte boundary, or, for a destination elsewhere, has
  // the "swizzle base offset" (dstMem / 128) mod 8 / 4 / 2: a function of the absolute shared address,
  // which is how the emulator computes it.
  if (smem % 128 != 0)
    fault("%s:%d: %s: shared memory address %s is not 128-byte aligned", base_name(file), line, what,
          alloc_where(smem).c_str());
  const int b = tma_swizzle_bits(m->swizzle);
  if (b) {
    const uint32_t span = 16u << b;
    if (m->box[0] * (uint32_t)m->esize != span)
      fault("%s:%d: %s: a box inner dimension of %u bytes under the %uB swizzle (less than the span) is not emulated",
            base_name(file), line, what, m->box[0] * (uint32_t)m->esize, span);
  }
  shared_ptr(smem, box_bytes(*m), 16, what, file, line);
}

void tma_perform_load(TmaOp* op) {
  TensorMap m;
  decode_tmap(&op->map, &m);
  const int ai = alloc_index(op->smem, op->bytes);
  const SharedAlloc& a = g_block->allocs[ai];
  char* view = view_of(ai);
  Sm90Block& s = S();
  // overwriting what an operation in flight still reads
  for (uint32_t ch = op->smem / 16; ch < (op->smem + op->bytes) / 16; ++ch)
    if (ch < s.inflight_read.size() && s.inflight_read[ch])
      fault("%s:%d: TMA load writes shared memory %s that %s reads (a stage reused before its readers are done)",
            base_name(op->file), op->line, alloc_where(ch * 16).c_str(), reader_at(ch).c_str());
  uint16_t fill16 = 0;
  uint32_t fill32 = 0;
  uint64_t fill64 = 0;
  if (m.oob == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA)  // canonical NaNs (the exact constant is not modelled)
    fill16 = 0x7fff, fill32 = 0x7fffffffu, fill64 = 0x7fffffffffffffffull;
  for_box_chunks(m, op->smem, [&](uint32_t addr, const uint32_t* i) {
    char* h = a.host + (addr - a.base);
    char* v = view + (addr - a.base);
    uint32_t ii[5];
    std::memcpy(ii, i, sizeof ii);
    for (int e = 0; e < 16 / m.esize; ++e, ++ii[0]) {
      const char* g = gaddr(m, op->c, ii);
      char* dst = h + e * m.esize;
      if (g) std::memcpy(dst, g, (size_t)m.esize);
      else if (m.esize == 2) std::memcpy(dst, &fill16, 2);
      else if (m.esize == 4) std::memcpy(dst, &fill32, 4);
      else if (m.esize == 8) std::memcpy(dst, &fill64, 8);
      else std::memset(dst, 0, (size_t)m.esize);
    }
    std::memcpy(v, h, 16);
  });
  for (uint32_t ch = op->smem / 16; ch < (op->smem + op->bytes) / 16; ++ch) s.pending_tma[ch]--;
  s.loads.erase(std::find(s.loads.begin(), s.loads.end(), op));
}

void tma_perform_store(TmaOp* op) {
  TensorMap m;
  decode_tmap(&op->map, &m);
  const int ai = alloc_index(op->smem, op->bytes);
  const SharedAlloc& a = g_block->allocs[ai];
  Sm90Block& s = S();
  if (std::memcmp(a.host + (op->smem - a.base), op->src.data(), op->bytes) != 0)
    fault("%s:%d: shared memory %s read by this TMA store was overwritten before cp.async.bulk.wait_group(.read) "
          "completed it", base_name(op->file), op->line, alloc_where(op->smem).c_str());
  for_box_chunks(m, op->smem, [&](uint32_t addr, const uint32_t* i) {
    const char* h = a.host + (addr - a.base);
    uint32_t ii[5];
    std::memcpy(ii, i, sizeof ii);
    for (int e = 0; e < 16 / m.esize; ++e, ++ii[0]) {
      const char* g = gaddr(m, op->c, ii);  // out-of-bounds elements are not written
      if (g) std::memcpy(const_cast<char*>(g), h + e * m.esize, (size_t)m.esize);
    }
  });
  for (uint32_t ch = op->smem / 16; ch < (op->smem + op->bytes) / 16; ++ch) s.inflight_read[ch]--;
}

// =====================================================================================================
// wgmma
// =====================================================================================================
struct WgmmaArgs {
  int n;
  bool bf16;
  void* const* d;
  uint64_t desc_a;
  const uint32_t* a;
  uint64_t desc_b;
  int scale_d, scale_a, scale_b, trans_a, trans_b;
};

// The shared addresses of a descriptor's rows x 16 operand tile (validated: the descriptor is well
// formed and the tile lies in one shared allocation).
void desc_tile(const char* which, uint64_t desc, bool mn_major, int rows, std::vector<uint32_t>& addr,
               const char* file, int line) {
  const sm90::Desc d = sm90::decode_desc(desc);
  if (d.reserved)
    fault("%s:%d: wgmma descriptor %s = 0x%016llx has reserved bits set (0x%016llx)", base_name(file), line, which,
          (unsigned long long)desc, (unsigned long long)d.reserved);
  if (d.base_offset != 0)
    fault("%s:%d: wgmma descriptor %s = 0x%016llx: a non-zero base offset (%u) is not emulated (CUTLASS's "
          "make_gmma_desc always sets 0)", base_name(file), line, which, (unsigned long long)desc, d.base_offset);
  const int b = sm90::desc_swizzle_bits(d.layout);
  if (b) {
    // [ptx] "Matrix Descriptor Format": the base offset is 0 when the swizzle's repeating pattern starts
    // at a 1024 / 512 / 256-byte boundary (128B / 64B / 32B), otherwise (pattern start >> 7) & 7. With
    // base offset 0 the matrix must therefore start in the first row of a pattern that begins at such a
    // boundary (an offset inside that row, e.g. a K step, is fine: the chunk bits are the address's).
    const uint32_t span = 16u << b, repeat = 8 * span;
    if (d.start % repeat >= span)
      fault("%s:%d: wgmma descriptor %s = 0x%016llx: start address %s is misaligned for the %uB swizzle (offset %u "
            "into its %u-byte pattern repeat, beyond the first %u-byte row, with base offset 0)", base_name(file),
            line, which, (unsigned long long)desc, alloc_where(d.start).c_str(), span, d.start % repeat, repeat, span);
  }
  const int ai = alloc_index(d.start, 2);
  if (ai < 0)
    fault("%s:%d: wgmma descriptor %s = 0x%016llx: start address 0x%x is outside every shared allocation",
          base_name(file), line, which, (unsigned long long)desc, d.start);
  const SharedAlloc& al = g_block->allocs[ai];
  addr.resize((size_t)rows * 16);
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < 16; ++k) {
      const uint32_t x = sm90::desc_addr(d, mn_major, r, k);
      if (x < al.base || (uint64_t)x + 2 > (uint64_t)al.base + al.size)
        fault("%s:%d: wgmma descriptor %s = 0x%016llx (%s, LBO %u, SBO %u, %s-major): element (%d, %d) at shared "
              "address 0x%x is outside the allocation %s [0x%x, 0x%x)", base_name(file), line, which,
              (unsigned long long)desc, b ? format("%uB swizzle", 16u << b).c_str() : "no swizzle", d.lbo, d.sbo,
              mn_major ? "MN" : "K", r, k, x, al.name, al.base, al.base + (uint32_t)al.size);
      addr[(size_t)r * 16 + k] = x;
    }
}

uint16_t read16(uint32_t addr) {
  const int ai = alloc_index(addr, 2);
  uint16_t v;
  std::memcpy(&v, g_block->allocs[ai].host + (addr - g_block->allocs[ai].base), 2);
  return v;
}

void wgmma_compute(WgmmaOp& op) {
  const int n = op.n, nv = n / 2;
  auto val = [&](uint16_t h) { return (double)(op.bf16 ? bf16_bits_to_float(h) : half_bits_to_float(h)); };
  std::vector<double> A(64 * 16), Bm(16 * (size_t)n);
  for (int i = 0; i < 64 * 16; ++i) A[i] = val(op.a[i]);
  for (size_t i = 0; i < Bm.size(); ++i) Bm[i] = val(op.b[i]);
  for (int t = 0; t < 128; ++t)
    for (int v = 0; v < nv; ++v) {
      const size_t idx = (size_t)t * nv + v;
      void* r = op.regs[idx];
      int m, col;
      sm90::d_coord(t, v, &m, &col);
      // The products of 16-bit values are exact in double: D is rounded once to fp32 per wgmma (the
      // hardware's accumulation order and internal precision are not modelled).
      double acc = 0.0;
      if (op.scale_d) {
        if (op.chained[idx]) {  // the result of an earlier wgmma, just written by it
          float c;
          std::memcpy(&c, r, 4);
          acc = c;
        } else {
          acc = op.c[idx];
        }
      }
      double s = 0.0;
      for (int k = 0; k < 16; ++k) s += A[m * 16 + k] * Bm[(size_t)k * n + col];
      const float d = (float)(acc + op.sign * s);
      std::memcpy(r, &d, 4);
    }
}

void wgmma_complete(WgmmaOp* op) {
  // the operands must still hold what was there at issue
  if (!op->rs)
    for (size_t i = 0; i < op->a_addr.size(); ++i)
      if (read16(op->a_addr[i]) != op->a[i])
        fault("%s:%d: shared memory %s (operand A) read by this wgmma changed before the wgmma.wait_group that "
              "completes it", base_name(op->file), op->line, alloc_where(op->a_addr[i]).c_str());
  for (size_t i = 0; i < op->b_addr.size(); ++i)
    if (read16(op->b_addr[i]) != op->b[i])
      fault("%s:%d: shared memory %s (operand B) read by this wgmma changed before the wgmma.wait_group that "
            "completes it", base_name(op->file), op->line, alloc_where(op->b_addr[i]).c_str());
  wgmma_compute(*op);
  Sm90Block& s = S();
  for (uint32_t ch : op->chunks) s.inflight_read[ch]--;
}

void wgmma_wait_groups(WarpgroupState& W, int n) {
  while ((int)W.groups.size() > n) {
    const int64_t g = W.groups.front();
    W.groups.pop_front();
    std::vector<WgmmaOp*> done;
    for (WgmmaOp* op : W.ops)
      if (op->group == g) done.push_back(op);
    if (done.empty()) continue;
    // [ptx] wgmma.wait_group: accessing the accumulator registers of a wgmma.mma_async before the
    // wait_group that completes it is undefined. They hold the poison since issue; a different value
    // was written by the program.
    for (WgmmaOp* op : done) {
      const size_t nv = op->regs.size() / 128;
      for (size_t i = 0; i < op->regs.size(); ++i) {
        uint32_t bits;
        std::memcpy(&bits, op->regs[i], 4);
        if (bits != kAccPoison)
          fault("%s:%d: accumulator register %zu of thread %zu of the warpgroup was written while this wgmma was in "
                "flight (between wgmma.mma_async and the wgmma.wait_group that completes it)", base_name(op->file),
                op->line, i % nv, i / nv);
      }
    }
    for (WgmmaOp* op : done) wgmma_complete(op);  // in issue order: chained inputs are produced first
    for (WgmmaOp* op : done) {
      W.ops.erase(std::find(W.ops.begin(), W.ops.end(), op));
      delete op;
    }
    // ops still in flight: the first one (in issue order) to use a register completed just now takes
    // its result as input (later ones stay chained on their predecessor); their registers keep the poison
    if (!W.ops.empty()) {
      std::unordered_map<void*, char> claimed;
      for (WgmmaOp* op : W.ops) {
        for (size_t i = 0; i < op->regs.size(); ++i) {
          uint32_t bits;
          std::memcpy(&bits, op->regs[i], 4);
          if (op->chained[i] && bits != kAccPoison && !claimed.count(op->regs[i])) {
            std::memcpy(&op->c[i], op->regs[i], 4);
            op->chained[i] = 0;
          }
        }
        for (void* r : op->regs) claimed[r] = 1;
      }
    }
    for (WgmmaOp* op : W.ops)
      for (void* r : op->regs) std::memcpy(r, &kAccPoison, 4);
  }
}

}  // namespace

// ---- hooks from cuda_emu.cpp -------------------------------------------------------------------------------
bool sm90_runnable(const Thread& t) {
  return t.sm90 != nullptr && t.sm90->spin != nullptr && t.sm90->spin->version != t.sm90->spin_version;
}

std::string sm90_wait_desc(const Thread& t) {
  const ThreadSm90* ts = t.sm90;
  if (ts == nullptr) return "an unknown sm_90 wait";
  if (t.st == St::Spin && ts->spin)
    return format("mbarrier at %s (try_wait.parity %u at %s: waits for the phase of parity %u; the barrier is at %s)",
                  alloc_where(ts->spin->addr).c_str(), ts->spin_parity, site(ts->spin_file, ts->spin_line).c_str(),
                  ts->spin_parity, mbar_state(*ts->spin).c_str());
  if (ts->named_bar >= 0) {
    const NamedBar& nb = g_block->sm90->bars[ts->named_bar];
    return format("named barrier %d (bar.sync at %s, count %d: %u warps arrived)", ts->named_bar,
                  site(nb.file, nb.line).c_str(), nb.count, nb.warps_arrived);
  }
  if (ts->gather) {
    const Gather* g = ts->gather;
    if (g->blocked)
      return format("setmaxnreg.inc.sync.aligned.u32 %d at %s in warpgroup %u (waits for registers: the CTA's pool is "
                    "%d per thread)", g->want_regs, site(g->file, g->line).c_str(), g->wg, g_block->sm90->regs_init);
    return format("%s at %s in warpgroup %u (%u of 128 threads arrived)", g->what, site(g->file, g->line).c_str(),
                  g->wg, g->arrived);
  }
  return "an sm_90 wait";
}

void sm90_thread_exit(Thread* t) {
  Block& B = *g_block;
  if (t->sm90 != nullptr) {  // TMA stores in flight complete
    ThreadSm90& ts = *t->sm90;
    for (auto& g : ts.bulk_groups)
      for (TmaOp* op : g) {
        tma_perform_store(op);
        delete op;
      }
    ts.bulk_groups.clear();
    for (TmaOp* op : ts.bulk_open) {
      tma_perform_store(op);
      delete op;
    }
    ts.bulk_open.clear();
  }
  if (B.sm90 == nullptr) return;
  for (int id = 1; id < 16; ++id) named_barrier_check(id);  // the exited lane may complete its warp's arrival
  WarpgroupState& W = B.sm90->wgs[t->lin / 128];
  if (W.gathering)
    fault("%s exits while its warpgroup waits for it at %s (%s)", thread_desc(t).c_str(), W.gathering->what,
          site(W.gathering->file, W.gathering->line).c_str());
  if (!W.ops.empty())
    fault("%s exits with wgmma operations of its warpgroup in flight (the one issued at %s was never completed by "
          "wgmma.wait_group)", thread_desc(t).c_str(), site(W.ops.front()->file, W.ops.front()->line).c_str());
}

void sm90_block_end(Block& B) {
  Sm90Block* s = B.sm90;
  for (auto& kv : s->mbars) {
    for (TmaOp* op : kv.second->inflight) delete op;
    delete kv.second;
  }
  for (WarpgroupState& w : s->wgs) {
    for (WgmmaOp* op : w.ops) delete op;
    delete w.gathering;
  }
  for (char* v : s->views) free(v);
  for (unsigned i = 0; i < B.nthreads; ++i) {
    ThreadSm90* ts = g_threads[i].sm90;
    if (ts == nullptr) continue;
    for (auto& g : ts->bulk_groups)
      for (TmaOp* op : g) delete op;
    for (TmaOp* op : ts->bulk_open) delete op;
    delete ts;
    g_threads[i].sm90 = nullptr;
  }
  delete s;
  B.sm90 = nullptr;
}

void sm90_check_generic_read(uint32_t addr, size_t bytes, const char* what, const char* file, int line) {
  if (g_block == nullptr || g_block->sm90 == nullptr || g_block->sm90->loads.empty()) return;
  Sm90Block& s = *g_block->sm90;
  for (uint32_t ch = addr / 16; ch < (addr + (uint32_t)bytes + 15) / 16; ++ch)
    if (ch < s.pending_tma.size() && s.pending_tma[ch]) {
      const TmaOp* op = pending_load_at(ch);
      fault("%s:%d: %s reads shared memory %s that the TMA load issued at %s has not written yet (wait on its "
            "mbarrier first)", base_name(file), line, what, alloc_where(addr).c_str(),
            op ? site(op->file, op->line).c_str() : "?");
    }
}

}  // namespace detail

using namespace detail;

// =====================================================================================================
// The instructions
// =====================================================================================================
namespace ptx {

uint32_t smem_of(uint64_t generic, const char* file, int line) {
  return cvta_to_shared(reinterpret_cast<const void*>(generic), file, line);
}

// [ptx] wgmma.fence.sync.aligned: orders the warpgroup's register accesses before wgmma.mma_async.
void wgmma_fence(const char* file, int line) {
  Gather* g = wg_arrive(kGFence, nullptr, "wgmma.fence.sync.aligned", file, line);
  if (!g) return;
  S().wgs[g->wg].fenced = true;
  wg_release(g);
}

// [ptx] wgmma.commit_group.sync.aligned: the uncommitted wgmma.mma_async of the warpgroup become one
// wgmma-group (an empty one if there are none).
void wgmma_commit(const char* file, int line) {
  Gather* g = wg_arrive(kGCommit, nullptr, "wgmma.commit_group.sync.aligned", file, line);
  if (!g) return;
  WarpgroupState& W = S().wgs[g->wg];
  const int64_t id = W.next_group++;
  for (WgmmaOp* op : W.ops)
    if (op->group < 0) op->group = id;
  W.groups.push_back(id);
  wg_release(g);
}

// [ptx] wgmma.wait_group.sync.aligned N: waits until at most N of the warpgroup's most recent
// wgmma-groups are pending; the older ones complete (here: their math happens now).
void wgmma_wait(int n, const char* file, int line) {
  if (n < 0 || n > 7)  // [ptx]: N is an integer constant (the emulator accepts 0..7)
    fault("%s:%d: wgmma.wait_group %d", base_name(file), line, n);
  Gather* g = wg_arrive(kGWait, &n, "wgmma.wait_group.sync.aligned", file, line);
  if (!g) return;
  WarpgroupState& W = S().wgs[g->wg];
  wgmma_wait_groups(W, n);
  W.fenced = false;
  wg_release(g);
}

void wgmma(int n, bool bf16, void* const* d, uint64_t desc_a, const uint32_t* a, uint64_t desc_b, int scale_d,
           int scale_a, int scale_b, int trans_a, int trans_b, const char* file, int line) {
  WgmmaArgs mine{n, bf16, d, desc_a, a, desc_b, scale_d ? 1 : 0, scale_a, scale_b, trans_a, trans_b};
  Gather* g = wg_arrive(kGMma, &mine, "wgmma.mma_async.sync.aligned", file, line);
  if (!g) return;
  Sm90Block& s = S();
  WarpgroupState& W = s.wgs[g->wg];
  const char* f = base_name(file);
  if (!W.fenced)
    fault("%s:%d: wgmma.mma_async without a wgmma.fence since the warpgroup's last wgmma.wait_group (PTX: "
          "wgmma.fence is required before the first wgmma.mma_async and between register accesses and the "
          "wgmma.mma_async that use those registers)", f, line);
  // .aligned: every thread executes the same instruction with the same descriptors
  for (int t = 1; t < 128; ++t) {
    const WgmmaArgs& o = *static_cast<const WgmmaArgs*>(g->data[t]);
    const WgmmaArgs& z = *static_cast<const WgmmaArgs*>(g->data[0]);
    if (o.desc_a != z.desc_a || o.desc_b != z.desc_b)
      fault("%s:%d: wgmma.mma_async: thread %d of warpgroup %u has descriptors (0x%016llx, 0x%016llx), thread 0 "
            "(0x%016llx, 0x%016llx): the contents of a matrix descriptor must be the same across the warpgroup",
            f, line, t, g->wg, (unsigned long long)o.desc_a, (unsigned long long)o.desc_b,
            (unsigned long long)z.desc_a, (unsigned long long)z.desc_b);
    if (o.scale_d != z.scale_d)
      fault("%s:%d: wgmma.mma_async: scale-d differs across the warpgroup (thread %d: %d, thread 0: %d)", f, line, t,
            o.scale_d, z.scale_d);
  }
  const WgmmaArgs& z = *static_cast<const WgmmaArgs*>(g->data[0]);
  if ((scale_a != 1 && scale_a != -1) || (scale_b != 1 && scale_b != -1) || (trans_a != 0 && trans_a != 1) ||
      (trans_b != 0 && trans_b != 1))
    fault("%s:%d: wgmma.mma_async: imm-scale-a/b must be 1 or -1 and imm-trans-a/b 0 or 1 (got %d, %d, %d, %d)", f,
          line, scale_a, scale_b, trans_a, trans_b);
  WgmmaOp* op = new WgmmaOp;
  op->id = s.next_id++;
  op->n = n, op->bf16 = bf16, op->scale_d = z.scale_d, op->sign = (double)(scale_a * scale_b);
  op->desc_a = desc_a, op->desc_b = desc_b, op->trans_a = trans_a, op->trans_b = trans_b, op->rs = a != nullptr;
  op->file = file, op->line = line;
  // operands
  op->a.resize(64 * 16);
  if (op->rs) {
    for (int t = 0; t < 128; ++t) {
      const uint32_t* r = static_cast<const WgmmaArgs*>(g->data[t])->a;
      for (int v = 0; v < 8; ++v) {
        int m, k;
        sm90::a_coord(t, v, &m, &k);
        op->a[m * 16 + k] = (uint16_t)(r[v / 2] >> (16 * (v % 2)));
      }
    }
  } else {
    desc_tile("A", desc_a, trans_a == 1, 64, op->a_addr, file, line);
    for (int i = 0; i < 64 * 16; ++i) op->a[i] = read16(op->a_addr[i]);
  }
  std::vector<uint32_t> baddr;
  desc_tile("B", desc_b, trans_b == 1, n, baddr, file, line);
  op->b.resize(16 * (size_t)n);
  op->b_addr.resize(16 * (size_t)n);
  for (int col = 0; col < n; ++col)
    for (int k = 0; k < 16; ++k) {
      op->b_addr[(size_t)k * n + col] = baddr[(size_t)col * 16 + k];
      op->b[(size_t)k * n + col] = read16(baddr[(size_t)col * 16 + k]);
    }
  for (uint32_t x : op->a_addr) op->chunks.push_back(x / 16);
  for (uint32_t x : op->b_addr) op->chunks.push_back(x / 16);
  std::sort(op->chunks.begin(), op->chunks.end());
  op->chunks.erase(std::unique(op->chunks.begin(), op->chunks.end()), op->chunks.end());
  // the async proxy reads them: no TMA load still on its way, no ordinary stores since fence.proxy.async
  for (uint32_t ch : op->chunks) {
    if (ch < s.pending_tma.size() && s.pending_tma[ch]) {
      const TmaOp* l = pending_load_at(ch);
      fault("%s:%d: wgmma.mma_async reads shared memory %s that the TMA load issued at %s has not written yet (wait "
            "on its mbarrier first)", f, line, alloc_where(ch * 16).c_str(), l ? site(l->file, l->line).c_str() : "?");
    }
    uint32_t bad = 0;
    if (!proxy_clean(ch * 16, 16, &bad))
      fault("%s:%d: wgmma.mma_async reads shared memory %s written by ordinary stores with no fence.proxy.async since "
            "(wgmma reads through the async proxy)", f, line, alloc_where(bad).c_str());
  }
  // accumulator registers and their inputs
  const int nv = n / 2;
  op->regs.resize((size_t)128 * nv);
  op->c.resize(op->regs.size());
  op->chained.assign(op->regs.size(), 0);
  std::unordered_map<void*, char> owned;
  const WgmmaOp* last = W.ops.empty() ? nullptr : W.ops.back();
  bool built = false;
  for (int t = 0; t < 128; ++t) {
    void* const* dr = static_cast<const WgmmaArgs*>(g->data[t])->d;
    for (int v = 0; v < nv; ++v) {
      const size_t idx = (size_t)t * nv + v;
      void* r = dr[v];
      op->regs[idx] = r;
      bool in_flight = false;
      if (last) {
        if (last->regs.size() == op->regs.size() && last->regs[idx] == r) {
          in_flight = true;
        } else {
          if (!built) {
            for (const WgmmaOp* o : W.ops)
              for (void* x : o->regs) owned[x] = 1;
            built = true;
          }
          in_flight = owned.count(r) != 0;
        }
      }
      op->chained[idx] = in_flight ? 1 : 0;
      if (!in_flight) std::memcpy(&op->c[idx], r, 4);
    }
  }
  if (g_cfg.wgmma_at_issue) {  // (nothing is ever in flight: no input is chained)
    wgmma_compute(*op);
    delete op;
  } else {
    for (void* r : op->regs) std::memcpy(r, &kAccPoison, 4);
    chunk_map(s.inflight_read, op->chunks.empty() ? 0 : op->chunks.back());
    for (uint32_t ch : op->chunks) s.inflight_read[ch]++;
    W.ops.push_back(op);
  }
  wg_release(g);
}

// [ptx] fence.proxy.async{.shared::cta}: bi-directional ordering between the generic proxy and the
// async proxy. The emulator publishes the current shared memory to the async-proxy view (all
// threads' ordinary stores so far: a sequentially consistent approximation).
void fence_proxy_async(const char* file, int line) {
  require_fiber("fence.proxy.async");
  (void)file, (void)line;
  for (size_t i = 0; i < g_block->allocs.size(); ++i) {
    const SharedAlloc& a = g_block->allocs[i];
    std::memcpy(view_of((int)i), a.host, a.size);
  }
}

void mbar_init(uint32_t addr, uint32_t count, const char* file, int line) {
  require_fiber("mbarrier.init");
  char* host = static_cast<char*>(shared_ptr(addr, 8, 8, "mbarrier.init", file, line));
  // [ptx] mbarrier.init: count in [1, 2^20 - 1]; init of a location holding a valid mbarrier is undefined
  if (count < 1 || count > (1u << 20) - 1)
    fault("%s:%d: mbarrier.init with count %u (must be in [1, 2^20 - 1])", base_name(file), line, count);
  Sm90Block& s = S();
  auto it = s.mbars.find(addr);
  if (it != s.mbars.end())
    fault("%s:%d: mbarrier.init of %s, which holds a live mbarrier (initialised at %s)",
          base_name(file), line, alloc_where(addr).c_str(), site(it->second->file, it->second->line).c_str());
  Mbar* b = new Mbar;
  b->addr = addr, b->expected = b->pending = count, b->file = file, b->line = line;
  s.mbars[addr] = b;
  const uint64_t sig = kMbarSig ^ addr;
  std::memcpy(host, &sig, 8);
}

// [ptx] mbarrier.arrive{.expect_tx}: expect-tx (tx-count += tx) then arrive-on (pending count - 1);
// returns a state token (here the phase it arrived in).
uint64_t mbar_arrive(uint32_t addr, uint32_t tx, const char* file, int line) {
  Mbar& b = *mbar_at(addr, "mbarrier.arrive", file, line);
  if (tx) {
    b.tx += tx;
    if (b.tx > (1 << 20) - 1)
      fault("%s:%d: mbarrier at %s: tx-count %lld above 2^20 - 1", base_name(file), line, alloc_where(addr).c_str(),
            (long long)b.tx);
  }
  if (b.pending == 0)
    fault("%s:%d: mbarrier arrive-count underflow on %s: all %u arrivals of %s have happened already",
          base_name(file), line, alloc_where(addr).c_str(), b.expected, mbar_state(b).c_str());
  const uint64_t state = b.phase;
  b.pending--;
  b.version++;
  mbar_phase_check(b);
  return state;
}

void mbar_expect_tx(uint32_t addr, uint32_t tx, const char* file, int line) {
  Mbar& b = *mbar_at(addr, "mbarrier.expect_tx", file, line);
  b.tx += tx;
  if (b.tx > (1 << 20) - 1)
    fault("%s:%d: mbarrier at %s: tx-count %lld above 2^20 - 1", base_name(file), line, alloc_where(addr).c_str(),
          (long long)b.tx);
  b.version++;
}

bool mbar_try_wait_parity(uint32_t addr, uint32_t parity, const char* file, int line) {
  Thread* t = require_fiber("mbarrier.try_wait");
  Mbar* b = mbar_at(addr, "mbarrier.try_wait.parity", file, line);
  parity &= 1;
  auto done = [&] { return (b->phase & 1) != parity; };
  if (!done()) mbar_complete_late(*b);
  if (done()) return true;
  // not complete: the fiber yields until the barrier changes (a deadlock if it never does)
  ThreadSm90& ts = TS(t);
  ts.spin = b, ts.spin_version = b->version, ts.spin_parity = parity, ts.spin_file = file, ts.spin_line = line;
  t->st = St::Spin;
  yield_fiber();
  t->st = St::Ready;
  ts.spin = nullptr;
  if (!done()) mbar_complete_late(*b);
  return done();
}

// [ptx] cp.async.bulk.tensor.Nd.shared::cluster.global.mbarrier::complete_tx::bytes [dst], [tmap, {c}], [mbar]
// (a cluster of one CTA: shared::cluster is this CTA's shared memory). The box's bytes (the whole box,
// out-of-bounds elements included) complete on the mbarrier; out-of-bounds elements are filled with
// zeros (or NaN with CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA).
void tma_load(int rank, uint32_t dst, const void* tmap, const int32_t* coords, uint32_t mbar, const char* file,
              int line) {
  require_fiber("cp.async.bulk.tensor");
  TensorMap m;
  validate_tma("cp.async.bulk.tensor (load)", rank, tmap, dst, &m, file, line);
  Mbar& b = *mbar_at(mbar, "cp.async.bulk.tensor (its mbarrier)", file, line);
  Sm90Block& s = S();
  TmaOp* op = new TmaOp;
  op->id = s.next_id++, op->load = true, op->rank = rank, op->smem = dst, op->mbar = mbar, op->bytes = box_bytes(m);
  op->file = file, op->line = line;
  std::memcpy(op->c, coords, sizeof op->c);
  std::memcpy(&op->map, tmap, sizeof op->map);
  chunk_map(s.pending_tma, (dst + (uint32_t)op->bytes) / 16);
  chunk_map(s.inflight_read, (dst + (uint32_t)op->bytes) / 16);
  for (uint32_t ch = dst / 16; ch < (dst + op->bytes) / 16; ++ch) {
    if (s.inflight_read[ch])
      fault("%s:%d: TMA load into shared memory %s that %s reads (the stage is still being read)", base_name(file),
            line, alloc_where(ch * 16).c_str(), reader_at(ch).c_str());
    s.pending_tma[ch]++;
  }
  s.loads.push_back(op);
  if (g_cfg.tma_at_issue) {
    tma_perform_load(op);
    b.tx -= (int64_t)op->bytes;
    delete op;
    b.version++;
    if (b.tx < -((1 << 20) - 1))
      fault("%s:%d: mbarrier at %s: tx-count below -(2^20 - 1)", base_name(file), line, alloc_where(mbar).c_str());
    mbar_phase_check(b);
  } else {
    b.inflight.push_back(op);
    b.inflight_bytes += (int64_t)op->bytes;
    b.version++;
  }
}

// [ptx] cp.async.bulk.tensor.Nd.global.shared::cta.bulk_group [tmap, {c}], [src]: out-of-bounds
// elements are not written. Performed at cp.async.bulk.wait_group(.read) (or when the thread exits).
void tma_store(int rank, const void* tmap, const int32_t* coords, uint32_t src, const char* file, int line) {
  Thread* t = require_fiber("cp.async.bulk.tensor");
  TensorMap m;
  validate_tma("cp.async.bulk.tensor (store)", rank, tmap, src, &m, file, line);
  // [ptx] 9.7.9.25.5.1: for the .global.shared::cta direction the starting coordinates must be non-negative
  for (int i = 0; i < rank; ++i)
    if (coords[i] < 0)
      fault("%s:%d: TMA store with a negative coordinate (c%d = %d): a store's box must start at non-negative "
            "coordinates", base_name(file), line, i, coords[i]);
  Sm90Block& s = S();
  TmaOp* op = new TmaOp;
  op->id = s.next_id++, op->load = false, op->rank = rank, op->smem = src, op->bytes = box_bytes(m);
  op->file = file, op->line = line;
  std::memcpy(op->c, coords, sizeof op->c);
  std::memcpy(&op->map, tmap, sizeof op->map);
  chunk_map(s.pending_tma, (src + (uint32_t)op->bytes) / 16);
  chunk_map(s.inflight_read, (src + (uint32_t)op->bytes) / 16);
  for (uint32_t ch = src / 16; ch < (src + op->bytes) / 16; ++ch) {
    if (s.pending_tma[ch]) {
      const TmaOp* l = pending_load_at(ch);
      fault("%s:%d: TMA store reads shared memory %s that the TMA load issued at %s has not written yet",
            base_name(file), line, alloc_where(ch * 16).c_str(), l ? site(l->file, l->line).c_str() : "?");
    }
    uint32_t bad = 0;
    if (!proxy_clean(ch * 16, 16, &bad))
      fault("%s:%d: TMA store reads shared memory %s written by ordinary stores with no fence.proxy.async since (TMA "
            "reads through the async proxy)", base_name(file), line, alloc_where(bad).c_str());
  }
  const int ai = alloc_index(src, op->bytes);
  const SharedAlloc& a = g_block->allocs[ai];
  op->src.assign(a.host + (src - a.base), a.host + (src - a.base) + op->bytes);
  for (uint32_t ch = src / 16; ch < (src + op->bytes) / 16; ++ch) s.inflight_read[ch]++;
  if (g_cfg.tma_at_issue) {
    tma_perform_store(op);
    delete op;
    return;
  }
  TS(t).bulk_open.push_back(op);
}

// [ptx] cp.async.bulk.commit_group / wait_group{.read} N: per-thread bulk async-groups.
void bulk_commit(const char* file, int line) {
  Thread* t = require_fiber("cp.async.bulk.commit_group");
  (void)file, (void)line;
  ThreadSm90& ts = TS(t);
  ts.bulk_groups.push_back(std::move(ts.bulk_open));
  ts.bulk_open.clear();
}

void bulk_wait(int n, bool read, const char* file, int line) {
  Thread* t = require_fiber("cp.async.bulk.wait_group");
  (void)read;
  if (n < 0) fault("%s:%d: cp.async.bulk.wait_group %d", base_name(file), line, n);
  ThreadSm90& ts = TS(t);
  while ((int)ts.bulk_groups.size() > n) {
    for (TmaOp* op : ts.bulk_groups.front()) {
      tma_perform_store(op);
      delete op;
    }
    ts.bulk_groups.pop_front();
  }
}

void prefetch_tensormap(const void* tmap, const char* file, int line) {
  require_fiber("prefetch.tensormap");
  S();
  TensorMap m;
  if (!decode_tmap(tmap, &m))
    fault("%s:%d: prefetch.tensormap of a tensor map that cuTensorMapEncodeTiled did not encode", base_name(file),
          line);
}

void named_barrier(int id, int count, bool sync, const char* file, int line) {
  Thread* t = require_fiber("bar.sync");
  Block& B = *g_block;
  const char* what = sync ? "bar.sync" : "bar.arrive";
  if (id < 0 || id > 15) fault("%s:%d: %s %d: barrier ids are 0..15", base_name(file), line, what, id);
  if (id == 0 && count < 0 && sync) {  // bar.sync 0 = __syncthreads
    syncthreads(file, line);
    return;
  }
  if (id == 0)
    fault("%s:%d: %s 0, %d: barrier 0 is __syncthreads' (named barriers with a count are 1..15 here)",
          base_name(file), line, what, count);
  const unsigned nwarps = (unsigned)B.warps.size();
  if (count < 0) count = (int)nwarps * 32;
  if (count <= 0 || count % 32 != 0 || (unsigned)count > nwarps * 32)
    fault("%s:%d: %s %d, %d: the thread count must be a positive multiple of 32 of at most the block's %u threads",
          base_name(file), line, what, id, count, B.nthreads);
  NamedBar& nb = S(false).bars[id];
  if (nb.count == 0) {
    nb.count = count, nb.file = file, nb.line = line, nb.warps_arrived = 0;
    nb.lanes.assign(nwarps, 0);
    nb.warp_done.assign(nwarps, 0);
  } else if (nb.count != count) {
    fault("%s:%d: named barrier %d used with thread count %d while its current phase (begun at %s:%d) counts %d",
          base_name(file), line, id, count, base_name(nb.file), nb.line, nb.count);
  }
  const unsigned bit = 1u << t->lane;
  if (nb.warp_done[t->warp] || (nb.lanes[t->warp] & bit))
    fault("%s:%d: warp %u arrives again at named barrier %d before it completed (PTX: keep a warp from executing "
          "more barrier instructions on a barrier than intended before it resets)", base_name(file), line, t->warp,
          id);
  nb.lanes[t->warp] |= bit;
  named_barrier_check(id);
  if (!sync || nb.count == 0 || !(nb.lanes[t->warp] & bit)) return;  // arrived, or the barrier completed
  t->st = St::WaitGroup;
  TS(t).named_bar = id;
  yield_fiber();
}

// [ptx] setmaxnreg.{inc,dec}.sync.aligned.u32 N: N in [24, 256], a multiple of 8; executed by all warps of
// the warpgroup; .dec must not raise and .inc must not lower the count; .inc blocks until the CTA's
// pool has the registers.
void setmaxnreg(bool inc, int n, const char* file, int line) {
  const char* what = inc ? "setmaxnreg.inc.sync.aligned.u32" : "setmaxnreg.dec.sync.aligned.u32";
  if (n < 24 || n > 256 || n % 8 != 0)
    fault("%s:%d: %s %d: the register count must be in [24, 256] and a multiple of 8", base_name(file), line, what, n);
  Gather* g = wg_arrive(kGSetmaxnreg, nullptr, what, file, line);
  if (!g) return;
  Sm90Block& s = S();
  WarpgroupState& W = s.wgs[g->wg];
  // (the launch's register count is unknown here: the direction is checked once a setmaxnreg set it)
  if (W.regs_known && inc && n < W.regs)
    fault("%s:%d: %s %d below the warpgroup's current %d registers per thread", base_name(file), line, what, n, W.regs);
  if (W.regs_known && !inc && n > W.regs)
    fault("%s:%d: %s %d above the warpgroup's current %d registers per thread", base_name(file), line, what, n, W.regs);
  W.regs_known = true;
  auto used = [&] {
    long u = 0;
    for (const WarpgroupState& w : s.wgs) u += (long)w.regs * 128;
    return u;
  };
  const long pool = (long)s.regs_init * 128 * (long)s.wgs.size();
  if (!inc) {
    W.regs = n;
    wg_release(g);
    // blocked increases may now fit
    for (size_t i = 0; i < s.waiting_inc.size();) {
      Gather* w = s.waiting_inc[i];
      WarpgroupState& X = s.wgs[w->wg];
      if (used() - (long)X.regs * 128 + (long)w->want_regs * 128 <= pool) {
        X.regs = w->want_regs;
        s.waiting_inc.erase(s.waiting_inc.begin() + (long)i);
        for (unsigned k = 0; k < 128; ++k) {
          Thread& o = g_threads[w->wg * 128 + k];
          o.st = St::Ready;
          o.sm90->gather = nullptr;
        }
        delete w;
      } else {
        ++i;
      }
    }
    return;
  }
  if (used() - (long)W.regs * 128 + (long)n * 128 <= pool) {
    W.regs = n;
    wg_release(g);
    return;
  }
  g->blocked = true, g->want_regs = n;
  s.waiting_inc.push_back(g);
  Thread* t = g_cur;
  t->st = St::WaitGroup;
  TS(t).gather = g;
  yield_fiber();
}

// [ptx] elect.sync d|p, membermask: one leader among the threads of membermask, deterministic. Which one
// the PTX ISA does not say; the emulator elects the lowest lane of the mask.
uint32_t elect_sync(uint32_t mask, bool* pred, const char* file, int line) {
  require_fiber("elect.sync");
  S();
  warp_collective(mask, kElect, nullptr, 0, file, line);
  const uint32_t leader = (uint32_t)std::countr_zero(mask);
  *pred = lane_id() == leader;
  return leader;
}

// [ptx] stmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16: the inverse of ldmatrix (lanes 8i..8i+7
// give the row addresses of matrix i; without .trans lane l holds row l/4, elements 2(l%4), 2(l%4)+1 of
// each matrix, with .trans elements (2(l%4), l/4) and (2(l%4)+1, l/4)).
void stmatrix(int num, bool trans, uint32_t addr, const uint32_t* regs, const char* file, int line) {
  Thread* t = require_fiber("stmatrix");
  S();
  struct {
    uint32_t addr;
    int num, trans;
  } mine{addr, num, trans ? 1 : 0};
  const unsigned char* sl = warp_collective(0xffffffffu, kStmatrix, &mine, sizeof mine, file, line);
  const unsigned l = t->lane;
  for (int i = 0; i < num; ++i)
    for (int h = 0; h < 2; ++h) {
      const int row = trans ? 2 * (int)(l % 4) + h : (int)(l / 4);
      const int col = trans ? (int)(l / 4) : 2 * (int)(l % 4) + h;
      decltype(mine) src;
      std::memcpy(&src, sl + (8 * i + row) * kSlot, sizeof src);
      if (src.num != num || src.trans != mine.trans)
        fault("%s:%d: lanes of one stmatrix disagree on its shape", base_name(file), line);
      char* p = static_cast<char*>(shared_ptr(src.addr, 16, 16, "stmatrix row", file, line));
      const uint16_t e = (uint16_t)(regs[i] >> (16 * h));
      std::memcpy(p + 2 * col, &e, 2);
    }
}

}  // namespace ptx
}  // namespace gptk_emu

// =====================================================================================================
// Host API: tensor maps and the driver entry point
// =====================================================================================================
namespace {
std::string g_api_log;  // why the last emulated driver call failed

CUresult encode_fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
CUresult encode_fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  g_api_log = "cuTensorMapEncodeTiled: " + gptk_emu::detail::vformat(fmt, ap);
  va_end(ap);
  return CUDA_ERROR_INVALID_VALUE;
}
}  // namespace

// The requirements are those cuda.h (CUDA 13.0, /usr/local/cuda/include/cuda.h) documents for
// cuTensorMapEncodeTiled: tensorMap 64-byte aligned (line 23248), rank 1..5 (23275), globalAddress
// 16-byte aligned (23278), globalDim in [1, 2^32] (23282), globalStrides multiples of 16 below 2^40
// (23288-23289), boxDim in [1, 256] with boxDim[0] * element size a multiple of 16 (23300-23302),
// elementStrides in [1, 8] (23305), the box inner dimension at most the swizzle span (23322-23326), the
// NaN fill for floating-point types only (23375). A violation returns CUDA_ERROR_INVALID_VALUE (the
// reason: gptk_emu_api_log()). Interleaved layouts, the packed 4/6-bit types and the 128B_ATOM
// swizzles are not emulated (also CUDA_ERROR_INVALID_VALUE).
CUresult cuTensorMapEncodeTiled(CUtensorMap* tensorMap, CUtensorMapDataType tensorDataType, cuuint32_t tensorRank,
                                void* globalAddress, const cuuint64_t* globalDim, const cuuint64_t* globalStrides,
                                const cuuint32_t* boxDim, const cuuint32_t* elementStrides,
                                CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                                CUtensorMapL2promotion l2Promotion, CUtensorMapFloatOOBfill oobFill) {
  using namespace gptk_emu::detail;
  g_api_log.clear();
  if (tensorMap == nullptr || globalDim == nullptr || boxDim == nullptr || elementStrides == nullptr)
    return encode_fail("null argument");
  if (reinterpret_cast<uintptr_t>(tensorMap) % 64 != 0) return encode_fail("tensorMap address not 64-byte aligned");
  const int esize = dtype_size((int)tensorDataType);
  if ((int)tensorDataType < 0 || (int)tensorDataType > (int)CU_TENSOR_MAP_DATA_TYPE_16U6_ALIGN16B)
    return encode_fail("tensorDataType %d is not a CUtensorMapDataType", (int)tensorDataType);
  if (esize == 0) return encode_fail("the packed 4/6-bit tensorDataType %d is not emulated", (int)tensorDataType);
  if (tensorRank < 1 || tensorRank > 5) return encode_fail("tensorRank %u is not in [1, 5]", tensorRank);
  if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE)
    return encode_fail("interleave %d: interleaved layouts are not emulated", (int)interleave);
  if (reinterpret_cast<uintptr_t>(globalAddress) % 16 != 0)
    return encode_fail("globalAddress %p is not 16-byte aligned", globalAddress);
  if (tensorRank > 1 && globalStrides == nullptr) return encode_fail("null globalStrides");
  for (cuuint32_t i = 0; i < tensorRank; ++i)
    if (globalDim[i] == 0 || globalDim[i] > (1ull << 32))
      return encode_fail("globalDim[%u] = %llu is not in [1, 2^32]", i, (unsigned long long)globalDim[i]);
  for (cuuint32_t i = 0; i + 1 < tensorRank; ++i)
    if (globalStrides[i] % 16 != 0 || globalStrides[i] >= (1ull << 40))
      return encode_fail("globalStrides[%u] = %llu is not a multiple of 16 below 2^40", i,
                         (unsigned long long)globalStrides[i]);
  for (cuuint32_t i = 0; i < tensorRank; ++i) {
    if (boxDim[i] == 0 || boxDim[i] > 256) return encode_fail("boxDim[%u] = %u is not in [1, 256]", i, boxDim[i]);
    if (elementStrides[i] == 0 || elementStrides[i] > 8)
      return encode_fail("elementStrides[%u] = %u is not in [1, 8]", i, elementStrides[i]);
  }
  if (boxDim[0] * (cuuint32_t)esize % 16 != 0)
    return encode_fail("boxDim[0] * element size = %u bytes is not a multiple of 16", boxDim[0] * (cuuint32_t)esize);
  if ((int)swizzle < 0 || (int)swizzle > (int)CU_TENSOR_MAP_SWIZZLE_128B_ATOM_64B)
    return encode_fail("swizzle %d is not a CUtensorMapSwizzle", (int)swizzle);
  if ((int)swizzle > (int)CU_TENSOR_MAP_SWIZZLE_128B)
    return encode_fail("swizzle %d (a 128B_ATOM mode) is not emulated", (int)swizzle);
  if (swizzle != CU_TENSOR_MAP_SWIZZLE_NONE) {
    const cuuint32_t span = 16u << tma_swizzle_bits((int)swizzle);
    if (boxDim[0] * (cuuint32_t)esize > span)
      return encode_fail("the box inner dimension (boxDim[0] * element size = %u bytes) exceeds the %u-byte swizzle "
                         "span", boxDim[0] * (cuuint32_t)esize, span);
  }
  if ((int)l2Promotion < 0 || (int)l2Promotion > (int)CU_TENSOR_MAP_L2_PROMOTION_L2_256B)
    return encode_fail("l2Promotion %d is not a CUtensorMapL2promotion", (int)l2Promotion);
  if ((int)oobFill < 0 || (int)oobFill > (int)CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA)
    return encode_fail("oobFill %d is not a CUtensorMapFloatOOBfill", (int)oobFill);
  if (oobFill == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA && !dtype_float((int)tensorDataType))
    return encode_fail("the NaN out-of-bounds fill needs a floating-point tensorDataType");
  uint64_t* q = tensorMap->opaque;
  std::memset(q, 0, sizeof tensorMap->opaque);
  q[0] = kTmapMagic | (uint64_t)tensorDataType << 32 | (uint64_t)tensorRank << 40 | (uint64_t)swizzle << 44 |
         (uint64_t)l2Promotion << 48 | (uint64_t)oobFill << 52 | (uint64_t)interleave << 56;
  q[1] = reinterpret_cast<uint64_t>(globalAddress);
  for (cuuint32_t i = 0; i < tensorRank; ++i) {
    q[2 + i] = globalDim[i];
    if (i > 0) q[7 + i - 1] = globalStrides[i - 1];
    q[11] |= (uint64_t)(boxDim[i] - 1) << (8 * i) | (uint64_t)(elementStrides[i] - 1) << (40 + 3 * i);
  }
  return CUDA_SUCCESS;
}

cudaError_t cudaGetDriverEntryPoint(const char* symbol, void** funcPtr, unsigned long long flags,
                                    cudaDriverEntryPointQueryResult* driverStatus) {
  (void)flags;
  if (symbol == nullptr || funcPtr == nullptr) return cudaErrorInvalidValue;
  const bool found = std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0;
  *funcPtr = found ? reinterpret_cast<void*>(&cuTensorMapEncodeTiled) : nullptr;
  if (driverStatus) *driverStatus = found ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}
cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** funcPtr, unsigned int cudaVersion,
                                             unsigned long long flags, cudaDriverEntryPointQueryResult* driverStatus) {
  if (cudaVersion < 12000) {  // cuTensorMapEncodeTiled appeared in CUDA 12.0
    if (funcPtr) *funcPtr = nullptr;
    if (driverStatus) *driverStatus = cudaDriverEntryPointVersionNotSufficent;
    return cudaSuccess;
  }
  return cudaGetDriverEntryPoint(symbol, funcPtr, flags, driverStatus);
}

// ---- for the layout test (tests/emulator/test_emulator_sm90.py) --------------------------------------------
extern "C" {
__attribute__((visibility("default"))) const char* gptk_emu_api_log() { return g_api_log.c_str(); }

// The shared addresses of the rows x 16 operand tile a descriptor describes: out[mn * 16 + k].
__attribute__((visibility("default"))) void gptk_emu_sm90_desc_addrs(uint64_t desc, int mn_major, int rows,
                                                                     uint32_t* out) {
  const gptk_emu::detail::sm90::Desc d = gptk_emu::detail::sm90::decode_desc(desc);
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < 16; ++k) out[r * 16 + k] = gptk_emu::detail::sm90::desc_addr(d, mn_major != 0, r, k);
}
// Fragment maps: which = 0 the accumulator of m64nNk16 (128 x n/2 values), 1 the register A operand
// (128 x 8 16-bit values): row[t * nv + v], col[t * nv + v].
__attribute__((visibility("default"))) void gptk_emu_sm90_fragment(int which, int n, int* row, int* col) {
  const int nv = which == 0 ? n / 2 : 8;
  for (int t = 0; t < 128; ++t)
    for (int v = 0; v < nv; ++v) {
      if (which == 0) gptk_emu::detail::sm90::d_coord(t, v, &row[t * nv + v], &col[t * nv + v]);
      else gptk_emu::detail::sm90::a_coord(t, v, &row[t * nv + v], &col[t * nv + v]);
    }
}
// The shared address of each 16-byte chunk of a TMA box (dense, then swizzled): out[chunk].
__attribute__((visibility("default"))) void gptk_emu_sm90_tma_chunks(int swizzle, uint32_t smem, int nchunks,
                                                                     uint32_t* out) {
  const int b = gptk_emu::detail::tma_swizzle_bits(swizzle);
  for (int c = 0; c < nchunks; ++c) out[c] = gptk_emu::detail::sm90::swizzle(smem + 16u * (uint32_t)c, b);
}
}
