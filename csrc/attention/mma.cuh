// mma.cuh: the sm_80 tensor-core toolbox the attention kernels share (device code only).
//
// - cp.async 16-byte copies global -> shared with zero-fill (src-size 0) for rows/columns out of
//   range, so partial tiles never read out of bounds and never carry stale data.
// - Shared-memory tiles: rows of C 16-bit elements (C = 64 or 128; 128 or 256 bytes), split into
//   16-byte chunks; chunk c of row r lives at chunk position c ^ (r & 7) (XOR swizzle of the low 3
//   bits). Eight consecutive rows at the same logical chunk, which is what one 8x8 ldmatrix reads
//   and what 8 threads of a cp.async row write, land on 8 different 16-byte bank groups: no bank
//   conflicts.
// - ldmatrix.x4 (optionally .trans) address patterns for the four operand shapes, and
//   mma.sync.m16n8k16 with fp32 accumulation (bf16 or fp16 inputs).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), with
// g = lane / 4 and t = lane % 4:
//   A (16x16, row-major): reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..],
//                         reg3 = A[g+8][2t+8..]
//   B (16x8, "col"):      reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g]
//   C (16x8, fp32):       c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
// ldmatrix.x4: threads 8i..8i+7 give the 8 row addresses of matrix i, which lands in register i;
// without .trans thread l gets row l/4, elements 2(l%4), 2(l%4)+1 of each matrix; with .trans it
// gets column l/4, rows 2(l%4) and 2(l%4)+1.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace gptk {
namespace attn {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- cp.async ----------------------------------------------------------------------------------
// Copies 16 bytes when `pred`, else writes 16 zero bytes and reads nothing from `src`.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_size) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---- swizzled tiles ------------------------------------------------------------------------------
// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of kCols 16-bit elements per row.
template <int kCols>
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  static_assert(kCols == 64 || kCols == 128, "swizzled tiles are 64 or 128 elements wide");
  return static_cast<uint32_t>(row * (kCols * 2) + ((chunk ^ (row & 7)) << 4));
}

// Issue cp.async for a kRows x kCols tile: row r of the tile is gmem[r * row_stride ...]; rows
// >= rows_valid and chunks >= chunks_valid are zero-filled. `safe` is any readable address (used
// as the source of the zero-fill copies, which read nothing). Thread tid copies chunk tid % C of
// rows tid / C + i * (kThreads / C); rows advance by a multiple of 8, so the swizzle of all its
// chunks is the same and their shared addresses differ by constants.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(uint32_t smem, const T* gmem, int64_t row_stride, int rows_valid,
                                                int chunks_valid, const T* safe, int tid) {
  constexpr int kChunks = kCols / 8;
  static_assert(kThreads % kChunks == 0, "threads must cover whole rows");
  constexpr int kRowsPerPass = kThreads / kChunks;
  static_assert(kRows % kRowsPerPass == 0 && kRowsPerPass % 8 == 0, "rows per pass must be a multiple of 8");
  const int c = tid % kChunks;
  const int r0 = tid / kChunks;
  // Pass i copies row r0 + i * kRowsPerPass, valid when i * kRowsPerPass < rem: a compare with an
  // immediate per pass (no per-pass row index for the compiler to hoist out of a caller's loop).
  const int rem = c < chunks_valid ? rows_valid - r0 : 0;
  const T* src = gmem + r0 * row_stride + c * 8;
  const int64_t step = row_stride * kRowsPerPass;
  const uint32_t dst = smem + swz<kCols>(r0, c);
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    const bool p = i * kRowsPerPass < rem;
    cp_async_16(dst + i * kRowsPerPass * kCols * 2, p ? src : safe, p);
    src += step;
  }
}

// Store a kRows x kCols tile from shared memory to global memory (16-byte stores), rows <
// rows_valid and chunks < chunks_valid only.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void store_tile(const char* smem, T* gmem, int64_t row_stride, int rows_valid,
                                           int chunks_valid, int tid) {
  constexpr int kChunks = kCols / 8;
  static_assert(kThreads % kChunks == 0, "threads must cover whole rows");
  constexpr int kRowsPerPass = kThreads / kChunks;
  static_assert(kRows % kRowsPerPass == 0 && kRowsPerPass % 8 == 0, "rows per pass must be a multiple of 8");
  const int c = tid % kChunks;
  const int r0 = tid / kChunks;
  if (c >= chunks_valid) return;
  T* dst = gmem + r0 * row_stride + c * 8;
  const int64_t step = row_stride * kRowsPerPass;
  const char* s = smem + swz<kCols>(r0, c);
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    if (r0 + i * kRowsPerPass < rows_valid) {
      *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(s + i * kRowsPerPass * kCols * 2);
    }
    dst += step;
  }
}

// ---- ldmatrix ------------------------------------------------------------------------------------
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Operand addresses ---------------------------------------------------------------------------------
// An 8x8 ldmatrix matrix is 8 consecutive rows at one 16-byte chunk. The four patterns below need,
// per lane, a row r_l in [0, 16) and a chunk c_l in {0, 1} (which of two adjacent chunks):
//   pattern X: r_l = lane % 16,                  c_l = lane / 16
//   pattern Y: r_l = lane % 8 + 8 * (lane / 16),  c_l = (lane / 8) % 2
// Both give r_l % 8 == lane % 8. With the tile base 256-byte aligned, rows at multiples of 8 and
// even chunk offsets c0, the address of (row0 + r_l, c0 + c_l) is
//   (base + r_l*rowbytes + ((c_l ^ lane%8) << 4)) ^ (c0 << 4)  +  row0 * rowbytes
// i.e. a per-thread "operand pointer" computed once, then one XOR with a constant and an
// immediate offset per ldmatrix. (The XOR only touches the chunk bits 4..7, which the row terms
// and the aligned base leave zero.)
//
//   A [m][k] (non-trans) : X, row = m, chunk = k/8   -> regs = A fragment a0..a3
//   A^T, tile [k][m]     : Y, row = k, chunk = m/8   (ldmatrix.trans)
//   B^T, tile [n][k]     : Y, row = n, chunk = k/8   -> b[0],b[1] n-tile 0; b[2],b[3] n-tile 1
//   B,  tile [k][n]      : X, row = k, chunk = n/8   (ldmatrix.trans)
// (Check, pattern X on A: lanes 0-7 give rows 0-7 chunk 0 -> reg0 = A[g][2t..]; lanes 8-15 rows
// 8-15 chunk 0 -> reg1 = A[g+8][2t..]; lanes 16-23 rows 0-7 chunk 1 -> reg2 = A[g][2t+8..];
// lanes 24-31 -> reg3. Pattern Y on B^T [n][k]: lanes 0-7 rows n 0-7 chunk 0 -> b0 = B[2t..][g];
// lanes 8-15 rows 0-7 chunk 1 -> b1 = B[2t+8..][g]; lanes 16-31 the same for n 8-15.)
template <int kCols>
__device__ __forceinline__ uint32_t thread_off_x(int lane) {
  return static_cast<uint32_t>((lane & 15) * kCols * 2 + (((lane >> 4) ^ (lane & 7)) << 4));
}
template <int kCols>
__device__ __forceinline__ uint32_t thread_off_y(int lane) {
  const int r = (lane & 7) + ((lane >> 4) << 3);
  return static_cast<uint32_t>(r * kCols * 2 + ((((lane >> 3) & 1) ^ (lane & 7)) << 4));
}

// Operand pointer for a warp's A tile starting at A-row a_row0 (a multiple of 16 * MT, MT a power
// of two, so that per-m-tile chunk offsets combine with it by XOR).
template <int kCols, bool kTrans>
__device__ __forceinline__ uint32_t operand_a(uint32_t tile, int a_row0, int lane) {
  if constexpr (kTrans) {
    return (tile + thread_off_y<kCols>(lane)) ^ static_cast<uint32_t>((a_row0 >> 3) << 4);
  } else {
    return tile + thread_off_x<kCols>(lane) + static_cast<uint32_t>(a_row0 * kCols * 2);
  }
}
// Operand pointer for a warp's B tile starting at B-column b_col0 (a multiple of 8 * NT).
template <int kCols, bool kTrans>
__device__ __forceinline__ uint32_t operand_b(uint32_t tile, int b_col0, int lane) {
  if constexpr (kTrans) {
    return (tile + thread_off_x<kCols>(lane)) ^ static_cast<uint32_t>((b_col0 >> 3) << 4);
  } else {
    return tile + thread_off_y<kCols>(lane) + static_cast<uint32_t>(b_col0 * kCols * 2);
  }
}

// Hide a value from the optimiser: addresses derived from it inside a loop are then recomputed
// (one XOR each) instead of being hoisted out of the loop into dozens of live registers.
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
  asm volatile("" : "+r"(x));
  return x;
}

// ---- mma -----------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d = a * b (no accumulator input): the first k-step of a fresh accumulator, so the registers of
// the result are not live (holding zeros) before it.
template <typename T>
__device__ __forceinline__ void mma_16816_zero(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816_zero<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                              uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %10, %10, %10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}
template <>
__device__ __forceinline__ void mma_16816_zero<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %10, %10, %10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}

// Two fp32 values -> one register of two 16-bit values (lo in the low half, as mma expects).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Warp-tile GEMM helpers ---------------------------------------------------------------------------
// acc[MT][NT][4] += A[MT*16 x K] * B[K x NT*8], both operands from swizzled shared tiles, given
// their operand pointers (operand_a / operand_b, which fix the warp's tile position and the
// transposition). kATrans: A's tile is stored [k][m]; kBTrans: B's tile is stored [k][n].
// kZero: acc = A * B (acc's previous contents are ignored and need not be initialised).
template <typename T, int MT, int NT, int K, int kACols, int kBCols, bool kATrans, bool kBTrans, bool kZero = false>
__device__ __forceinline__ void warp_gemm_ss(float (&acc)[MT][NT][4], uint32_t pa, uint32_t pb) {
  static_assert(NT % 2 == 0, "n-tiles come in pairs (one ldmatrix.x4)");
  static_assert((MT & (MT - 1)) == 0 && (NT & (NT - 1)) == 0, "tile counts must be powers of two");
#pragma unroll
  for (int ks = 0; ks < K / 16; ++ks) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if constexpr (kATrans) {
        ldsm_x4_trans((pa ^ ((2 * mt) << 4)) + ks * 16 * kACols * 2, a[mt]);
      } else {
        ldsm_x4((pa ^ ((2 * ks) << 4)) + mt * 16 * kACols * 2, a[mt]);
      }
    }
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      if constexpr (kBTrans) {
        ldsm_x4_trans((pb ^ ((2 * np) << 4)) + ks * 16 * kBCols * 2, b);
      } else {
        ldsm_x4((pb ^ ((2 * ks) << 4)) + np * 16 * kBCols * 2, b);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if (kZero && ks == 0) {
          mma_16816_zero<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
          mma_16816_zero<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
        } else {
          mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
          mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }
}

template <int MT, int NT>
__device__ __forceinline__ void clear(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
}

// Write a warp's fp32 accumulator tile (rows row0.., cols col0..) into a swizzled 16-bit tile,
// multiplied by `mul`. Each thread stores 4-byte pairs.
template <typename T, int MT, int NT, int kCols>
__device__ __forceinline__ void store_acc_to_smem(const float (&acc)[MT][NT][4], char* tile, int row0, int col0,
                                                  int lane, float mul) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int col = col0 + nt * 8 + 2 * t;
      const int r = row0 + mt * 16 + g;
      *reinterpret_cast<uint32_t*>(tile + swz<kCols>(r, col >> 3) + (col & 7) * 2) =
          pack2<T>(acc[mt][nt][0] * mul, acc[mt][nt][1] * mul);
      *reinterpret_cast<uint32_t*>(tile + swz<kCols>(r + 8, col >> 3) + (col & 7) * 2) =
          pack2<T>(acc[mt][nt][2] * mul, acc[mt][nt][3] * mul);
    }
  }
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace attn
}  // namespace gptk
