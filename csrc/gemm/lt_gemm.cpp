// lt_gemm.cpp: the three GEMMs of a linear layer (forward, input grad, weight grad) on cuBLASLt,
// with the fused epilogues that make a feed-forward block need no extra pass over its hidden
// activation. Plain C++ (cublasLt.h + cuda_runtime.h): the binding passes in torch's cuBLASLt
// handle, workspace and stream, so the extension shares torch's workspace instead of its own.
//
// Layout. cuBLASLt is column-major; a row-major matrix M[r, c] with leading dimension ld is the
// column-major matrix M^T[c, r] with the same ld. So for torch's y[n, out] = x[n, in] W[out, in]^T
// we compute the column-major D = y^T[out, n] = W[out, in] x^T[in, n]:
//   forward  D[out, n]  = op(A)=W   (A = W stored [in, out], transa = T) * B = x^T  (x stored [in, n], N)
//   dgrad    D[in, n]   = A = W^T   (W stored [in, out], N)              * B = dy^T (dy stored [out, n], N)
//   wgrad    D[in, out] = A = x^T   (x stored [in, n], N)                * op(B)=dy (dy stored [out, n], T)
// Epilogue vectors then line up with torch's features: the bias (forward) and bias gradient
// (DGELU_BGRAD / DRELU_BGRAD) run along D's rows = output features; BGRADB reduces op(B) over the
// GEMM's k = the token dimension and gives one value per column of D = per output feature of the
// layer whose weight gradient this is. The epilogue's aux matrix (GELU pre-activation, ReLU bit
// mask) has D's shape, i.e. row-major [n, features] with aux_ld >= features (GELU: aux_ld % 8 == 0;
// ReLU: aux_ld in bits, % 128 == 0).
//
// Algorithms. cublasLtMatmulAlgoGetHeuristic costs tens of microseconds of CPU, so the chosen
// algorithm is cached per problem: shapes, leading dimensions, dtypes, epilogue, device, workspace
// size and the alignment of every pointer (heuristics pick kernels by alignment, which is why we
// also tell them the real alignment of A, B, C, D instead of cuBLASLt's default assumption of 256
// bytes: a view with a storage offset may be only 2-byte aligned).
#include "gemm/lt_gemm.h"

#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

namespace gptk {
namespace {

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::kFloat32: return CUDA_R_32F;
    case DType::kFloat16: return CUDA_R_16F;
    case DType::kBFloat16: return CUDA_R_16BF;
  }
  return CUDA_R_32F;
}

uint32_t ptr_alignment(const void* p) {
  if (p == nullptr) return 256;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t low = a & (~a + 1);  // lowest set bit
  return low >= 256 ? 256u : static_cast<uint32_t>(low);
}

struct Matmul {
  DType ab_type, d_type;
  bool trans_a, trans_b;
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* d;
  int64_t ldd;
  float beta;  // 0: D = A*B; 1: D += A*B
  LtEpilogue epi;
};

using AlgoKey = std::tuple<int, int, int, int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int,
                           int64_t, int, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, size_t>;

std::mutex g_cache_mutex;
std::map<AlgoKey, cublasLtMatmulAlgo_t> g_algo_cache;

#define LT_CHECK(expr)                               \
  do {                                               \
    cublasStatus_t s_ = (expr);                      \
    if (s_ != CUBLAS_STATUS_SUCCESS) return s_;      \
  } while (0)

cublasStatus_t run_matmul(const LtContext& ctx, const Matmul& p) {
  if (p.m == 0 || p.n == 0) return CUBLAS_STATUS_SUCCESS;
  const cudaDataType_t ab = cuda_type(p.ab_type), dt = cuda_type(p.d_type);
  cublasLtMatmulDescOpaque_t desc_storage = {};
  cublasLtMatmulDesc_t desc = &desc_storage;
  LT_CHECK(cublasLtMatmulDescInit(desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  LT_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  LT_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  const cublasLtEpilogue_t epi = p.epi.op;
  LT_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  const void* bias_ptr = p.epi.bias_grad != nullptr ? p.epi.bias_grad : p.epi.bias;
  if (bias_ptr != nullptr)
    LT_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr, sizeof(bias_ptr)));
  if (p.epi.aux != nullptr) {
    LT_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &p.epi.aux,
                                            sizeof(p.epi.aux)));
    const int64_t aux_ld = p.epi.aux_ld;
    LT_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)));
  }

  cublasLtMatrixLayoutOpaque_t la = {}, lb = {}, ld = {};
  // Stored (column-major) shapes: op(A) is m x k, op(B) is k x n.
  LT_CHECK(cublasLtMatrixLayoutInit(&la, ab, p.trans_a ? p.k : p.m, p.trans_a ? p.m : p.k, p.lda));
  LT_CHECK(cublasLtMatrixLayoutInit(&lb, ab, p.trans_b ? p.n : p.k, p.trans_b ? p.k : p.n, p.ldb));
  LT_CHECK(cublasLtMatrixLayoutInit(&ld, dt, p.m, p.n, p.ldd));

  const uint32_t al_a = ptr_alignment(p.a), al_b = ptr_alignment(p.b), al_d = ptr_alignment(p.d);
  const AlgoKey key{ctx.device, (int)p.ab_type, (int)p.d_type, (int)p.trans_a, (int)p.trans_b, p.m, p.n, p.k,
                    p.lda, p.ldb, p.ldd, (int)epi, p.epi.aux_ld, p.beta != 0.f ? 1 : 0, al_a, al_b, al_d,
                    ptr_alignment(bias_ptr), ptr_alignment(p.epi.aux), ctx.workspace_size};
  cublasLtMatmulAlgo_t algo;
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    auto it = g_algo_cache.find(key);
    if (it != g_algo_cache.end()) {
      algo = it->second;
      cached = true;
    }
  }
  if (!cached) {
    cublasLtMatmulPreferenceOpaque_t pref_storage = {};
    cublasLtMatmulPreference_t pref = &pref_storage;
    LT_CHECK(cublasLtMatmulPreferenceInit(pref));
    const uint64_t ws = ctx.workspace_size;
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a,
                                                  sizeof(al_a)));
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b,
                                                  sizeof(al_b)));
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_d,
                                                  sizeof(al_d)));
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d,
                                                  sizeof(al_d)));
    cublasLtMatmulHeuristicResult_t result = {};
    int found = 0;
    LT_CHECK(cublasLtMatmulAlgoGetHeuristic(ctx.handle, desc, &la, &lb, &ld, &ld, pref, 1, &result, &found));
    if (found == 0) return CUBLAS_STATUS_NOT_SUPPORTED;
    algo = result.algo;
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    g_algo_cache.emplace(key, algo);
  }
  const float alpha = 1.f, beta = p.beta;
  return cublasLtMatmul(ctx.handle, desc, &alpha, p.a, &la, p.b, &lb, &beta, p.d, &ld, p.d, &ld, &algo,
                        ctx.workspace, ctx.workspace_size, ctx.stream);
}

}  // namespace

cublasStatus_t lt_linear_forward(const LtContext& ctx, DType dtype, const void* x, const void* w, void* y,
                                 int64_t n, int64_t in, int64_t out, int64_t ldy, const LtEpilogue& epi) {
  Matmul p{dtype, dtype, /*trans_a=*/true, /*trans_b=*/false, /*m=*/out, /*n=*/n, /*k=*/in,
           w, /*lda=*/in, x, /*ldb=*/in, y, ldy, 0.f, epi};
  return run_matmul(ctx, p);
}

cublasStatus_t lt_linear_dgrad(const LtContext& ctx, DType dtype, const void* dy, int64_t lddy, const void* w,
                               void* dx, int64_t n, int64_t in, int64_t out, const LtEpilogue& epi) {
  Matmul p{dtype, dtype, /*trans_a=*/false, /*trans_b=*/false, /*m=*/in, /*n=*/n, /*k=*/out,
           w, /*lda=*/in, dy, /*ldb=*/lddy, dx, /*ldd=*/in, 0.f, epi};
  return run_matmul(ctx, p);
}

cublasStatus_t lt_linear_wgrad(const LtContext& ctx, DType dtype, DType dw_dtype, const void* dy, int64_t lddy,
                               const void* x, void* dw, int64_t n, int64_t in, int64_t out, bool accumulate,
                               void* bias_grad) {
  LtEpilogue epi;
  if (bias_grad != nullptr) {
    epi.op = CUBLASLT_EPILOGUE_BGRADB;
    epi.bias_grad = bias_grad;
  }
  Matmul p{dtype, dw_dtype, /*trans_a=*/false, /*trans_b=*/true, /*m=*/in, /*n=*/out, /*k=*/n,
           x, /*lda=*/in, dy, /*ldb=*/lddy, dw, /*ldd=*/in, accumulate ? 1.f : 0.f, epi};
  return run_matmul(ctx, p);
}

const char* lt_status_string(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED (no algorithm for this problem)";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "unknown cuBLAS status";
  }
}

const char* lt_epilogue_name(cublasLtEpilogue_t e) {
  switch (e) {
    case CUBLASLT_EPILOGUE_DEFAULT: return "DEFAULT";
    case CUBLASLT_EPILOGUE_RELU: return "RELU";
    case CUBLASLT_EPILOGUE_RELU_AUX: return "RELU_AUX";
    case CUBLASLT_EPILOGUE_BIAS: return "BIAS";
    case CUBLASLT_EPILOGUE_RELU_BIAS: return "RELU_BIAS";
    case CUBLASLT_EPILOGUE_RELU_AUX_BIAS: return "RELU_AUX_BIAS";
    case CUBLASLT_EPILOGUE_DRELU: return "DRELU";
    case CUBLASLT_EPILOGUE_DRELU_BGRAD: return "DRELU_BGRAD";
    case CUBLASLT_EPILOGUE_GELU: return "GELU";
    case CUBLASLT_EPILOGUE_GELU_AUX: return "GELU_AUX";
    case CUBLASLT_EPILOGUE_GELU_BIAS: return "GELU_BIAS";
    case CUBLASLT_EPILOGUE_GELU_AUX_BIAS: return "GELU_AUX_BIAS";
    case CUBLASLT_EPILOGUE_DGELU: return "DGELU";
    case CUBLASLT_EPILOGUE_DGELU_BGRAD: return "DGELU_BGRAD";
    case CUBLASLT_EPILOGUE_BGRADA: return "BGRADA";
    case CUBLASLT_EPILOGUE_BGRADB: return "BGRADB";
    default: return "unknown epilogue";
  }
}

}  // namespace gptk
