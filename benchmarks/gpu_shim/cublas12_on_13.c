/* A stand-in libcublas.so.12 for the lent GPU machine only (benchmarks/gpu_check.sh).
 *
 * The faiss GPU wheel (faiss-gpu-cu12) links cuBLAS 12; that machine has cuBLAS 13 (torch's CUDA 13 build)
 * and no network, and the cuBLAS 12 wheel (~0.5 GB) cannot travel there. faiss calls eight cuBLAS
 * functions whose C signatures are unchanged in cuBLAS 13, so this library exports them under the
 * "libcublas.so.12" symbol version and forwards each call to libcublas.so.13, loaded on first use.
 * A user's machine gets the real cuBLAS 12 from pip (nvidia-cublas-cu12) and never needs this.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef int status_t; /* cublasStatus_t; 0 is CUBLAS_STATUS_SUCCESS */

static void *cublas13(const char *name) {
    static void *library = NULL;
    if (library == NULL) {
        library = dlopen("libcublas.so.13", RTLD_NOW | RTLD_GLOBAL);
        if (library == NULL) {
            fprintf(stderr, "cublas12_on_13: cannot load libcublas.so.13: %s\n", dlerror());
            abort();
        }
    }
    void *function = dlsym(library, name);
    if (function == NULL) {
        fprintf(stderr, "cublas12_on_13: libcublas.so.13 has no %s\n", name);
        abort();
    }
    return function;
}

#define FORWARD(name, params, args)                                   \
    status_t name params {                                            \
        static status_t(*target) params = NULL;                       \
        if (target == NULL) target = (status_t(*) params)cublas13(#name); \
        return target args;                                           \
    }

FORWARD(cublasCreate_v2, (void **handle), (handle))
FORWARD(cublasDestroy_v2, (void *handle), (handle))
FORWARD(cublasSetStream_v2, (void *handle, void *stream), (handle, stream))
FORWARD(cublasGetMathMode, (void *handle, int *mode), (handle, mode))
FORWARD(cublasSetMathMode, (void *handle, int mode), (handle, mode))
FORWARD(cublasSgemmEx,
        (void *h, int ta, int tb, int m, int n, int k, const float *alpha, const void *A, int Atype, int lda,
         const void *B, int Btype, int ldb, const float *beta, void *C, int Ctype, int ldc),
        (h, ta, tb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc))
FORWARD(cublasGemmEx,
        (void *h, int ta, int tb, int m, int n, int k, const void *alpha, const void *A, int Atype, int lda,
         const void *B, int Btype, int ldb, const void *beta, void *C, int Ctype, int ldc, int compute, int algo),
        (h, ta, tb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc, compute, algo))
FORWARD(cublasGemmStridedBatchedEx,
        (void *h, int ta, int tb, int m, int n, int k, const void *alpha, const void *A, int Atype, int lda,
         long long sA, const void *B, int Btype, int ldb, long long sB, const void *beta, void *C, int Ctype,
         int ldc, long long sC, int batch, int compute, int algo),
        (h, ta, tb, m, n, k, alpha, A, Atype, lda, sA, B, Btype, ldb, sB, beta, C, Ctype, ldc, sC, batch, compute,
         algo))
