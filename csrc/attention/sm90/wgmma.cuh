// wgmma.cuh: warpgroup tensor-core MMA on sm_90a (wgmma.mma_async), its shared-memory matrix
// descriptors, the fences around it, and warpgroup register reconfiguration (setmaxnreg).
// Device code only; used by flash_fwd_sm90_kernel.cuh and flash_bwd_sm90_kernel.cuh.
//
// A warpgroup is 4 consecutive warps (128 threads, the first warp a multiple of 4). One
// wgmma.mma_async.m64nNk16 computes D[64 x N] (+)= A[64 x 16] * B[16 x N] for the whole warpgroup:
// A comes from shared memory (descriptor, "SS") or registers ("RS"), B always from shared memory.
// The instruction is asynchronous: it is issued, grouped by wgmma.commit_group, and its results
// (and its reads of shared memory) are only complete after wgmma.wait_group.
//
// Rules this file's users follow (PTX ISA 9.7.15 "Asynchronous Warpgroup Level Matrix Multiply-
// Accumulate Instructions", sections wgmma.fence / wgmma.mma_async / wgmma.wait_group):
// - wgmma_fence() before the first mma_async of a batch whenever the accumulator or A-fragment
//   registers were written by ordinary instructions since the last wgmma.
// - No access to the accumulator registers of an mma_async until its group has been waited for.
//   fence_operand() (CUTLASS warpgroup_fence_operand, cute/atom/mma_traits_sm90_gmma.hpp) keeps the
//   compiler from moving such accesses across the (register-less) commit/wait asm statements.
// - Shared memory written by ordinary stores must be made visible to the async proxy with
//   fence.proxy.async before a wgmma reads it (tma.cuh: fence_proxy_async); TMA writes are
//   visible once their mbarrier phase has completed.
//
// Register fragments (PTX ISA 9.7.15.5.1.1.1 "Matrix Fragments for wgmma.mma_async.m64nNk16",
// figures "WGMMA .m64nNk16 register fragment layout for accumulator matrix D" and "... for matrix
// A"). Warp w of the warpgroup owns rows 16w..16w+15; with g = lane / 4, t = lane % 4:
//   D (fp32, N/2 registers): d[4j + 0..1] = D[16w + g][8j + 2t .. +1], d[4j + 2..3] = D[16w + g + 8][8j + 2t ..]
//     -- per n8 column tile j exactly the mma.m16n8 C layout, so mask.cuh / softmax.cuh, written
//        for acc[MT][NT][4] fragments, apply with MT = 1, NT = N / 8 (d[j][e] below).
//   A (16-bit, 4 x .b32): a0 = A[16w + g][2t..2t+1], a1 = A[16w + g + 8][2t..], a2 = A[16w + g][2t+8..],
//     a3 = A[16w + g + 8][2t+8..] -- the mma.m16n8k16 A layout, so the fp32 accumulator of S = Q K^T
//     over keys 16k..16k+15 (column tiles 2k, 2k+1) packs pairwise into the A operand of P V.
//
// Shared-memory matrix descriptor (PTX ISA 9.7.15.5.1.2 "Shared Memory Matrix Layout", part "Matrix
// Descriptor Format", #asynchronous-warpgroup-level-matrix-shared-memory-layout-matrix-descriptor; CUTLASS
// cute/arch/mma_sm90_desc.hpp union GmmaDescriptor, lines 107-126 at 7107b05), 64 bits:
//   bits  0-13  start address >> 4
//   bits 16-29  leading-dimension byte offset (LBO) >> 4
//   bits 32-45  stride-dimension byte offset (SBO) >> 4
//   bits 49-51  base offset (0: every swizzle atom we use is 1024-byte aligned)
//   bits 62-63  swizzle: 0 none, 1 = 128B, 2 = 64B, 3 = 32B
// Every operand tile here uses the 128-byte swizzle: rows of 64 16-bit elements (128 bytes), 16-byte
// chunk c of row r stored at chunk position c ^ (r % 8) (CUTLASS Swizzle<3,4,3> on byte addresses:
// address bits 4-6 ^= bits 7-9), in 1024-byte atoms of 8 rows. That is what TMA writes with
// CU_TENSOR_MAP_SWIZZLE_128B into a 1024-byte aligned box (tma.cuh). Canonical layouts (CUTLASS
// cute/atom/mma_traits_sm90_gmma.hpp, comments of make_gmma_desc, lines 158-196 at 7107b05, in
// units of 16 bytes):
//   K-major  (A = Q [m][k], B = K [n][k]):  ((8, n), 2) : ((8, SBO), 1)
//     8 rows 128 bytes apart, groups of 8 rows SBO = 1024 bytes apart, LBO unused (set to 1).
//     The k16 slices of a 64-wide row block start 32 bytes apart: start address += 32 * (k % 4)
//     (the hardware applies the swizzle to the final address, so the offset stays unswizzled).
//   MN-major (B = V stored [k = key][n = d], imm-trans-b = 1):  ((8, n), (8, k)) : ((1, LBO), (8, SBO))
//     64 consecutive n (one 128-byte row) per key, 8 keys 128 bytes apart, the next 8 keys SBO =
//     1024 bytes on, the next 64 columns of n LBO bytes on (the next 64-column block of the tile).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/mma.cuh"

namespace gptk {
namespace attn {
namespace sm90 {

// ---- descriptors ---------------------------------------------------------------------------------
enum class Swizzle : uint64_t { kNone = 0, k128B = 1, k64B = 2, k32B = 3 };  // descriptor bits 62-63

__host__ __device__ constexpr uint64_t make_smem_desc(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes,
                                                       Swizzle swz = Swizzle::k128B) {
  return (static_cast<uint64_t>((smem_addr >> 4) & 0x3FFFu)) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32) |
         (static_cast<uint64_t>(swz) << 62);
}

// A K-major operand tile of 128-byte swizzled rows (Q or K): the k16 slice `ks` (0..kCols/16-1) of
// rows [row0, row0 + 8x) of a tile stored as kCols/64 row blocks of `rows` x 128 bytes each.
__device__ __forceinline__ uint64_t kmajor_desc(uint32_t tile, int rows, int row0, int ks) {
  const uint32_t addr = tile + static_cast<uint32_t>((ks >> 2) * rows * 128 + row0 * 128 + (ks & 3) * 32);
  return make_smem_desc(addr, 16, 1024);
}

// The MN-major B operand (V stored [key][d], 128-byte swizzled rows of 64 d, kCols/64 blocks of
// `rows` x 128 bytes): keys [16 kk, 16 kk + 16) x all d columns.
__device__ __forceinline__ uint64_t mnmajor_desc(uint32_t tile, int rows, int kk) {
  return make_smem_desc(tile + static_cast<uint32_t>(kk * 16 * 128), static_cast<uint32_t>(rows * 128), 1024);
}

// ---- fences and groups (PTX ISA 9.7.15: wgmma.fence, wgmma.commit_group, wgmma.wait_group) ----------
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Pin registers in place around asynchronous MMAs (see the rules above).
template <int R, int C>
__device__ __forceinline__ void fence_operand(float (&x)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < C; ++j) asm volatile("" : "+f"(x[i][j])::"memory");
}
template <int R, int C>
__device__ __forceinline__ void fence_operand(uint32_t (&x)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < C; ++j) asm volatile("" : "+r"(x[i][j])::"memory");
}

// ---- register reconfiguration (PTX ISA "Miscellaneous Instructions: setmaxnreg"; CUTLASS reg_reconfig.h) --
// Executed by every thread of a warpgroup; the count is a multiple of 8 in [24, 256].
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg: multiple of 8 in [24, 256]");
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg: multiple of 8 in [24, 256]");
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// ---- wgmma.mma_async.m64nNk16, fp32 accumulators -------------------------------------------------
// Wgmma<T, N>::ss<kScaleD>(d, desc_a, desc_b): D = A * B + (kScaleD ? D : 0), A and B K-major in
//   shared memory (imm-trans-a = imm-trans-b = 0).
// Wgmma<T, N>::rs_nmajor_b<kScaleD>(d, a, desc_b): A from registers (the fragment above), B N-major
//   in shared memory (imm-trans-b = 1, allowed for 16-bit types).
// Wgmma<T, 64>::ss_mn<kScaleD>(d, desc_a, desc_b): both operands MN-major in shared memory (imm-trans-a =
//   imm-trans-b = 1; the backward's dQ = dS K reads dS from the dS^T tile and K as [key][d]). The
//   transpose immediates are CUTLASS's GMMA::Major (cute/arch/mma_sm90_gmma.hpp lines 107-110 at 7107b05:
//   K = 0, MN = 1), legal for 16-bit A and B only (PTX ISA 9.7.15.5.1 "imm-trans-a, imm-trans-b").
// imm-scale-a = imm-scale-b = 1 (no negation). Operand order per the PTX ISA 9.7.15 syntax of
// wgmma.mma_async: d, a-desc|a, b-desc, scale-d, imm-scale-a, imm-scale-b[, imm-trans-a], imm-trans-b.
// One fully written-out asm statement per (type, N, form): the operand lists are long but plain.
template <typename T, int N>
struct Wgmma;

template <>
struct Wgmma<__nv_bfloat16, 64> {
  template <int kScaleD>
  static __device__ __forceinline__ void ss_mn(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, %34, 1, 1, 1, 1;\n"
        :
          "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(desc_a), "l"(desc_b), "n"(kScaleD));
  }
  template <int kScaleD>
  static __device__ __forceinline__ void ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, %34, 1, 1, 0, 0;\n"
        :
          "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(desc_a), "l"(desc_b), "n"(kScaleD));
  }
  template <int kScaleD>
  static __device__ __forceinline__ void rs_nmajor_b(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, %37, 1, 1, 1;\n"
        :
          "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(kScaleD));
  }
};

template <>
struct Wgmma<__nv_bfloat16, 128> {
  template <int kScaleD>
  static __device__ __forceinline__ void ss(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, %66, 1, 1, 0, 0;\n"
        :
          "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "l"(desc_a), "l"(desc_b), "n"(kScaleD));
  }
  template <int kScaleD>
  static __device__ __forceinline__ void rs_nmajor_b(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, %69, 1, 1, 1;\n"
        :
          "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(kScaleD));
  }
};

template <>
struct Wgmma<__half, 64> {
  template <int kScaleD>
  static __device__ __forceinline__ void ss_mn(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, %34, 1, 1, 1, 1;\n"
        :
          "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(desc_a), "l"(desc_b), "n"(kScaleD));
  }
  template <int kScaleD>
  static __device__ __forceinline__ void ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, %34, 1, 1, 0, 0;\n"
        :
          "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(desc_a), "l"(desc_b), "n"(kScaleD));
  }
  template <int kScaleD>
  static __device__ __forceinline__ void rs_nmajor_b(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, %37, 1, 1, 1;\n"
        :
          "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(kScaleD));
  }
};

template <>
struct Wgmma<__half, 128> {
  template <int kScaleD>
  static __device__ __forceinline__ void ss(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, %66, 1, 1, 0, 0;\n"
        :
          "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "l"(desc_a), "l"(desc_b), "n"(kScaleD));
  }
  template <int kScaleD>
  static __device__ __forceinline__ void rs_nmajor_b(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, %69, 1, 1, 1;\n"
        :
          "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(kScaleD));
  }
};

// fp32 values in the accumulator layout (columns 16kk..16kk+15 = n8 tiles 2kk, 2kk+1) -> 16-bit A
// fragments of an RS wgmma whose K runs over those columns, one per k16 step (the register layouts
// above: the D tile pair packs pairwise into the A fragment). The forward packs P for P V, the
// backward P^T and dS^T for dV += P^T dO and dK += dS^T Q.
template <typename T, int kNT>
__device__ __forceinline__ void pack_p(const float (&s)[kNT][4], uint32_t (&pa)[kNT / 2][4]) {
#pragma unroll
  for (int kk = 0; kk < kNT / 2; ++kk) {
    pa[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
    pa[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
    pa[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pa[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// The two GEMM shapes of both attention kernels, written once (accumulator fragments of N columns):
// acc = A B^T over kK / 16 k16 steps, both operands K-major in shared memory: A = rows [a_row0,
// a_row0 + 64) of a kRowsA-row tile, B = a kRowsB-row tile (N = kRowsB). Forward S = Q K^T; backward
// S^T = K Q^T and dP^T = V dO^T.
template <typename T, int kK, int kRowsA, int kRowsB>
__device__ __forceinline__ void gemm_ss_kmajor(float (&acc)[kRowsB / 8][4], uint32_t tile_a, int a_row0,
                                               uint32_t tile_b) {
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks) {
    const uint64_t da = kmajor_desc(tile_a, kRowsA, a_row0, ks);
    const uint64_t db = kmajor_desc(tile_b, kRowsB, 0, ks);
    if (ks == 0) {
      Wgmma<T, kRowsB>::template ss<0>(acc, da, db);
    } else {
      Wgmma<T, kRowsB>::template ss<1>(acc, da, db);
    }
  }
}

// acc += A B over kK / 16 k16 steps: A from registers (pack_p), B a kK-row MN-major tile of N columns.
// Forward O += P V; backward dV += P^T dO and dK += dS^T Q.
template <typename T, int N, int kK>
__device__ __forceinline__ void gemm_rs_mnmajor(float (&acc)[N / 8][4], const uint32_t (&a)[kK / 16][4],
                                                uint32_t tile_b) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    Wgmma<T, N>::template rs_nmajor_b<1>(acc, a[kk], mnmajor_desc(tile_b, kK, kk));
  }
}

}  // namespace sm90
}  // namespace attn
}  // namespace gptk
