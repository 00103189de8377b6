// emu_selftest.cu: kernels that test the CUDA emulator itself (the "selftest" cases of
// tests/emulator/test_emulator_selftest.py): correct uses of warp intrinsics, shared memory, cp.async,
// ldmatrix and mma.sync whose results the tests compare with plain math, and deliberate bugs that
// the emulator must report (a test that cannot fail proves nothing). Plain CUDA: the same file
// would build with nvcc for sm_80+. The extern "C" functions at the end are the tests' entry points.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#define ST_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// ---- warp intrinsics (results checked against Python) ---------------------------------------------
__global__ void warp_ops_kernel(int* out) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  int* o = out + threadIdx.x * 8;
  const int v = lane * 3 + w * 100;
  o[0] = __shfl_sync(0xffffffffu, v, 5);
  o[1] = __shfl_xor_sync(0xffffffffu, v, 3);
  o[2] = __shfl_up_sync(0xffffffffu, v, 2);
  o[3] = __shfl_down_sync(0xffffffffu, v, 7, 16);
  o[4] = (int)__ballot_sync(0xffffffffu, lane % 3 == 0);
  o[5] = __any_sync(0xffffffffu, lane == 31) + 2 * __all_sync(0xffffffffu, lane < 31);
  o[6] = (int)__reduce_add_sync(0xffffffffu, (unsigned)lane);
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;  // two independent half-warps
  o[7] = __shfl_sync(half, v, 1, 16);
  __syncwarp();
}

// ---- deliberate bugs --------------------------------------------------------------------------------
__global__ void exit_then_shfl_kernel(int* out) {
  if (threadIdx.x >= 20) return;  // lanes 20..31 exit, then the rest shuffle with a full mask
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}

__global__ void full_mask_shfl_kernel(int* out) {  // launched with a partial last warp
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void deadlock_kernel(int* out) {  // 64 threads: lanes 0..15 shuffle, everyone else waits at the barrier
  int v = (int)threadIdx.x;
  if (threadIdx.x < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

// Each thread writes its slot, then reads its neighbour's: without the barrier a thread can read
// the slot before the neighbour writes it.
__global__ void neighbour_kernel(float* out, int with_barrier) {
  __shared__ float s[256];
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = (float)t;
  if (with_barrier) __syncthreads();
  out[t] = s[(t + 1) % n];
}

__global__ void shared_oob_kernel(float* out) {  // launched with 65 threads
  __shared__ float s[64];
  s[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x % 64];
}

__global__ void global_oob_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[i + 1];  // reads in[n]
}

__global__ void __launch_bounds__(64) bounded_kernel(int* out) { out[threadIdx.x] = 1; }

__global__ void dyn_smem_kernel(float* out, int n) {
  extern __shared__ float buf[];
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = (float)(i % 3);  // (the sum stays exact in fp32)
  __syncthreads();
  float s = 0.f;
  for (int i = 0; i < n; ++i) s += buf[i];
  if (threadIdx.x == 0) out[0] = s;
}

__global__ void index_overflow_kernel(const int* in, int* out, int stride) {
  const int row = blockIdx.x;
  const int off = row * stride;  // int * int: overflows when row * stride >= 2^31 (UB; UBSan reports it)
  out[row] = in[off % 4];
}

// ---- cp.async, ldmatrix, mma.sync -------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_size) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_size) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// out[0..3]: the shared words right after issuing (before wait_group: not yet valid), out[4..7]:
// after wait_group 0; out[8..11]: a zero-filled copy (src-size 0).
__global__ void cp_async_kernel(const float* src, float* out) {
  __shared__ alignas(16) float s[8];
  if (threadIdx.x == 0) {
    cp_async16(smem_addr(s), src, 16);
    cp_async16(smem_addr(s + 4), src, 0);
    cp_commit();
    for (int i = 0; i < 4; ++i) out[i] = s[i];
    cp_wait<0>();
    for (int i = 0; i < 4; ++i) out[4 + i] = s[i], out[8 + i] = s[4 + i];
  }
}

__global__ void cp_async_misaligned_kernel(const float* src) {
  __shared__ alignas(16) float s[8];
  cp_async16(smem_addr(s), src + 1, 16);  // a source 4 bytes off a 16-byte boundary
  cp_commit();
  cp_wait<0>();
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                         const float (&c)[4]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  }
}

// D (16x8 fp32) = A (16x16) * B (16x8) + C, one warp. variant 0: A row-major [m][k] (ldmatrix.x4),
// B row-major [k][n] (ldmatrix.x2.trans). variant 1: A given transposed [k][m] (ldmatrix.x4.trans),
// B given transposed [n][k] (ldmatrix.x2). Rows of the A operand >= a_rows are zero-filled by
// cp.async (src-size 0), as a partial tile.
template <typename T>
__global__ void mma_kernel(const T* a_src, const T* b_src, const float* c, float* d, int variant, int a_rows) {
  __shared__ alignas(128) T sa[16 * 16];
  __shared__ alignas(128) T sb[16 * 8];
  const int lane = threadIdx.x;
  {  // A: 16 rows x 32 bytes = 32 chunks of 16 bytes, one per lane
    const int r = lane / 2, h = lane % 2;
    const bool valid = variant == 1 || r < a_rows;  // (transposed: a_rows applies to columns; keep all)
    cp_async16(smem_addr(sa + r * 16 + h * 8), a_src + r * 16 + h * 8, valid ? 16 : 0);
  }
  if (lane < 16) {  // B: 16 chunks
    cp_async16(smem_addr(sb + lane * 8), b_src + lane * 8, 16);
  }
  cp_commit();
  cp_wait<0>();
  __syncwarp();
  uint32_t a[4], b[2];
  if (variant == 0) {
    const uint32_t pa = smem_addr(sa + (lane % 16) * 16 + (lane / 16) * 8);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                 : "r"(pa));
    const uint32_t pb = smem_addr(sb + (lane % 16) * 8);  // lanes 0..15: rows k 0..15
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(b[0]), "=r"(b[1]) : "r"(pb));
  } else {
    const int i = lane / 8, r = lane % 8;  // matrix i: rows k (i / 2) * 8 + r, chunk (m) i % 2
    const uint32_t pa = smem_addr(sa + ((i / 2) * 8 + r) * 16 + (i % 2) * 8);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                 : "r"(pa));
    const int j = (lane / 8) % 2;  // lanes 0..7: rows n chunk 0 (k 0..7); lanes 8..15: chunk 1
    const uint32_t pb = smem_addr(sb + r * 16 + j * 8);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(b[0]), "=r"(b[1]) : "r"(pb));
  }
  const int g = lane / 4, t = lane % 4;
  const float cin[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  float acc[4];
  mma16816<T>(acc, a, b[0], b[1], cin);
  d[g * 8 + 2 * t] = acc[0];
  d[g * 8 + 2 * t + 1] = acc[1];
  d[(g + 8) * 8 + 2 * t] = acc[2];
  d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

}  // namespace

// ---- entry points (return the launch's cudaError_t) ---------------------------------------------------
ST_EXPORT int st_warp_ops(int* out, int threads) {
  warp_ops_kernel<<<1, threads>>>(out);
  return cudaGetLastError();
}
ST_EXPORT int st_exit_then_shfl(int* out) {
  exit_then_shfl_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}
ST_EXPORT int st_full_mask_partial_warp(int* out) {
  full_mask_shfl_kernel<<<1, 48>>>(out);
  return cudaGetLastError();
}
ST_EXPORT int st_divergent_barrier(int* out) {
  divergent_barrier_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}
ST_EXPORT int st_deadlock(int* out) {
  deadlock_kernel<<<1, 64>>>(out);
  return cudaGetLastError();
}
ST_EXPORT int st_neighbour(float* out, int threads, int with_barrier) {
  neighbour_kernel<<<1, threads>>>(out, with_barrier);
  return cudaGetLastError();
}
ST_EXPORT int st_shared_oob(float* out) {
  shared_oob_kernel<<<1, 65>>>(out);
  return cudaGetLastError();
}
ST_EXPORT int st_global_oob(const float* in, float* out, int n) {
  global_oob_kernel<<<(n + 127) / 128, 128>>>(in, out, n);
  return cudaGetLastError();
}
ST_EXPORT int st_launch_bounds(int* out, int threads) {
  bounded_kernel<<<1, threads>>>(out);
  return cudaGetLastError();
}
ST_EXPORT int st_dyn_smem(float* out, int n, int set_attribute) {
  const size_t bytes = (size_t)n * sizeof(float);
  if (set_attribute) {
    const cudaError_t e = cudaFuncSetAttribute(dyn_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e != cudaSuccess) return e;
  }
  dyn_smem_kernel<<<1, 128, bytes>>>(out, n);
  return cudaGetLastError();
}
ST_EXPORT int st_bad_config(int* out) {
  bounded_kernel<<<dim3(1, 70000), 32>>>(out);  // gridDim.y above 65535
  const cudaError_t a = cudaGetLastError();
  bounded_kernel<<<1, 2048>>>(out);  // more than 1024 threads per block
  const cudaError_t b = cudaGetLastError();
  return a == cudaErrorInvalidConfiguration && b == cudaErrorInvalidConfiguration ? 0 : 1000 + (int)a;
}
ST_EXPORT int st_index_overflow(const int* in, int* out, int rows, int stride) {
  index_overflow_kernel<<<rows, 1>>>(in, out, stride);
  return cudaGetLastError();
}
ST_EXPORT int st_cp_async(const float* src, float* out) {
  cp_async_kernel<<<1, 32>>>(src, out);
  return cudaGetLastError();
}
ST_EXPORT int st_cp_async_misaligned(const float* src) {
  cp_async_misaligned_kernel<<<1, 1>>>(src);
  return cudaGetLastError();
}
ST_EXPORT int st_mma(const void* a, const void* b, const float* c, float* d, int bf16, int variant, int a_rows) {
  if (bf16)
    mma_kernel<__nv_bfloat16><<<1, 32>>>((const __nv_bfloat16*)a, (const __nv_bfloat16*)b, c, d, variant, a_rows);
  else
    mma_kernel<__half><<<1, 32>>>((const __half*)a, (const __half*)b, c, d, variant, a_rows);
  return cudaGetLastError();
}

// Conversions, checked bit for bit against torch's.
ST_EXPORT void st_float_to_half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half_as_ushort(__float2half_rn(in[i]));
}
ST_EXPORT void st_float_to_bf16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
}
ST_EXPORT void st_half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__ushort_as_half(in[i]));
}
ST_EXPORT void st_bf16_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat162float(__ushort_as_bfloat16(in[i]));
}
