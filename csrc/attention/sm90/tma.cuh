// tma.cuh: the Tensor Memory Accelerator (TMA) and mbarrier toolbox of the sm90 attention path:
// host-side tensor maps, device-side bulk tensor copies, mbarriers and proxy fences.
//
// Host: attention tensors are described to TMA as 4-D tensors (d, S, H, B) -- innermost first --
// with the caller's element strides (row, head, batch) turned into bytes, so bhsd and bshd tensors
// (and q/k/v views of one fused projection) are read in place. The box is {64, rows, 1, 1}: one
// 128-byte swizzled row block of 64 head-dim columns (CU_TENSOR_MAP_SWIZZLE_128B requires the
// box's inner extent to be at most 128 bytes: cuda.h, cuTensorMapEncodeTiled requirements), so a
// tile of kHeadDim columns is kHeadDim/64 boxes, stored one after the other as [kHeadDim/64][rows][64].
// Elements past the tensor's end (rows >= S, columns >= d) are zero-filled on load and dropped on
// store: partial tiles need no padding in memory and no masking of their loads.
// cuTensorMapEncodeTiled is a driver function; it is looked up once through the runtime's
// cudaGetDriverEntryPoint, so the extension does not link libcuda.
//
// Device (all inline PTX, one instruction per asm statement; waits loop in C++ around one try_wait):
// - mbarrier (PTX ISA "Parallel Synchronization and Communication Instructions: mbarrier";
//   CUTLASS cutlass/arch/barrier.h ClusterBarrier / ClusterTransactionBarrier):
//   init(count); arrive; arrive.expect_tx(bytes) (one arrival plus a transaction count that TMA's
//   complete_tx pays off); try_wait.parity(p) -- true once the phase with parity p has completed.
//   A freshly initialised barrier is in phase 0, and a wait for parity 1 (the phase "before" it)
//   returns at once: producers start their empty-slot waits at parity 1 (pipeline.cuh).
// - cp.async.bulk.tensor (PTX ISA "Data Movement and Conversion Instructions: cp.async.bulk.tensor";
//   CUTLASS
//   cute/arch/copy_sm90_tma.hpp SM90_TMA_LOAD_4D / SM90_TMA_STORE_4D): loads signal an mbarrier
//   with complete_tx::bytes; stores are bulk groups (commit_group, wait_group.read before the shared
//   memory they read may be reused or the CTA exits).
// - fence.proxy.async.shared::cta: orders this thread's ordinary shared-memory stores before later
//   async-proxy accesses (wgmma reads, TMA stores) of the same memory (PTX ISA "membar/fence",
//   proxy fences; CUTLASS fence_view_async_shared).
// Shared-memory destinations of 128B-swizzled boxes are 1024-byte aligned (the swizzle pattern
// repeats every 8 rows of 128 bytes, and wgmma descriptors assume base offset 0).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/flash.h"

namespace gptk {
namespace attn {
namespace sm90 {

// ---- host: tensor maps ---------------------------------------------------------------------------
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver, or nullptr when the driver does not have it.
inline EncodeTiledFn encode_tiled_fn() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12050 && !defined(GPTK_EMU)
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                                             &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &found);
#endif
    return err == cudaSuccess && found == cudaDriverEntryPointSuccess ? reinterpret_cast<EncodeTiledFn>(f) : nullptr;
  }();
  return fn;
}

constexpr int kBoxCols = 64;  // head-dim columns per box: 64 x 2 bytes = one 128-byte swizzle span

// Tensor map of an attention tensor given as (B, H, S, D) with element strides `t` (16-bit elements):
// dims (d, S, H, B), box {64, box_rows, 1, 1}, 128-byte swizzle, out-of-bounds elements read as 0.
// A stride of 0 (a dimension of size 1, see attention_binding.cpp ref_of) is replaced by the packed
// stride, which TMA accepts and never uses. Returns cudaErrorInvalidValue if the driver refuses.
inline cudaError_t make_tensor_map(CUtensorMap* map, const TensorRef& t, DType dtype, int b, int h, int s, int d,
                                   int box_rows) {
  const EncodeTiledFn encode = encode_tiled_fn();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t elt = 2;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(d), static_cast<cuuint64_t>(s), static_cast<cuuint64_t>(h),
                              static_cast<cuuint64_t>(b)};
  cuuint64_t strides[3] = {static_cast<cuuint64_t>(t.row_stride) * elt, static_cast<cuuint64_t>(t.head_stride) * elt,
                           static_cast<cuuint64_t>(t.batch_stride) * elt};
  cuuint64_t packed = (dims[0] * elt + 15) / 16 * 16;  // bytes spanned by the dimensions inside
  for (int i = 0; i < 3; ++i) {
    if (strides[i] == 0) strides[i] = packed;
    packed = strides[i] * dims[i + 1];
  }
  const cuuint32_t box[4] = {kBoxCols, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                            4, t.ptr, dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Tensor map of fp32 row vectors (the backward's lse_log2 / delta, flash.h FlashBwdParams): `count`
// contiguous vectors of `len` floats (len * 4 a multiple of 16 bytes), dims (len, count), box
// {box, 1}, no swizzle (a box is one row of `box` floats, stored densely).
inline cudaError_t make_rowvec_map(CUtensorMap* map, const float* base, int64_t len, int64_t count, int box) {
  const EncodeTiledFn encode = encode_tiled_fn();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(len), static_cast<cuuint64_t>(count)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(len) * 4};
  const cuuint32_t boxd[2] = {static_cast<cuuint32_t>(box), 1};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, const_cast<float*>(base), dims, strides, boxd,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// ---- device: mbarrier ----------------------------------------------------------------------------
// `bar` is the shared-window address (__cvta_generic_to_shared) of an 8-byte aligned uint64_t.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialisations visible to the async proxy (TMA's complete_tx) and other threads
// (CUTLASS fence_barrier_init); a __syncthreads follows it.
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
// Blocks until the phase of `bar` with this parity has completed (try_wait itself suspends the
// thread for a while before returning false, so this is not a hot spin).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

// ---- device: proxy fence -------------------------------------------------------------------------
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- device: bulk tensor copies --------------------------------------------------------------------
// Coordinates are in elements, innermost first: (column, row, head, batch).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];\n"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// 2-D form (CUTLASS cute/arch/copy_sm90_tma.hpp SM90_TMA_LOAD_2D): coordinates (element, row).
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* map, uint32_t src, int c0, int c1, int c2, int c3) {
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n"
               ::"l"(reinterpret_cast<uint64_t>(map)), "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until the committed stores have finished READING shared memory (their global writes may
// still be in flight; they complete before the grid does).
__device__ __forceinline__ void tma_store_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

}  // namespace sm90
}  // namespace attn
}  // namespace gptk
