// emu_selftest_sm90.cu: kernels that test the emulator's sm_90 instructions (the "sm90" cases of
// tests/emulator/test_emulator_sm90.py): wgmma (SS and RS, bf16 and fp16, several N, swizzle none /
// 32B / 64B / 128B, K-major and transposed operands through descriptors, chained accumulators, commit
// groups), TMA loads and stores of 2..5-d boxes with out-of-bounds fill and clipping, mbarrier phases,
// named barriers, setmaxnreg, elect.sync, stmatrix, fence.proxy.async, a warp-specialised producer /
// consumer pipeline, and deliberate misuses the emulator must report. Plain CUDA (sm_90a PTX as inline
// asm, one instruction form per asm statement as the kernel contract asks); the extern "C" functions
// at the end are the tests' entry points.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#define ST_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// ---- PTX wrappers -------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(uint64_t* b, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* b, uint32_t tx) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)), "r"(tx) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* b, uint32_t tx) {
  asm volatile("mbarrier.expect_tx.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(tx) : "memory");
}
__device__ __forceinline__ uint64_t mbar_arrive_state(uint64_t* b) {
  uint64_t state;
  asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];" : "=l"(state) : "r"(smem_u32(b)) : "memory");
  return state;
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint64_t* b, uint32_t parity) {
  uint32_t ok;
  asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.b32 %0, 1, 0, p; }"
               : "=r"(ok)
               : "r"(smem_u32(b)), "r"(parity)
               : "memory");
  return ok != 0;
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, uint32_t parity) {
  while (!mbar_try_wait(b, parity)) {
  }
}
__device__ __forceinline__ void fence_mbarrier_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* m, uint64_t* b, int rank, const int* c) {
  const uint32_t d = smem_u32(dst), bar = smem_u32(b);
  const uint64_t mp = reinterpret_cast<uint64_t>(m);
  if (rank == 2)
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
                 ::"r"(d), "l"(mp), "r"(bar), "r"(c[0]), "r"(c[1]) : "memory");
  else if (rank == 3)
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];"
                 ::"r"(d), "l"(mp), "r"(bar), "r"(c[0]), "r"(c[1]), "r"(c[2]) : "memory");
  else if (rank == 4)
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];"
                 ::"r"(d), "l"(mp), "r"(bar), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]) : "memory");
  else
    asm volatile("cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6, %7}], [%2];"
                 ::"r"(d), "l"(mp), "r"(bar), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]), "r"(c[4]) : "memory");
}
__device__ __forceinline__ void tma_store(const CUtensorMap* m, const void* src, int rank, const int* c) {
  const uint32_t s = smem_u32(src);
  const uint64_t mp = reinterpret_cast<uint64_t>(m);
  if (rank == 2)
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];"
                 ::"l"(mp), "r"(s), "r"(c[0]), "r"(c[1]) : "memory");
  else if (rank == 3)
    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];"
                 ::"l"(mp), "r"(s), "r"(c[0]), "r"(c[1]), "r"(c[2]) : "memory");
  else if (rank == 4)
    asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];"
                 ::"l"(mp), "r"(s), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]) : "memory");
  else
    asm volatile("cp.async.bulk.tensor.5d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5, %6}], [%1];"
                 ::"l"(mp), "r"(s), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]), "r"(c[4]) : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_read0() { asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(0) : "memory"); }
__device__ __forceinline__ void bulk_wait0() { asm volatile("cp.async.bulk.wait_group %0;" ::"n"(0) : "memory"); }
__device__ __forceinline__ void prefetch_tmap(const CUtensorMap* m) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(m)) : "memory");
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory"); }
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
}
__device__ __forceinline__ bool elect_one() {
  uint32_t pred = 0, lane = 0;
  asm volatile("{ .reg .b32 %%rx; .reg .pred %%px; elect.sync %%rx|%%px, %2; @%%px mov.s32 %1, 1; mov.s32 %0, %%rx; }"
               : "+r"(lane), "+r"(pred)
               : "r"(0xffffffffu));
  return pred != 0;
}
__device__ __forceinline__ void stmatrix_x4(void* row_addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};"
               ::"r"(smem_u32(row_addr)), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory");
}
__device__ __forceinline__ void stmatrix_x2_trans(void* row_addr, uint32_t r0, uint32_t r1) {
  asm volatile("stmatrix.sync.aligned.m8n8.x2.trans.shared.b16 [%0], {%1, %2};" ::"r"(smem_u32(row_addr)), "r"(r0),
               "r"(r1) : "memory");
}

// Shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address, leading and
// stride byte offsets in 16-byte units, layout type 0 none / 1 128B / 2 64B / 3 32B in bits 62-63.
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo, int layout) {
  return (uint64_t)((addr & 0x3ffff) >> 4) | (uint64_t)((lbo & 0x3ffff) >> 4) << 16 |
         (uint64_t)((sbo & 0x3ffff) >> 4) << 32 | (uint64_t)layout << 62;
}
__device__ __forceinline__ int layout_of_span(int span) { return span == 128 ? 1 : span == 64 ? 2 : span == 32 ? 3 : 0; }

// The warpgroup's accumulator fragment: value v of thread t holds D[row][col].
__device__ __forceinline__ int frag_row(int t, int v) { return (t % 32) / 4 + 16 * (t / 32) + 8 * ((v / 2) % 2); }
__device__ __forceinline__ int frag_col(int t, int v) { return 2 * (t % 4) + v % 2 + 8 * (v / 4); }

// ---- wgmma wrappers (spelled out: one asm statement per shape) --------------------------------------
template <bool BF16, int SA, int SB, int TA, int TB>
__device__ __forceinline__ void wgmma_ss8(float (&d)[4], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (BF16)
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %6, 0; "
        "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3}, "
        "%4, %5, p, %7, %8, %9, %10; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB));
  else
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %6, 0; "
        "wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 "
        "{%0, %1, %2, %3}, "
        "%4, %5, p, %7, %8, %9, %10; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB));
}
template <bool BF16, int SA, int SB, int TA, int TB>
__device__ __forceinline__ void wgmma_ss24(float (&d)[12], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (BF16)
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %14, 0; "
        "wgmma.mma_async.sync.aligned.m64n24k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11}, "
        "%12, %13, p, %15, %16, %17, %18; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11])
        : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB));
  else
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %14, 0; "
        "wgmma.mma_async.sync.aligned.m64n24k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11}, "
        "%12, %13, p, %15, %16, %17, %18; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11])
        : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB));
}
template <bool BF16, int SA, int SB, int TA, int TB>
__device__ __forceinline__ void wgmma_ss64(float (&d)[32], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (BF16)
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %34, 0; "
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, %35, %36, %37, %38; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB));
  else
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %34, 0; "
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, %35, %36, %37, %38; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB));
}
template <bool BF16, int SA, int SB, int TA, int TB>
__device__ __forceinline__ void wgmma_ss128(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (BF16)
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %66, 0; "
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, %67, %68, %69, %70; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB));
  else
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %66, 0; "
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, %67, %68, %69, %70; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB));
}
template <bool BF16, int SA, int SB, int TA, int TB>
__device__ __forceinline__ void wgmma_ss256(float (&d)[128], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (BF16)
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %130, 0; "
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, p, %131, %132, %133, %134; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB));
  else
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %130, 0; "
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, p, %131, %132, %133, %134; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB));
}
template <bool BF16, int SA, int SB, int TB>
__device__ __forceinline__ void wgmma_rs16(float (&d)[8], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  if constexpr (BF16)
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %13, 0; "
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, "
        "{%8, %9, %10, %11}, %12, p, %14, %15, %16; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TB));
  else
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %13, 0; "
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, "
        "{%8, %9, %10, %11}, %12, p, %14, %15, %16; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TB));
}
template <bool BF16, int SA, int SB, int TB>
__device__ __forceinline__ void wgmma_rs64(float (&d)[32], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  if constexpr (BF16)
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %37, 0; "
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, %38, %39, %40; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TB));
  else
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %37, 0; "
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, %38, %39, %40; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TB));
}
template <bool BF16, int SA, int SB, int TB>
__device__ __forceinline__ void wgmma_rs128(float (&d)[64], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  if constexpr (BF16)
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %69, 0; "
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, %70, %71, %72; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TB));
  else
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %69, 0; "
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, %70, %71, %72; }"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(SA), "n"(SB), "n"(TB));
}

// m64n64k16 bf16 with scale-d as an immediate (0: D = A B, 1: D += A B)
template <int SD>
__device__ __forceinline__ void wgmma_ss64_imm(float (&d)[32], uint64_t da, uint64_t db) {
  if constexpr (SD)
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "
        "%23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, 1, 1, 1, 0, 0;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
          "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db));
  else
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "
        "%23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, 0, 1, 1, 0, 0;"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
          "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db));
}

template <int N, bool BF16, int SA, int SB, int TA, int TB>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, int sd) {
  if constexpr (N == 8) wgmma_ss8<BF16, SA, SB, TA, TB>(d, da, db, sd);
  else if constexpr (N == 24) wgmma_ss24<BF16, SA, SB, TA, TB>(d, da, db, sd);
  else if constexpr (N == 64) wgmma_ss64<BF16, SA, SB, TA, TB>(d, da, db, sd);
  else if constexpr (N == 128) wgmma_ss128<BF16, SA, SB, TA, TB>(d, da, db, sd);
  else wgmma_ss256<BF16, SA, SB, TA, TB>(d, da, db, sd);
}
template <int N, bool BF16, int SA, int SB, int TB>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db, int sd) {
  if constexpr (N == 16) wgmma_rs16<BF16, SA, SB, TB>(d, a, db, sd);
  else if constexpr (N == 64) wgmma_rs64<BF16, SA, SB, TB>(d, a, db, sd);
  else wgmma_rs128<BF16, SA, SB, TB>(d, a, db, sd);
}

// ---- operand tiles -----------------------------------------------------------------------------------
// An operand of `rows` M (or N) rows and K = 64, loaded by TMA boxes of `span` bytes along its
// contiguous dimension (span 128 / 64 / 32 with that swizzle, 16 without): K-major boxes {span/2 of K,
// rows}, one region per K slice; MN-major boxes {span/2 of MN, 64 of K}, one region per MN slice.
// The descriptor of k-step kk (k = 16 kk .. 16 kk + 15) follows the canonical layouts.
__device__ __forceinline__ uint64_t operand_desc(uint32_t base, int rows, int span, int mn_major, int kk) {
  const int k0 = 16 * kk;
  if (!mn_major) {
    if (span == 16) return make_desc(base + (uint32_t)((k0 / 8) * rows * 16), (uint32_t)rows * 16, 128, 0);
    return make_desc(base + (uint32_t)((k0 * 2 / span) * rows * span + (k0 * 2) % span), 16, 8u * span,
                     layout_of_span(span));
  }
  if (span == 16) return make_desc(base + (uint32_t)k0 * 16, 128, 64 * 16, 0);
  return make_desc(base + (uint32_t)(k0 * span), 64u * span, 8u * span, layout_of_span(span));
}
__host__ __device__ inline int operand_boxes(int rows, int span, int mn_major) {
  return mn_major ? (rows + span / 2 - 1) / (span / 2) : 128 / span;
}
__host__ __device__ inline int operand_box_bytes(int rows, int span, int mn_major) {
  return mn_major ? 64 * span : rows * span;
}

// D (64 x N, fp32) = [C +] (SA x A) (64 x 64) . B (64 x N), one warpgroup, K in 4 wgmma k-steps (in
// two commit groups when split). A is K-major [64][64] (TA = 0) or MN-major [64 (K)][64 (M)], or, with
// RS, comes from registers (a_rowmajor [64][64]); B is K-major [N][64] (TB = 0) or MN-major [64][N].
template <int N, bool BF16, int SA, int TA, int TB, bool RS>
__global__ void __launch_bounds__(128) gemm_kernel(const __grid_constant__ CUtensorMap map_a,
                                                   const __grid_constant__ CUtensorMap map_b,
                                                   const uint16_t* a_rowmajor, const float* c_in, float* d_out,
                                                   int span, int split) {
  extern __shared__ __align__(1024) unsigned char smem[];
  const int t = threadIdx.x;
  const uint32_t a_base = smem_u32(smem), b_base = a_base + 64 * 64 * 2;
  const int nb = operand_boxes(N, span, TB), b_box = operand_box_bytes(N, span, TB);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + 8192 + ((nb * b_box + 127) / 128) * 128);
  if (t == 0) {
    mbar_init(bar, 1);
    fence_mbarrier_init();
  }
  __syncthreads();
  if (t == 0) {
    const int na = operand_boxes(64, span, TA), a_box = operand_box_bytes(64, span, TA);
    mbar_arrive_expect_tx(bar, (RS ? 0 : na * a_box) + nb * b_box);
    for (int i = 0; i < na && !RS; ++i) {
      const int c[2] = {i * span / 2, 0};
      tma_load(smem + i * a_box, &map_a, bar, 2, c);
    }
    for (int j = 0; j < nb; ++j) {
      const int c[2] = {j * span / 2, 0};
      tma_load(smem + 8192 + j * b_box, &map_b, bar, 2, c);
    }
  }
  float acc[N / 2];
  for (int v = 0; v < N / 2; ++v) acc[v] = c_in ? c_in[frag_row(t, v) * N + frag_col(t, v)] : 0.f;
  uint32_t afr[4][4];
  if (RS)
    for (int kk = 0; kk < 4; ++kk)
      for (int r = 0; r < 4; ++r) {
        const uint32_t lo = a_rowmajor[frag_row(t, 2 * r) * 64 + 16 * kk + frag_col(t, 2 * r)];
        const uint32_t hi = a_rowmajor[frag_row(t, 2 * r + 1) * 64 + 16 * kk + frag_col(t, 2 * r + 1)];
        afr[kk][r] = lo | hi << 16;
      }
  mbar_wait(bar, 0);
  wg_fence();
  for (int kk = 0; kk < 4; ++kk) {
    if (split && kk == 2) wg_commit();
    const int sd = (kk > 0 || c_in != nullptr) ? 1 : 0;
    const uint64_t db = operand_desc(b_base, N, span, TB, kk);
    if constexpr (RS) {
      wgmma_rs<N, BF16, SA, 1, TB>(acc, afr[kk], db, sd);
    } else {
      wgmma_ss<N, BF16, SA, 1, TA, TB>(acc, operand_desc(a_base, 64, span, TA, kk), db, sd);
    }
  }
  wg_commit();
  if (split) wg_wait<1>();
  wg_wait<0>();
  for (int v = 0; v < N / 2; ++v) d_out[frag_row(t, v) * N + frag_col(t, v)] = acc[v];
}

// ---- TMA copies ---------------------------------------------------------------------------------------
struct Coords {
  int c[5];
};

// Loads the box at `cin` of `in` into shared memory, copies the shared bytes as they are to `raw`
// (the swizzled image), then stores the box to `out` at `cout`.
__global__ void tma_copy_kernel(const __grid_constant__ CUtensorMap in, const __grid_constant__ CUtensorMap out,
                                int rank, Coords cin, Coords cout, int bytes, unsigned char* raw) {
  extern __shared__ __align__(1024) unsigned char smem[];
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + ((bytes + 1023) / 1024) * 1024);
  if (threadIdx.x == 0) {
    prefetch_tmap(&in);
    mbar_init(bar, 1);
    mbar_expect_tx(bar, (uint32_t)bytes);  // (expect_tx and arrive as two instructions)
    tma_load(smem, &in, bar, rank, cin.c);
    (void)mbar_arrive_state(bar);
  }
  __syncthreads();
  mbar_wait(bar, 0);
  for (int i = threadIdx.x; i < bytes; i += blockDim.x) raw[i] = smem[i];
  __syncthreads();
  if (threadIdx.x == 0) {
    tma_store(&out, smem, rank, cout.c);
    bulk_commit();
    bulk_wait_read0();
  }
}

// Ordinary stores fill a box in shared memory (value i at byte 2i), optionally fence.proxy.async,
// then a TMA store writes it to `out` at `cout` (2-d, 16-bit elements).
__global__ void tma_store_generic_kernel(const __grid_constant__ CUtensorMap out, Coords cout, int elems,
                                         int with_fence, int overwrite_in_flight) {
  extern __shared__ __align__(1024) unsigned char smem[];
  uint16_t* s = reinterpret_cast<uint16_t*>(smem);
  for (int i = threadIdx.x; i < elems; i += blockDim.x) s[i] = (uint16_t)i;
  if (with_fence) fence_proxy_async();
  __syncthreads();
  if (threadIdx.x == 0) {
    tma_store(&out, smem, 2, cout.c);
    bulk_commit();
    if (overwrite_in_flight) s[3] = 12345;  // the store has not read its source yet
    bulk_wait0();
  }
}

// ---- a warp-specialised pipeline: 1 producer + 2 consumer warpgroups ------------------------------------
// O (128 x 64, bf16) = A (128 x K) . B (64 x K)^T, K = 64 kblocks, 2 stages of A and B tiles (128B swizzle),
// full/empty mbarriers, setmaxnreg, elect.sync, named barriers, stmatrix, fence.proxy.async, a TMA store.
constexpr int kStages = 2;
constexpr int kStageBytes = 128 * 128 + 64 * 128;

__global__ void __launch_bounds__(384, 1) pipeline_kernel(const __grid_constant__ CUtensorMap map_a,
                                                          const __grid_constant__ CUtensorMap map_b,
                                                          const __grid_constant__ CUtensorMap map_o, int kblocks) {
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned char* out_tile = smem + kStages * kStageBytes;  // 128 x 64 bf16, row-major
  uint64_t* full = reinterpret_cast<uint64_t*>(out_tile + 128 * 64 * 2);
  uint64_t* empty = full + kStages;
  const int wg = threadIdx.x / 128, t = threadIdx.x % 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 256);
    }
    fence_mbarrier_init();
  }
  __syncthreads();
  if (wg == 0) {
    setmaxnreg_dec<40>();
    if (t >= 32) return;
    for (int kb = 0; kb < kblocks; ++kb) {
      const int s = kb % kStages;
      mbar_wait(&empty[s], ((kb / kStages) & 1) ^ 1);
      if (elect_one()) {
        unsigned char* st = smem + s * kStageBytes;
        mbar_arrive_expect_tx(&full[s], kStageBytes);
        const int c[2] = {kb * 64, 0};
        tma_load(st, &map_a, &full[s], 2, c);
        tma_load(st + 128 * 128, &map_b, &full[s], 2, c);
      }
    }
    return;
  }
  setmaxnreg_inc<232>();
  const int rb = wg - 1;  // this consumer's 64 rows of A
  float acc[32];
  for (int v = 0; v < 32; ++v) acc[v] = 0.f;
  for (int kb = 0; kb < kblocks; ++kb) {
    const int s = kb % kStages;
    mbar_wait(&full[s], (kb / kStages) & 1);
    const uint32_t a = smem_u32(smem + s * kStageBytes) + rb * 64 * 128, b = smem_u32(smem + s * kStageBytes) + 128 * 128;
    wg_fence();
    for (int kk = 0; kk < 4; ++kk)
      wgmma_ss<64, true, 1, 1, 0, 0>(acc, make_desc(a + kk * 32, 16, 1024, 1), make_desc(b + kk * 32, 16, 1024, 1),
                                     (kb > 0 || kk > 0) ? 1 : 0);
    wg_commit();
    wg_wait<0>();
    mbar_arrive(&empty[s]);
  }
  // accumulator -> bf16 -> stmatrix (8x8 matrices: i = h + 2 (j % 2) for rows 8h.., columns 8j..)
  const int lane = t % 32, w = t / 32;
  for (int jj = 0; jj < 4; ++jj) {
    uint32_t r[4];
    for (int i = 0; i < 4; ++i) {
      const int h = i % 2, j = 2 * jj + i / 2;
      const __nv_bfloat16 lo = __float2bfloat16_rn(acc[4 * j + 2 * h]), hi = __float2bfloat16_rn(acc[4 * j + 2 * h + 1]);
      r[i] = (uint32_t)__bfloat16_as_ushort(lo) | (uint32_t)__bfloat16_as_ushort(hi) << 16;
    }
    const int i = lane / 8, row = rb * 64 + 16 * w + 8 * (i % 2) + lane % 8, col = 8 * (2 * jj + i / 2);
    stmatrix_x4(out_tile + (row * 64 + col) * 2, r[0], r[1], r[2], r[3]);
  }
  fence_proxy_async();
  bar_sync(1, 256);
  if (wg == 2) {
    bar_arrive(2, 256);
    return;
  }
  bar_sync(2, 256);
  if (t == 0) {
    const int c[2] = {0, 0};
    tma_store(&map_o, out_tile, 2, c);
    bulk_commit();
    bulk_wait_read0();
  }
}

// stmatrix (x4 and x2.trans) against plain math: out[32 x 16] from each lane's registers.
__global__ void stmatrix_kernel(uint16_t* out) {
  __shared__ __align__(128) uint16_t s[16 * 16];
  __shared__ __align__(128) uint16_t s2[16 * 8];
  const int l = threadIdx.x;
  // x4: matrix i holds value 1000 i + 10 row + col
  uint32_t r[4];
  for (int i = 0; i < 4; ++i) {
    const int row = l / 4, col = 2 * (l % 4);
    r[i] = (uint32_t)(1000 * i + 10 * row + col) | (uint32_t)(1000 * i + 10 * row + col + 1) << 16;
  }
  const int i = l / 8, rr = l % 8;  // matrix i = rows 8 (i % 2).., columns 8 (i / 2)..
  stmatrix_x4(&s[(8 * (i % 2) + rr) * 16 + 8 * (i / 2)], r[0], r[1], r[2], r[3]);
  // x2.trans: lane holds (row 2 (l % 4) + h, col l / 4) of matrix m: value 100 m + 10 row + col
  uint32_t q[2];
  for (int m = 0; m < 2; ++m) {
    const int col = l / 4, row0 = 2 * (l % 4);
    q[m] = (uint32_t)(100 * m + 10 * row0 + col) | (uint32_t)(100 * m + 10 * (row0 + 1) + col) << 16;
  }
  stmatrix_x2_trans(&s2[((l / 8) % 2 * 8 + l % 8) * 8], q[0], q[1]);
  __syncwarp();
  for (int k = l; k < 256; k += 32) out[k] = s[k];
  for (int k = l; k < 128; k += 32) out[256 + k] = s2[k];
}

// ---- deliberate misuses (each must be reported) --------------------------------------------------------
// One warpgroup; a 64 x 64 A tile and a 64 x 64 B tile (bf16, K-major, 128B swizzle) by TMA, then one
// m64n64k16 wgmma per `bug`:
//   1 the mbarrier expects 16 bytes more than the loads bring (the phase never completes)
//   2 a second arrival on a barrier with one expected arrival (arrive-count underflow)
//   3 a TMA load into the A tile while the wgmma reading it is in flight
//   4 wgmma without waiting for the TMA loads (reads shared memory not yet written)
//   5 wgmma without wgmma.fence
//   6 an accumulator register written between wgmma.mma_async and wgmma.wait_group
//   7 an accumulator register read between them (no report: the value read is NaN, d_out[0])
//   8 descriptor of B with a stride byte offset that leaves the allocation
//   9 descriptor of A starting 128 bytes (one row) into the 128B swizzle pattern
//  10 descriptor with a reserved bit set
//  11 descriptors that differ across the warpgroup
//  12 a barrier waited on twice as many arrivals as ever come (count 2, one arrival)
//  13 try_wait on shared memory that holds no mbarrier
//  14 a 3-d TMA with a 2-d tensor map; 15 a TMA into a misaligned shared address; 16 a TMA with a
//     tensor map never encoded
//  17 setmaxnreg.dec to 20 registers; 18 setmaxnreg.inc to 100 (not a multiple of 8)
//  19 bar.sync 1, 48 (not a multiple of 32)
//  20 an ordinary store into the B tile between wgmma.mma_async and wgmma.wait_group
//   0 none (the control: must pass, d_out = A . B^T for k 0..15)
__global__ void __launch_bounds__(128) misuse_kernel(const __grid_constant__ CUtensorMap map_a,
                                                     const __grid_constant__ CUtensorMap map_b, float* d_out, int bug) {
  extern __shared__ __align__(1024) unsigned char smem[];
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + 16384);
  uint64_t* bar2 = bar + 1;
  const int t = threadIdx.x;
#if defined(__CUDA_EMULATED__)  // (ptxas itself rejects these immediates)
  if (bug == 17) setmaxnreg_dec<20>();
  if (bug == 18) setmaxnreg_inc<100>();
#endif
  if (bug == 19) bar_sync(1, 48);
  if (t == 0) {
    mbar_init(bar, bug == 12 ? 2 : 1);
    mbar_init(bar2, 1);
    fence_mbarrier_init();
  }
  __syncthreads();
  if (bug == 13 && mbar_try_wait(bar + 4, 0)) d_out[0] = 1.f;
  if (t == 0) {
    mbar_arrive_expect_tx(bar, 16384 + (bug == 1 ? 16 : 0));
    if (bug == 2) mbar_arrive(bar);
    const int c[3] = {0, 0, 0};
    if (bug == 14) tma_load(smem, &map_a, bar, 3, c);
    if (bug == 15) tma_load(smem + 64, &map_a, bar, 2, c);
    if (bug == 16) {
      CUtensorMap blank;
      std::memset(&blank, 0, sizeof blank);
      tma_load(smem, &blank, bar, 2, c);
    }
    tma_load(smem, &map_a, bar, 2, c);
    tma_load(smem + 8192, &map_b, bar, 2, c);
  }
  if (bug != 4) mbar_wait(bar, 0);
  float acc[32];
  for (int v = 0; v < 32; ++v) acc[v] = 0.f;
  const uint32_t a = smem_u32(smem), b = a + 8192;
  uint64_t da = make_desc(a, 16, 1024, 1), db = make_desc(b, 16, 1024, 1);
  if (bug == 8) db = make_desc(b, 16, 8192, 1);
  if (bug == 9) da = make_desc(a + 128, 16, 1024, 1);
  if (bug == 10) da |= 1ull << 14;
  if (bug == 11) db = make_desc(b + (t % 2) * 1024, 16, 1024, 1);
  if (bug != 5) wg_fence();
  wgmma_ss<64, true, 1, 1, 0, 0>(acc, da, db, 0);
  if (bug == 3 && t == 0) {
    mbar_arrive_expect_tx(bar2, 8192);
    const int c[2] = {0, 0};
    tma_load(smem, &map_a, bar2, 2, c);
  }
  if (bug == 6) acc[5] = 1.f;
  if (bug == 20 && t == 5) smem[8192 + 130] = 0x11;  // an ordinary store into B while the wgmma reads it
  float early = 0.f;
  if (bug == 7) early = acc[0];
  wg_commit();
  wg_wait<0>();
  for (int v = 0; v < 32; ++v) d_out[frag_row(t, v) * 64 + frag_col(t, v)] = acc[v];
  if (bug == 7 && t == 0) d_out[0] = early;
}

// Ordinary stores fill A (64 x 16) and B (16 x N = 64, as [N][16]) in the no-swizzle K-major canonical
// layout (8 x 16-byte core matrices: rows at 16 bytes, row groups at SBO = 256, the two K halves at
// LBO = 128), then (with_fence) fence.proxy.async, __syncthreads and one wgmma (with_fence 2: two, with
// scale-d immediates 0 and 1: D = 2 A B). Without the fence the wgmma reads through the async proxy
// what the generic proxy wrote: reported.
__global__ void __launch_bounds__(128) generic_operands_kernel(const uint16_t* a, const uint16_t* b, float* d_out,
                                                               int with_fence) {
  __shared__ __align__(1024) uint16_t sa[64 * 16];
  __shared__ __align__(1024) uint16_t sb[64 * 16];
  const int t = threadIdx.x;
  for (int i = t; i < 64 * 16; i += 128) {
    const int r = i / 16, k = i % 16;
    const int off = (r % 8) * 8 + (r / 8) * 128 + (k / 8) * 64 + k % 8;  // in elements
    sa[off] = a[i];
    sb[off] = b[i];
  }
  if (with_fence) fence_proxy_async();
  __syncthreads();
  float acc[32];
  for (int v = 0; v < 32; ++v) acc[v] = 7.f;
  wg_fence();
  const uint64_t da = make_desc(smem_u32(sa), 128, 256, 0), db = make_desc(smem_u32(sb), 128, 256, 0);
  if (with_fence == 2) {  // immediate scale-d: D = A B, then D += A B
    wgmma_ss64_imm<0>(acc, da, db);
    wgmma_ss64_imm<1>(acc, da, db);
  } else {
    wgmma_ss<64, true, 1, 1, 0, 0>(acc, da, db, 0);
  }
  wg_commit();
  wg_wait<0>();
  for (int v = 0; v < 32; ++v) d_out[frag_row(t, v) * 64 + frag_col(t, v)] = acc[v];
}

// Three warpgroups all asking for 240 registers per thread: 3 x 128 x 240 is more than the 64K a block
// of 384 threads can have, so the increases wait for registers that never come.
__global__ void __launch_bounds__(384, 1) setmaxnreg_pool_kernel(int* out) {
  setmaxnreg_inc<240>();
  out[threadIdx.x] = 1;
}

// Two warps: warp 0 arrives at named barrier 1 (count 64) and then syncs on it before warp 1 arrived.
__global__ void named_twice_kernel(int* out) {
  if (threadIdx.x < 32) {
    bar_arrive(1, 64);
    bar_sync(1, 64);
  } else {
    bar_sync(1, 64);
  }
  out[threadIdx.x] = 1;
}

// elect.sync: one leader per warp (out[warp] = leader lane, out[8 + warp] = how many were elected).
__global__ void elect_kernel(int* out) {
  __shared__ int count[8];
  if (threadIdx.x < 8) count[threadIdx.x] = 0;
  __syncthreads();
  const bool me = elect_one();
  if (me) {
    out[threadIdx.x / 32] = threadIdx.x % 32;
    atomicAdd(&count[threadIdx.x / 32], 1);
  }
  __syncthreads();
  if (threadIdx.x < blockDim.x / 32) out[8 + threadIdx.x] = count[threadIdx.x];
}

// ---- host side -----------------------------------------------------------------------------------------
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q;
  if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess)
    return nullptr;
  return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
}

int make_map(CUtensorMap* m, const void* base, int rank, const uint64_t* dims, const uint64_t* strides,
             const uint32_t* box, int dtype, int swizzle, int oob) {
  const uint32_t es[5] = {1, 1, 1, 1, 1};
  return (int)encode_fn()(m, (CUtensorMapDataType)dtype, (cuuint32_t)rank, const_cast<void*>(base), dims, strides,
                          box, es, CU_TENSOR_MAP_INTERLEAVE_NONE, (CUtensorMapSwizzle)swizzle,
                          CU_TENSOR_MAP_L2_PROMOTION_L2_128B, (CUtensorMapFloatOOBfill)oob);
}
int swizzle_of_span(int span) {
  return span == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : span == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
         : span == 32 ? CU_TENSOR_MAP_SWIZZLE_32B : CU_TENSOR_MAP_SWIZZLE_NONE;
}
// The map of a 16-bit operand of `rows` (M or N) x 64 (K) stored K-major ([rows][64]) or MN-major
// ([64][rows]), with boxes as operand_boxes describes.
int operand_map(CUtensorMap* m, const void* p, int rows, int span, int mn_major, int bf16) {
  const int dt = bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const uint64_t dims[2] = {(uint64_t)(mn_major ? rows : 64), (uint64_t)(mn_major ? 64 : rows)};
  const uint64_t strides[1] = {dims[0] * 2};
  const uint32_t box[2] = {(uint32_t)span / 2, (uint32_t)(mn_major ? 64 : rows)};
  return make_map(m, p, 2, dims, strides, box, dt, swizzle_of_span(span), 0);
}

template <int N, bool BF16, int SA, int TA, int TB, bool RS>
int run_gemm(const void* a, const void* a_rowmajor, const void* b, const float* c, float* d, int span, int split) {
  CUtensorMap ma, mb;
  int e = operand_map(&ma, a, 64, span, TA, BF16);
  if (e == 0) e = operand_map(&mb, b, N, span, TB, BF16);
  if (e != 0) return 2000 + e;
  const size_t smem = 8192 + ((operand_boxes(N, span, TB) * operand_box_bytes(N, span, TB) + 127) / 128) * 128 + 64;
  gemm_kernel<N, BF16, SA, TA, TB, RS><<<1, 128, smem>>>(ma, mb, (const uint16_t*)a_rowmajor, c, d, span, split);
  return cudaGetLastError();
}

}  // namespace

// variant: which instantiation (see the table in tests/emulator/test_emulator_sm90.py)
ST_EXPORT int st_sm90_gemm(int variant, const void* a, const void* a_rowmajor, const void* b, const float* c, float* d,
                           int span, int split) {
  switch (variant) {
    case 0: return run_gemm<64, true, 1, 0, 0, false>(a, a_rowmajor, b, c, d, span, split);
    case 1: return run_gemm<256, false, 1, 0, 1, false>(a, a_rowmajor, b, c, d, span, split);
    case 2: return run_gemm<24, true, 1, 0, 1, false>(a, a_rowmajor, b, c, d, span, split);
    case 3: return run_gemm<8, false, -1, 1, 0, false>(a, a_rowmajor, b, c, d, span, split);
    case 4: return run_gemm<128, true, 1, 1, 1, false>(a, a_rowmajor, b, c, d, span, split);
    case 5: return run_gemm<128, true, 1, 0, 1, true>(a, a_rowmajor, b, c, d, span, split);
    case 6: return run_gemm<16, false, 1, 0, 0, true>(a, a_rowmajor, b, c, d, span, split);
    case 7: return run_gemm<64, false, -1, 0, 1, true>(a, a_rowmajor, b, c, d, span, split);
    case 8: return run_gemm<24, false, 1, 0, 0, false>(a, a_rowmajor, b, c, d, span, split);
    default: return 1;
  }
}

// A TMA load of the box at cin from `in` (rank 2..5, dims/strides/box as given, 16- or 32-bit elements),
// its shared-memory image to raw, and a TMA store of it at cout into `out` (same shape).
ST_EXPORT int st_sm90_tma_copy(int rank, int dtype, int swizzle, int oob, const uint64_t* dims,
                               const uint64_t* strides, const uint32_t* box, const void* in, void* out,
                               const int* cin, const int* cout, unsigned char* raw) {
  CUtensorMap mi, mo;
  int e = make_map(&mi, in, rank, dims, strides, box, dtype, swizzle, oob);
  if (e == 0) e = make_map(&mo, out, rank, dims, strides, box, dtype, swizzle, 0);
  if (e != 0) return 2000 + e;
  int bytes = dtype == CU_TENSOR_MAP_DATA_TYPE_FLOAT32 ? 4 : 2;
  for (int i = 0; i < rank; ++i) bytes *= (int)box[i];
  Coords ci{}, co{};
  for (int i = 0; i < rank; ++i) ci.c[i] = cin[i], co.c[i] = cout[i];
  tma_copy_kernel<<<1, 128, ((bytes + 1023) / 1024) * 1024 + 64>>>(mi, mo, rank, ci, co, bytes, raw);
  return cudaGetLastError();
}

ST_EXPORT int st_sm90_tma_store_generic(void* out, int with_fence, int overwrite_in_flight) {
  CUtensorMap mo;
  const uint64_t dims[2] = {64, 16}, strides[1] = {128};
  const uint32_t box[2] = {64, 16};
  const int e = make_map(&mo, out, 2, dims, strides, box, CU_TENSOR_MAP_DATA_TYPE_UINT16, CU_TENSOR_MAP_SWIZZLE_NONE, 0);
  if (e != 0) return 2000 + e;
  Coords c{};
  tma_store_generic_kernel<<<1, 64, 2048>>>(mo, c, 64 * 16, with_fence, overwrite_in_flight);
  return cudaGetLastError();
}

ST_EXPORT int st_sm90_pipeline(const void* a, const void* b, void* o, int kblocks) {
  CUtensorMap ma, mb, mo;
  const uint64_t da[2] = {(uint64_t)kblocks * 64, 128}, db[2] = {(uint64_t)kblocks * 64, 64}, dout[2] = {64, 128};
  const uint64_t sa[1] = {(uint64_t)kblocks * 128}, so[1] = {128};
  const uint32_t ba[2] = {64, 128}, bb[2] = {64, 64}, bo[2] = {64, 128};
  int e = make_map(&ma, a, 2, da, sa, ba, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, CU_TENSOR_MAP_SWIZZLE_128B, 0);
  if (e == 0) e = make_map(&mb, b, 2, db, sa, bb, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, CU_TENSOR_MAP_SWIZZLE_128B, 0);
  if (e == 0) e = make_map(&mo, o, 2, dout, so, bo, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, CU_TENSOR_MAP_SWIZZLE_NONE, 0);
  if (e != 0) return 2000 + e;
  const int smem = kStages * kStageBytes + 128 * 64 * 2 + 64;
  cudaError_t r = cudaFuncSetAttribute(pipeline_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (r != cudaSuccess) return r;
  pipeline_kernel<<<1, 384, smem>>>(ma, mb, mo, kblocks);
  return cudaGetLastError();
}

ST_EXPORT int st_sm90_misuse(const void* a, const void* b, float* d, int bug) {
  CUtensorMap ma, mb;
  const uint64_t dims[2] = {64, 64}, strides[1] = {128};
  const uint32_t box[2] = {64, 64};
  int e = make_map(&ma, a, 2, dims, strides, box, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, CU_TENSOR_MAP_SWIZZLE_128B, 0);
  if (e == 0) e = make_map(&mb, b, 2, dims, strides, box, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, CU_TENSOR_MAP_SWIZZLE_128B, 0);
  if (e != 0) return 2000 + e;
  misuse_kernel<<<1, 128, 16384 + 64>>>(ma, mb, d, bug);
  return cudaGetLastError();
}

ST_EXPORT int st_sm90_generic_operands(const void* a, const void* b, float* d, int with_fence) {
  generic_operands_kernel<<<1, 128>>>((const uint16_t*)a, (const uint16_t*)b, d, with_fence);
  return cudaGetLastError();
}

ST_EXPORT int st_sm90_setmaxnreg_pool(int* out) {
  setmaxnreg_pool_kernel<<<1, 384>>>(out);
  return cudaGetLastError();
}

ST_EXPORT int st_sm90_named_twice(int* out) {
  named_twice_kernel<<<1, 64>>>(out);
  return cudaGetLastError();
}

ST_EXPORT int st_sm90_elect(int* out, int threads) {
  elect_kernel<<<1, threads>>>(out);
  return cudaGetLastError();
}

ST_EXPORT int st_sm90_stmatrix(uint16_t* out) {
  stmatrix_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}

// Both driver entry points give cuTensorMapEncodeTiled (the deprecated one as the kernel contract uses
// it); an unknown symbol gives nullptr and cudaDriverEntryPointSymbolNotFound. 0 when all hold.
ST_EXPORT int st_sm90_entry_points() {
  void *a = nullptr, *b = nullptr, *c = reinterpret_cast<void*>(1);
  cudaDriverEntryPointQueryResult qa, qb, qc;
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  if (cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &a, cudaEnableDefault, &qa) != cudaSuccess) return 1;
#pragma GCC diagnostic pop
  if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &b, 12000, cudaEnableDefault, &qb) != cudaSuccess)
    return 2;
  if (cudaGetDriverEntryPointByVersion("cuNoSuchFunction", &c, 12000, cudaEnableDefault, &qc) != cudaSuccess) return 3;
  if (a == nullptr || a != b || qa != cudaDriverEntryPointSuccess || qb != cudaDriverEntryPointSuccess) return 4;
  if (c != nullptr || qc != cudaDriverEntryPointSymbolNotFound) return 5;
  return 0;
}

// cuTensorMapEncodeTiled with one invalid argument (which), or none (which = 0). Returns its CUresult.
ST_EXPORT int st_sm90_encode(int which, void* base) {
  CUtensorMap m;
  uint64_t dims[5] = {64, 32, 4, 2, 2}, strides[4] = {128, 4096, 16384, 32768};
  uint32_t box[5] = {64, 16, 2, 1, 1}, es[5] = {1, 1, 1, 1, 1};
  int rank = 2, dtype = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, swz = CU_TENSOR_MAP_SWIZZLE_128B, oob = 0;
  char* p = static_cast<char*>(base);
  alignas(128) static unsigned char raw[sizeof(CUtensorMap) + 64];
  CUtensorMap* mp = &m;
  switch (which) {
    case 1: rank = 0; break;                                   // rank not in [1, 5]
    case 2: rank = 6; break;
    case 3: p += 8; break;                                     // global address not 16-byte aligned
    case 4: strides[0] = 120; break;                           // stride not a multiple of 16
    case 5: box[1] = 257; break;                               // box dimension above 256
    case 6: box[0] = 4; swz = CU_TENSOR_MAP_SWIZZLE_NONE; break;  // inner box bytes not a multiple of 16
    case 7: box[0] = 128; break;                               // inner box 256 bytes > the 128B swizzle span
    case 8: swz = CU_TENSOR_MAP_SWIZZLE_32B; box[0] = 32; break;  // 64 bytes > 32
    case 9: dims[1] = 0; break;                                // zero dimension
    case 10: dims[0] = (1ull << 32) + 1; break;                 // dimension above 2^32
    case 11: es[1] = 9; break;                                 // element stride above 8
    case 12: dtype = CU_TENSOR_MAP_DATA_TYPE_INT32; box[0] = 32; oob = 1; break;  // NaN fill of an integer type
    case 13: strides[0] = 1ull << 40; break;                   // stride >= 2^40
    case 14: mp = reinterpret_cast<CUtensorMap*>(raw + 32); break;  // map not 64-byte aligned
    case 15: rank = 5; box[0] = 64; break;                     // a valid rank-5 map
    default: break;
  }
  return (int)encode_fn()(mp, (CUtensorMapDataType)dtype, (cuuint32_t)rank, p, dims, strides, box, es,
                          CU_TENSOR_MAP_INTERLEAVE_NONE, (CUtensorMapSwizzle)swz, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                          (CUtensorMapFloatOOBfill)oob);
}
