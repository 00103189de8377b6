// cuda_emu.h: a CPU emulation of the CUDA programming model, enough to compile gptkernels'
// plain-CUDA kernel files unchanged with g++ and run them on host memory (under AddressSanitizer
// and UBSan), so that their logic can be tested on a machine without a GPU.
//
// What it is
// - Included (with -include) instead of the CUDA toolkit when a kernel file, rewritten by
//   translate.py (launch syntax, __shared__ declarations, inline PTX, kernel entry hooks), is
//   compiled as C++20. tests/emulator/include/ holds cuda_runtime.h / cuda_fp16.h / cuda_bf16.h
//   shims that only include this header: the CUDA toolkit is never used.
// - Execution (cuda_emu.cpp): a launch runs its blocks one after another; the threads of a block
//   are cooperative fibers on the calling OS thread, run in a deterministic schedule (sweeps in
//   forward, reverse or seeded-shuffled order, or greedy: one warp runs ahead to the next block
//   barrier) until each blocks at a barrier, a warp collective or exits. __syncthreads is a block barrier (exited threads drop out, as on the GPU); warp
//   intrinsics (__shfl_*_sync, __ballot_sync, __syncwarp, ...) are warp collectives that check
//   their masks (a lane named in the mask that has exited or does not exist, a lane outside its own
//   mask, mismatched collectives and deadlocks are reported as kernel faults); ldmatrix, mma.sync
//   m16n8k16 and cp.async (deferred until cp.async.wait_group) are emulated per warp / per thread.
// - sm_90 (cuda_emu_sm90.cpp): wgmma (warpgroup collectives; math deferred to wait_group), TMA against
//   tensor maps from an emulated cuTensorMapEncodeTiled, mbarrier (a failed try_wait yields until the
//   barrier changes), fence.proxy.async (an async-proxy view of shared memory), named barriers,
//   setmaxnreg, elect.sync, stmatrix; layouts from CUTLASS/CuTe, misuse reported as kernel faults.
// - Memory: global memory is host memory (tensors' data pointers; cudaMalloc is malloc). Each
//   __shared__ variable and the dynamic shared memory are separate heap allocations per block,
//   filled with a poison byte (0xff: NaN / -1), so out-of-bounds shared accesses hit ASan redzones
//   and reads of never-written shared memory show up as NaN. The shared-window addresses of
//   __cvta_generic_to_shared / ldmatrix / cp.async are mapped back and bounds-checked.
// - Launch checks as on the GPU: block and grid limits, dynamic shared memory above 48 KiB without
//   cudaFuncSetAttribute, __launch_bounds__ exceeded, static shared memory above 48 KiB.
//
// What it proves, and what it does not
// - It checks the LOGIC of a kernel: indexing, bounds, reductions, barrier placement as a
//   sequentially-consistent interleaving, warp-collective masks, vectorised vs scalar paths,
//   64-bit offset arithmetic (signed overflow is UB that UBSan reports), shared-memory sizing,
//   grid-stride loops for a configurable SM count.
// - It does NOT model the hardware: no weak memory model (a race that a GPU would expose through
//   reordering or caching need not show here), no lock-step warps, no timing, occupancy only by
//   threads and shared memory (not registers), and approximate instructions (ex2.approx, __expf,
//   rsqrtf, __fdividef apart from its large-divisor rule) are computed with the host's libm.
//   Tensor-core mma is computed exactly in double and rounded once to fp32 (the hardware's
//   accumulation order and internal precision are not modelled). A kernel that passes here can
//   still fail on a GPU; one that fails here has a real bug or relies on unmodelled behaviour.
#pragma once

#ifndef GPTK_EMU
#define GPTK_EMU 1
#endif

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include <math.h>

// ---- qualifiers --------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __managed__
#define __grid_constant__
// translate.py rewrites every __shared__ declaration; one left over is a translator gap.
#define __shared__ GPTK_EMU_UNTRANSLATED_SHARED_DECLARATION
#define __CUDA_EMULATED__ 1

// ---- vector types ------------------------------------------------------------------------------
#define GPTK_EMU_VEC2(name, T, A) \
  struct alignas(A) name {        \
    T x, y;                       \
  };                              \
  inline name make_##name(T x, T y) { return name{x, y}; }
#define GPTK_EMU_VEC3(name, T) \
  struct name {                \
    T x, y, z;                 \
  };                           \
  inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define GPTK_EMU_VEC4(name, T, A) \
  struct alignas(A) name {        \
    T x, y, z, w;                 \
  };                              \
  inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }

GPTK_EMU_VEC2(char2, signed char, 2)
GPTK_EMU_VEC4(char4, signed char, 4)
GPTK_EMU_VEC2(uchar2, unsigned char, 2)
GPTK_EMU_VEC4(uchar4, unsigned char, 4)
GPTK_EMU_VEC2(short2, short, 4)
GPTK_EMU_VEC4(short4, short, 8)
GPTK_EMU_VEC2(ushort2, unsigned short, 4)
GPTK_EMU_VEC4(ushort4, unsigned short, 8)
GPTK_EMU_VEC2(int2, int, 8)
GPTK_EMU_VEC3(int3, int)
GPTK_EMU_VEC4(int4, int, 16)
GPTK_EMU_VEC2(uint2, unsigned int, 8)
GPTK_EMU_VEC3(uint3, unsigned int)
GPTK_EMU_VEC4(uint4, unsigned int, 16)
GPTK_EMU_VEC2(longlong2, long long, 16)
GPTK_EMU_VEC2(ulonglong2, unsigned long long, 16)
GPTK_EMU_VEC2(float2, float, 8)
GPTK_EMU_VEC3(float3, float)
GPTK_EMU_VEC4(float4, float, 16)
GPTK_EMU_VEC2(double2, double, 16)

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// The built-in variables of the running (emulated) thread, set by the scheduler at every switch.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

// ---- runtime API types ---------------------------------------------------------------------------
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMaxRegistersPerBlock = 12,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrL2CacheSize = 38,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxRegistersPerMultiprocessor = 82,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMaxBlocksPerMultiprocessor = 106,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
struct cudaDeviceProp {
  char name[256];
  int major, minor;
  int multiProcessorCount;
  size_t sharedMemPerBlock, sharedMemPerBlockOptin, sharedMemPerMultiprocessor;
  int maxThreadsPerBlock, maxThreadsPerMultiProcessor, maxBlocksPerMultiProcessor;
  int warpSize;
  int l2CacheSize;
  size_t totalGlobalMem;
};

// ---- the emulator's interface (implemented in cuda_emu.cpp) --------------------------------------
namespace gptk_emu {

// Runtime-side hooks the translated code calls.
void syncthreads(const char* file, int line);
int syncthreads_count(int pred, const char* file, int line);
void* shared_var(const void* tag, size_t size, size_t align, const char* name);
void* dynamic_shared(size_t align);
void kernel_entry(const char* name, long long max_threads, long long min_blocks);
[[noreturn]] void fault(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Warp collectives: every lane of `mask` contributes `n` (<= kSlot) bytes; when all have arrived,
// each gets the 32 slots (slot i = lane i's bytes; lanes outside the mask hold poison). The slots
// stay valid until the calling lane's next collective.
constexpr int kSlot = 64;
enum Op : int { kShfl = 1, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncwarp, kLdmatrix, kMma, kReduce,
                kMatch, kElect, kStmatrix };
const unsigned char* warp_collective(unsigned mask, int op, const void* data, size_t n, const char* file, int line);
unsigned lane_id();
unsigned live_lanes();  // lanes of this warp that exist and have not exited
[[noreturn]] void bad_shfl_source(const char* what, unsigned lane, unsigned src, unsigned mask, const char* file,
                                  int line);

// Shared-window addresses (u32), as __cvta_generic_to_shared gives them.
uint32_t cvta_to_shared(const void* p, const char* file, int line);
void* shared_ptr(uint32_t addr, size_t bytes, size_t align, const char* what, const char* file, int line);

// cp.async, deferred until wait_group (per thread).
void cp_async(uint32_t dst, const void* src, int cp_size, int src_size, const char* file, int line);
void cp_async_commit();
void cp_async_wait(int n);

// Launch machinery.
struct LaunchCfg {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
};
cudaError_t run_launch(const void* fn, const LaunchCfg& cfg, void (*body)(void*), void* closure);
cudaError_t set_func_attribute(const void* fn, int attr, int value);
cudaError_t occupancy(int* n, const void* fn, int block, size_t smem);

template <class F>
void invoke_closure(void* c) {
  (*static_cast<F*>(c))();
}

template <class... P>
struct Launcher {
  void (*fn)(P...);
  LaunchCfg cfg;
  template <class... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // Arguments are converted to the parameter types once, as cudaLaunchKernel copies them; every
    // emulated thread then receives its own copy.
    std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);
    auto body = [&] { std::apply(fn, args); };
    run_launch(reinterpret_cast<const void*>(fn), cfg, &invoke_closure<decltype(body)>, &body);
  }
};
template <class... P>
Launcher<P...> make_launcher(void (*fn)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr) {
  return Launcher<P...>{fn, LaunchCfg{grid, block, smem, stream}};
}

// ---- fp16 / bf16 bit conversions (round to nearest even, as cvt.rn) ------------------------------
inline uint32_t f2u(float f) { return std::bit_cast<uint32_t>(f); }
inline float u2f(uint32_t u) { return std::bit_cast<float>(u); }

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = f2u(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;                 // NaN: canonical NaN, as cvt.rn.f16.f32
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to inf (and inf)
  if (a >= 0x38800000u) {                               // normal half
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
  }
  if (a <= 0x33000000u) return (uint16_t)sign;  // <= 2^-25: rounds to zero
  const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;  // 14..24
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return (uint16_t)(sign | q);
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return u2f(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    const float v = std::ldexp((float)m, -24);
    return sign ? -v : v;
  }
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN: canonical NaN
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(uint16_t b) { return u2f((uint32_t)b << 16); }

}  // namespace gptk_emu

// ---- fp16 / bf16 types -------------------------------------------------------------------------
struct __half_raw {
  unsigned short x;
};
struct alignas(2) __half {
  unsigned short __x;
  __half() = default;
  __half(__half_raw r) : __x(r.x) {}
  __half(float f) : __x(gptk_emu::float_to_half_bits(f)) {}
  __half(double f) : __x(gptk_emu::float_to_half_bits((float)f)) {}
  operator float() const { return gptk_emu::half_bits_to_float(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
};
struct alignas(4) __half2 {
  __half x, y;
};
struct __nv_bfloat16_raw {
  unsigned short x;
};
struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(gptk_emu::float_to_bf16_bits(f)) {}
  __nv_bfloat16(double f) : __x(gptk_emu::float_to_bf16_bits((float)f)) {}
  operator float() const { return gptk_emu::bf16_bits_to_float(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __float2half_rn(float f) { return __ushort_as_half(gptk_emu::float_to_half_bits(f)); }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return gptk_emu::half_bits_to_float(h.__x); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16(__nv_bfloat16_raw{u}); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __ushort_as_bfloat16(gptk_emu::float_to_bf16_bits(f)); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return gptk_emu::bf16_bits_to_float(h.__x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }

// ---- bit casts, math ---------------------------------------------------------------------------
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline float __uint_as_float(unsigned int u) { return std::bit_cast<float>(u); }
inline unsigned int __float_as_uint(float f) { return std::bit_cast<unsigned int>(f); }
inline double __longlong_as_double(long long i) { return std::bit_cast<double>(i); }
inline long long __double_as_longlong(double d) { return std::bit_cast<long long>(d); }

inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x > 0.f ? (x < 1.f ? x : 1.f) : 0.f; }  // NaN -> 0
// Fast-math intrinsics: computed with the host libm in the form the hardware evaluates them
// (__expf = ex2(x * log2 e)); the hardware's approximation error is not modelled.
inline float __expf(float x) { return exp2f(x * 1.4426950408889634f); }
inline float __exp10f(float x) { return exp2f(x * 3.3219280948873622f); }
inline float __logf(float x) { return log2f(x) * 0.6931471805599453f; }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log2f(x) * 0.3010299956639812f; }
inline float __powf(float x, float y) { return exp2f(y * log2f(x)); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x), *c = cosf(x); }
// __fdividef: x * (1 / y) with the documented rule that 2^126 < |y| < 2^128 gives 0 (NaN for an
// infinite x).
inline float __fdividef(float x, float y) {
  const float ay = fabsf(y);
  if (ay > 0x1p126f && ay < INFINITY) return std::isinf(x) ? NAN : 0.f;
  return x / y;
}
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline int __popc(unsigned int x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : std::countl_zero((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : std::countl_zero((unsigned long long)x); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero((unsigned)x) + 1; }
inline int __ffsll(long long x) { return x == 0 ? 0 : std::countr_zero((unsigned long long)x) + 1; }
inline unsigned int __brev(unsigned int x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}

// CUDA's global min/max overloads (device code may call them unqualified).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// ---- memory access intrinsics -----------------------------------------------------------------------
template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T __ldcg(const T* p) { return *p; }
template <class T>
inline T __ldca(const T* p) { return *p; }
template <class T>
inline T __ldcs(const T* p) { return *p; }
template <class T>
inline T __ldlu(const T* p) { return *p; }
template <class T>
inline T __ldcv(const T* p) { return *p; }
template <class T>
inline void __stcg(T* p, T v) { *p = v; }
template <class T>
inline void __stcs(T* p, T v) { *p = v; }
template <class T>
inline void __stwb(T* p, T v) { *p = v; }
template <class T>
inline void __stwt(T* p, T v) { *p = v; }
// Sequentially consistent emulation: fences have nothing to order.
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}

#define __cvta_generic_to_shared(p) ::gptk_emu::cvta_to_shared((p), __FILE__, __LINE__)

// ---- atomics (std::atomic_ref: correct even if blocks ever run on several OS threads) -------------
#define GPTK_EMU_ATOMIC_RMW(NAME, T, EXPR)       \
  inline T NAME(T* p, T v) {                     \
    std::atomic_ref<T> r(*p);                    \
    T old = r.load();                            \
    while (!r.compare_exchange_weak(old, (EXPR))) \
      ;                                          \
    return old;                                  \
  }
#define GPTK_EMU_ATOMIC_INT(T)                                   \
  inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); } \
  inline T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v); } \
  inline T atomicAnd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_and(v); } \
  inline T atomicOr(T* p, T v) { return std::atomic_ref<T>(*p).fetch_or(v); }   \
  inline T atomicXor(T* p, T v) { return std::atomic_ref<T>(*p).fetch_xor(v); } \
  inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); } \
  GPTK_EMU_ATOMIC_RMW(atomicMax, T, old > v ? old : v)            \
  GPTK_EMU_ATOMIC_RMW(atomicMin, T, old < v ? old : v)            \
  inline T atomicCAS(T* p, T cmp, T v) {                         \
    std::atomic_ref<T>(*p).compare_exchange_strong(cmp, v);      \
    return cmp;                                                  \
  }
GPTK_EMU_ATOMIC_INT(int)
GPTK_EMU_ATOMIC_INT(unsigned int)
GPTK_EMU_ATOMIC_INT(unsigned long long)
// (as in CUDA: no atomicAdd on signed 64-bit integers, no float atomicMax/atomicMin)
inline long long atomicMax(long long* p, long long v) {
  std::atomic_ref<long long> r(*p);
  long long old = r.load();
  while (!r.compare_exchange_weak(old, old > v ? old : v))
    ;
  return old;
}
inline long long atomicMin(long long* p, long long v) {
  std::atomic_ref<long long> r(*p);
  long long old = r.load();
  while (!r.compare_exchange_weak(old, old < v ? old : v))
    ;
  return old;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
inline float atomicExch(float* p, float v) { return std::atomic_ref<float>(*p).exchange(v); }
inline unsigned int atomicInc(unsigned int* p, unsigned int v) {
  std::atomic_ref<unsigned int> r(*p);
  unsigned old = r.load();
  while (!r.compare_exchange_weak(old, old >= v ? 0u : old + 1u))
    ;
  return old;
}

// ---- barriers and warp intrinsics --------------------------------------------------------------------
#define __syncthreads() ::gptk_emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_count(p) ::gptk_emu::syncthreads_count((p) ? 1 : 0, __FILE__, __LINE__)
#define __syncthreads_and(p) (::gptk_emu::syncthreads_count((p) ? 1 : 0, __FILE__, __LINE__) == (int)(blockDim.x * blockDim.y * blockDim.z))
#define __syncthreads_or(p) (::gptk_emu::syncthreads_count((p) ? 1 : 0, __FILE__, __LINE__) != 0)

namespace gptk_emu {
template <class T>
inline T shfl_impl(int op, unsigned mask, T var, int arg, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffled values are <= 16 bytes");
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fault("%s:%d: shuffle width %d is not a power of two in [1, 32]", file, line, width);
  const unsigned char* s = warp_collective(mask, op, &var, sizeof(T), file, line);
  const unsigned lane = lane_id();
  const unsigned seg = lane & ~(unsigned)(width - 1), seg_end = seg + (unsigned)width;
  long long src = lane;
  switch (op) {
    case kShfl: src = seg + ((unsigned)arg & (unsigned)(width - 1)); break;
    case kShflUp: src = (long long)lane - arg; if (src < (long long)seg) src = lane; break;
    case kShflDown: src = (long long)lane + arg; if (src >= (long long)seg_end) src = lane; break;
    case kShflXor: src = lane ^ (unsigned)arg; if (src >= (long long)seg_end) src = lane; break;
  }
  if (src < 0 || src > 31 || !(mask >> src & 1u))
    bad_shfl_source("shuffle", lane, (unsigned)src, mask, file, line);
  T r;
  std::memcpy(&r, s + src * kSlot, sizeof(T));
  return r;
}
inline unsigned vote_impl(int op, unsigned mask, int pred, const char* file, int line) {
  const int p = pred ? 1 : 0;
  const unsigned char* s = warp_collective(mask, op, &p, sizeof(int), file, line);
  unsigned ballot = 0;
  for (int i = 0; i < 32; ++i) {
    if (!(mask >> i & 1u)) continue;
    int v;
    std::memcpy(&v, s + i * kSlot, sizeof(int));
    if (v) ballot |= 1u << i;
  }
  if (op == kAny) return ballot != 0;
  if (op == kAll) return ballot == mask;
  return ballot;
}
template <class T>
inline T reduce_impl(int kind, unsigned mask, T v, const char* file, int line) {
  const unsigned char* s = warp_collective(mask, kReduce + 16 * kind, &v, sizeof(T), file, line);
  bool first = true;
  T acc{};
  for (int i = 0; i < 32; ++i) {
    if (!(mask >> i & 1u)) continue;
    T x;
    std::memcpy(&x, s + i * kSlot, sizeof(T));
    if (first) acc = x, first = false;
    else if (kind == 0) acc = acc + x;
    else if (kind == 1) acc = x < acc ? x : acc;
    else if (kind == 2) acc = x > acc ? x : acc;
    else if (kind == 3) acc = acc & x;
    else if (kind == 4) acc = acc | x;
    else acc = acc ^ x;
  }
  return acc;
}
}  // namespace gptk_emu

#define __shfl_sync(mask, var, ...) ::gptk_emu::shfl_sync_(mask, var, __VA_ARGS__, __FILE__, __LINE__)
namespace gptk_emu {
template <class T>
inline T shfl_sync_(unsigned m, T v, int src, const char* f, int l) { return shfl_impl(kShfl, m, v, src, 32, f, l); }
template <class T>
inline T shfl_sync_(unsigned m, T v, int src, int w, const char* f, int l) { return shfl_impl(kShfl, m, v, src, w, f, l); }
template <class T>
inline T shfl_up_sync_(unsigned m, T v, unsigned d, const char* f, int l) { return shfl_impl(kShflUp, m, v, (int)d, 32, f, l); }
template <class T>
inline T shfl_up_sync_(unsigned m, T v, unsigned d, int w, const char* f, int l) { return shfl_impl(kShflUp, m, v, (int)d, w, f, l); }
template <class T>
inline T shfl_down_sync_(unsigned m, T v, unsigned d, const char* f, int l) { return shfl_impl(kShflDown, m, v, (int)d, 32, f, l); }
template <class T>
inline T shfl_down_sync_(unsigned m, T v, unsigned d, int w, const char* f, int l) { return shfl_impl(kShflDown, m, v, (int)d, w, f, l); }
template <class T>
inline T shfl_xor_sync_(unsigned m, T v, int x, const char* f, int l) { return shfl_impl(kShflXor, m, v, x, 32, f, l); }
template <class T>
inline T shfl_xor_sync_(unsigned m, T v, int x, int w, const char* f, int l) { return shfl_impl(kShflXor, m, v, x, w, f, l); }
inline void syncwarp_(unsigned m, const char* f, int l) { warp_collective(m, kSyncwarp, nullptr, 0, f, l); }
}  // namespace gptk_emu
#define __shfl_up_sync(mask, var, ...) ::gptk_emu::shfl_up_sync_(mask, var, __VA_ARGS__, __FILE__, __LINE__)
#define __shfl_down_sync(mask, var, ...) ::gptk_emu::shfl_down_sync_(mask, var, __VA_ARGS__, __FILE__, __LINE__)
#define __shfl_xor_sync(mask, var, ...) ::gptk_emu::shfl_xor_sync_(mask, var, __VA_ARGS__, __FILE__, __LINE__)
#define __ballot_sync(mask, pred) ::gptk_emu::vote_impl(::gptk_emu::kBallot, (mask), (pred), __FILE__, __LINE__)
#define __any_sync(mask, pred) ((int)::gptk_emu::vote_impl(::gptk_emu::kAny, (mask), (pred), __FILE__, __LINE__))
#define __all_sync(mask, pred) ((int)::gptk_emu::vote_impl(::gptk_emu::kAll, (mask), (pred), __FILE__, __LINE__))
#define __syncwarp(...) ::gptk_emu::syncwarp_(GPTK_EMU_MASK_OR_FULL(__VA_ARGS__), __FILE__, __LINE__)
#define GPTK_EMU_MASK_OR_FULL(...) (0xffffffffu __VA_OPT__(& 0u) __VA_OPT__(| (__VA_ARGS__)))
#define __reduce_add_sync(mask, v) ::gptk_emu::reduce_impl(0, (mask), (v), __FILE__, __LINE__)
#define __reduce_min_sync(mask, v) ::gptk_emu::reduce_impl(1, (mask), (v), __FILE__, __LINE__)
#define __reduce_max_sync(mask, v) ::gptk_emu::reduce_impl(2, (mask), (v), __FILE__, __LINE__)
#define __reduce_and_sync(mask, v) ::gptk_emu::reduce_impl(3, (mask), (v), __FILE__, __LINE__)
#define __reduce_or_sync(mask, v) ::gptk_emu::reduce_impl(4, (mask), (v), __FILE__, __LINE__)
#define __reduce_xor_sync(mask, v) ::gptk_emu::reduce_impl(5, (mask), (v), __FILE__, __LINE__)
// The lanes that exist and have not exited (the hardware gives the lanes converged at this point,
// which the emulation does not track).
#define __activemask() ::gptk_emu::live_lanes()

// ---- inline PTX, as translate.py rewrites it --------------------------------------------------------
namespace gptk_emu {
namespace ptx {
template <class T>
inline uint32_t b32(const T& v) {
  static_assert(sizeof(T) == 4, "a 32-bit PTX operand");
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}
template <class T>
inline uint16_t b16(const T& v) {
  static_assert(sizeof(T) <= 4, "a 16-bit PTX operand");
  if constexpr (sizeof(T) == 2) {
    uint16_t u;
    std::memcpy(&u, &v, 2);
    return u;
  } else {
    return (uint16_t)v;
  }
}
template <class T>
inline uint64_t b64(const T& v) {
  if constexpr (std::is_pointer_v<T>) {
    return (uint64_t)reinterpret_cast<uintptr_t>(v);
  } else {
    static_assert(sizeof(T) == 8, "a 64-bit PTX operand");
    uint64_t u;
    std::memcpy(&u, &v, 8);
    return u;
  }
}
template <class D>
inline void set32(D& d, uint32_t bits) {
  static_assert(sizeof(D) == 4, "a 32-bit PTX result");
  std::memcpy(&d, &bits, 4);
}
inline float f32(uint32_t bits) { return u2f(bits); }
// ex2.approx(.ftz).f32: 2^x (host exp2f; the hardware is within 2 ulp). ftz flushes subnormal
// inputs and results to zero.
inline uint32_t ex2(uint32_t xb, bool ftz) {
  float x = u2f(xb);
  if (ftz && std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  float y = exp2f(x);
  if (ftz && std::fpclassify(y) == FP_SUBNORMAL) y = 0.f;
  return f2u(y);
}
inline uint32_t cvt_f32_f16(uint16_t h) { return f2u(half_bits_to_float(h)); }
inline uint32_t cvt_f32_bf16(uint16_t h) { return f2u(bf16_bits_to_float(h)); }
inline uint16_t cvt_rn_f16_f32(uint32_t f) { return float_to_half_bits(u2f(f)); }
inline uint16_t cvt_rn_bf16_f32(uint32_t f) { return float_to_bf16_bits(u2f(f)); }

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{,.trans}.shared.b16 (warp collective).
void ldmatrix(int num, bool trans, uint32_t addr, uint32_t* regs, const char* file, int line);
template <class... R>
inline void ldmatrix_(int num, bool trans, uint32_t addr, const char* file, int line, R&... r) {
  uint32_t regs[4] = {0, 0, 0, 0};
  ldmatrix(num, trans, addr, regs, file, line);
  int i = 0;
  (set32(r, regs[i++]), ...);
}
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (warp collective).
void mma_m16n8k16(bool bf16, float* d, const uint32_t* a, const uint32_t* b, const float* c, const char* file, int line);
template <class D>
inline void mma_m16n8k16_(bool bf16, D& d0, D& d1, D& d2, D& d3, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                          uint32_t b0, uint32_t b1, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, const char* file,
                          int line) {
  const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
  const float c[4] = {u2f(c0), u2f(c1), u2f(c2), u2f(c3)};
  float d[4];
  mma_m16n8k16(bf16, d, a, b, c, file, line);
  set32(d0, f2u(d[0])), set32(d1, f2u(d[1])), set32(d2, f2u(d[2])), set32(d3, f2u(d[3]));
}
[[noreturn]] void unsupported(const char* text, const char* file, int line);

// ---- sm_90 (cuda_emu_sm90.cpp; semantics and sources there) ----
template <class D>
inline void set64(D& d, uint64_t bits) {
  static_assert(sizeof(D) == 8, "a 64-bit PTX result");
  std::memcpy(&d, &bits, 8);
}
// The address of a wgmma accumulator register (a 32-bit variable of the calling thread).
template <class T>
inline void* regp(T& x) {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable_v<T>, "a 32-bit wgmma accumulator register");
  return static_cast<void*>(&x);
}
uint32_t smem_of(uint64_t generic, const char* file, int line);  // a generic pointer operand of a shared-memory op
void wgmma_fence(const char* file, int line);
void wgmma_commit(const char* file, int line);
void wgmma_wait(int n, const char* file, int line);
// wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{bf16,f16}: d = the thread's n/2 accumulator registers;
// a = nullptr (SS: A from desc_a) or the thread's 4 A-fragment registers (RS).
void wgmma(int n, bool bf16, void* const* d, uint64_t desc_a, const uint32_t* a, uint64_t desc_b, int scale_d,
           int scale_a, int scale_b, int trans_a, int trans_b, const char* file, int line);
void fence_proxy_async(const char* file, int line);
void mbar_init(uint32_t addr, uint32_t count, const char* file, int line);
uint64_t mbar_arrive(uint32_t addr, uint32_t expect_tx, const char* file, int line);
void mbar_expect_tx(uint32_t addr, uint32_t tx, const char* file, int line);
bool mbar_try_wait_parity(uint32_t addr, uint32_t parity, const char* file, int line);
void tma_load(int rank, uint32_t dst, const void* tmap, const int32_t* coords, uint32_t mbar, const char* file,
              int line);
void tma_store(int rank, const void* tmap, const int32_t* coords, uint32_t src, const char* file, int line);
void bulk_commit(const char* file, int line);
void bulk_wait(int n, bool read, const char* file, int line);
void prefetch_tensormap(const void* tmap, const char* file, int line);
void named_barrier(int id, int count, bool sync, const char* file, int line);
void setmaxnreg(bool inc, int n, const char* file, int line);
uint32_t elect_sync(uint32_t mask, bool* pred, const char* file, int line);
void stmatrix(int num, bool trans, uint32_t addr, const uint32_t* regs, const char* file, int line);
}  // namespace ptx
}  // namespace gptk_emu

// ---- runtime API ---------------------------------------------------------------------------------------
const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int dev);
cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaFree(void* p);
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t s);
cudaError_t cudaFreeAsync(void* p, cudaStream_t s);
cudaError_t cudaMemset(void* p, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = nullptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaDeviceSynchronize();

// Driver entry points (the only one emulated: cuTensorMapEncodeTiled, for TMA tensor maps).
enum cudaGetDriverEntryPointFlags {
  cudaEnableDefault = 0x0,
  cudaEnableLegacyStream = 0x1,
  cudaEnablePerThreadDefaultStream = 0x2,
};
enum cudaDriverEntryPointQueryResult {
  cudaDriverEntryPointSuccess = 0,
  cudaDriverEntryPointSymbolNotFound = 1,
  cudaDriverEntryPointVersionNotSufficent = 2,
};
cudaError_t cudaGetDriverEntryPoint(const char* symbol, void** funcPtr, unsigned long long flags,
                                    cudaDriverEntryPointQueryResult* driverStatus = nullptr);
cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** funcPtr, unsigned int cudaVersion,
                                             unsigned long long flags,
                                             cudaDriverEntryPointQueryResult* driverStatus = nullptr);

// ---- driver API types (<cuda.h>, CUDA 13.0: the tensor map part) ---------------------------------------
#define CUDAAPI
typedef uint32_t cuuint32_t;
typedef uint64_t cuuint64_t;
enum cudaError_enum {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_NOT_SUPPORTED = 801,
};
typedef enum cudaError_enum CUresult;
#define CU_TENSOR_MAP_NUM_QWORDS 16
typedef struct CUtensorMap_st {
  alignas(128) cuuint64_t opaque[CU_TENSOR_MAP_NUM_QWORDS];
} CUtensorMap;
typedef enum CUtensorMapDataType_enum {
  CU_TENSOR_MAP_DATA_TYPE_UINT8 = 0,
  CU_TENSOR_MAP_DATA_TYPE_UINT16,
  CU_TENSOR_MAP_DATA_TYPE_UINT32,
  CU_TENSOR_MAP_DATA_TYPE_INT32,
  CU_TENSOR_MAP_DATA_TYPE_UINT64,
  CU_TENSOR_MAP_DATA_TYPE_INT64,
  CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
  CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
  CU_TENSOR_MAP_DATA_TYPE_FLOAT64,
  CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
  CU_TENSOR_MAP_DATA_TYPE_FLOAT32_FTZ,
  CU_TENSOR_MAP_DATA_TYPE_TFLOAT32,
  CU_TENSOR_MAP_DATA_TYPE_TFLOAT32_FTZ,
  CU_TENSOR_MAP_DATA_TYPE_16U4_ALIGN8B,
  CU_TENSOR_MAP_DATA_TYPE_16U4_ALIGN16B,
  CU_TENSOR_MAP_DATA_TYPE_16U6_ALIGN16B
} CUtensorMapDataType;
typedef enum CUtensorMapInterleave_enum {
  CU_TENSOR_MAP_INTERLEAVE_NONE = 0,
  CU_TENSOR_MAP_INTERLEAVE_16B,
  CU_TENSOR_MAP_INTERLEAVE_32B
} CUtensorMapInterleave;
typedef enum CUtensorMapSwizzle_enum {
  CU_TENSOR_MAP_SWIZZLE_NONE = 0,
  CU_TENSOR_MAP_SWIZZLE_32B,
  CU_TENSOR_MAP_SWIZZLE_64B,
  CU_TENSOR_MAP_SWIZZLE_128B,
  CU_TENSOR_MAP_SWIZZLE_128B_ATOM_32B,
  CU_TENSOR_MAP_SWIZZLE_128B_ATOM_32B_FLIP_8B,
  CU_TENSOR_MAP_SWIZZLE_128B_ATOM_64B
} CUtensorMapSwizzle;
typedef enum CUtensorMapL2promotion_enum {
  CU_TENSOR_MAP_L2_PROMOTION_NONE = 0,
  CU_TENSOR_MAP_L2_PROMOTION_L2_64B,
  CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
  CU_TENSOR_MAP_L2_PROMOTION_L2_256B
} CUtensorMapL2promotion;
typedef enum CUtensorMapFloatOOBfill_enum {
  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0,
  CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA
} CUtensorMapFloatOOBfill;
// Emulated: validates its arguments as the driver documents them and stores them in the opaque map
// (cuda_emu_sm90.cpp). Kernels get it through cudaGetDriverEntryPoint (no -lcuda).
CUresult cuTensorMapEncodeTiled(CUtensorMap* tensorMap, CUtensorMapDataType tensorDataType, cuuint32_t tensorRank,
                                void* globalAddress, const cuuint64_t* globalDim, const cuuint64_t* globalStrides,
                                const cuuint32_t* boxDim, const cuuint32_t* elementStrides,
                                CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                                CUtensorMapL2promotion l2Promotion, CUtensorMapFloatOOBfill oobFill);
typedef CUresult(CUDAAPI* PFN_cuTensorMapEncodeTiled_v12000)(
    CUtensorMap* tensorMap, CUtensorMapDataType tensorDataType, cuuint32_t tensorRank, void* globalAddress,
    const cuuint64_t* globalDim, const cuuint64_t* globalStrides, const cuuint32_t* boxDim,
    const cuuint32_t* elementStrides, CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
    CUtensorMapL2promotion l2Promotion, CUtensorMapFloatOOBfill oobFill);
#define PFN_cuTensorMapEncodeTiled PFN_cuTensorMapEncodeTiled_v12000

template <class F>
inline cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  return gptk_emu::set_func_attribute(reinterpret_cast<const void*>(fn), (int)attr, value);
}
template <class F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F* fn, int block, size_t smem,
                                                                 unsigned int flags = 0) {
  (void)flags;
  return gptk_emu::occupancy(n, reinterpret_cast<const void*>(fn), block, smem);
}
