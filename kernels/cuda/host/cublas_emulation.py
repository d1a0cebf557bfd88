"""Column-major cuBLAS's ``gemmStridedBatchedEx`` in NumPy, for the CuPy stand-in (``standin.py``).

It takes what cuBLAS takes (raw device addresses, leading dimensions and strides in elements, op flags,
cudaDataType and cublasComputeType constants, alpha and beta behind host pointers) and refuses
what cuBLAS refuses, with the status cuBLAS would return: an op flag other than N, T or C, a negative
size or batch count, a leading dimension below cuBLAS's bound (lda >= max(1, rows of the stored A)), a
data/compute type pair cuBLAS has no kernel for. Stricter than cuBLAS, because a device would read or
write out of bounds or race: a matrix whose extent leaves its allocation, a negative stride, and outputs
of a batch that overlap. The product is computed in the compute type (float32 for the 16-bit types, as
CUBLAS_COMPUTE_32F) and rounded once to the output type; with beta == 0, C is not read (NaN there does
not propagate), as cuBLAS documents.

Addresses are resolved through ``resolve(address, nbytes)``, given by the caller: the allocation that
holds those bytes, as a flat uint8 array and the offset of the address in it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

# cudaDataType -> storage dtype name; cublasComputeType -> (its NumPy dtype, the ctypes type of alpha, beta)
DATA_TYPES = {0: "float32", 1: "float64", 2: "float16", 14: "bfloat16"}  # CUDA_R_32F, _64F, _16F, _16BF
COMPUTE_TYPES = {68: (np.float32, ctypes.c_float), 70: (np.float64, ctypes.c_double)}  # CUBLAS_COMPUTE_32F, _64F
# the (data type, compute type) pairs gemmEx has a kernel for, among those above
SUPPORTED = {(0, 68), (1, 70), (2, 68), (14, 68)}
OPS = {0: False, 1: True, 2: True}  # CUBLAS_OP_N, _T, _C (C is T for real types) -> transposed
GEMM_DEFAULT = -1


class CublasError(RuntimeError):
    """A cuBLAS call refused, as CuPy's CUBLASError: the message starts with the status's name."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


def invalid(message: str) -> CublasError:
    return CublasError("CUBLAS_STATUS_INVALID_VALUE", message)


@dataclass(frozen=True)
class Matrix:
    """One operand as cuBLAS reads it: ``rows`` x ``cols`` column-major from ``address``, leading
    dimension ``lead``, ``batch`` of them ``stride`` elements apart."""

    name: str
    address: int
    dtype: np.dtype
    rows: int
    cols: int
    lead: int
    stride: int
    batch: int

    def view(self, resolve) -> np.ndarray:
        """(batch, rows, cols) over the allocation, after checking that every element lies inside it."""
        item = self.dtype.itemsize
        last = (self.rows - 1) + (self.cols - 1) * self.lead + (self.batch - 1) * self.stride
        buffer, offset = resolve(self.address, (last + 1) * item, f"matrix {self.name}")
        return np.ndarray((self.batch, self.rows, self.cols), self.dtype, buffer, offset,
                          (self.stride * item, item, self.lead * item))


def gemm_strided_batched_ex(resolve, transa, transb, m, n, k, alpha, a, atype, lda, stride_a,
                            b, btype, ldb, stride_b, beta, c, ctype, ldc, stride_c, batch, compute_type, algo):
    """C_i = alpha op(A_i) op(B_i) + beta C_i for i < batch, with cuBLAS's arguments (see the module
    docstring); raises CublasError where cuBLAS would return an error status."""
    for name, flag in (("transa", transa), ("transb", transb)):
        if flag not in OPS:
            raise invalid(f"{name} = {flag}: expected CUBLAS_OP_N (0), CUBLAS_OP_T (1) or CUBLAS_OP_C (2)")
    for name, size in (("m", m), ("n", n), ("k", k), ("batchCount", batch)):
        if size < 0:
            raise invalid(f"{name} = {size}: expected >= 0")
    trans_a, trans_b = OPS[transa], OPS[transb]
    a_rows, b_rows = (k if trans_a else m), (n if trans_b else k)
    for name, lead, rows in (("lda", lda, a_rows), ("ldb", ldb, b_rows), ("ldc", ldc, m)):
        if lead < max(1, rows):
            raise invalid(f"{name} = {lead}: expected >= max(1, {rows}), the rows of the stored matrix")
    for name, stride in (("strideA", stride_a), ("strideB", stride_b), ("strideC", stride_c)):
        if stride < 0:
            raise invalid(f"{name} = {stride}: expected >= 0")
    if not atype == btype == ctype or (atype, compute_type) not in SUPPORTED:
        raise CublasError("CUBLAS_STATUS_NOT_SUPPORTED", f"Atype {atype}, Btype {btype}, Ctype {ctype} with"
                          f" computeType {compute_type}: expected one of the pairs {sorted(SUPPORTED)}")
    if algo != GEMM_DEFAULT:
        raise invalid(f"algo = {algo}: the emulation has CUBLAS_GEMM_DEFAULT ({GEMM_DEFAULT}) only")
    if batch > 1 and m and n and stride_c < ldc * (n - 1) + m:
        raise invalid(f"strideC = {stride_c}: the {batch} outputs of ldc = {ldc} and {m} x {n} overlap"
                      " (a race on the device; cuBLAS does not check this)")
    if m == 0 or n == 0 or batch == 0:
        return
    compute, scalar = COMPUTE_TYPES[compute_type]
    alpha, beta = scalar.from_address(alpha).value, scalar.from_address(beta).value  # CUBLAS_POINTER_MODE_HOST
    dtype = storage(atype)
    out = Matrix("C", c, dtype, m, n, ldc, stride_c, batch).view(resolve)
    if k == 0 or alpha == 0:
        product = np.zeros(out.shape, compute)
    else:
        op_a = Matrix("A", a, dtype, a_rows, m if trans_a else k, lda, stride_a, batch).view(resolve)
        op_b = Matrix("B", b, dtype, b_rows, k if trans_b else n, ldb, stride_b, batch).view(resolve)
        op_a, op_b = (np.swapaxes(x, 1, 2) if t else x for x, t in ((op_a, trans_a), (op_b, trans_b)))
        product = compute(alpha) * (op_a.astype(compute) @ op_b.astype(compute))
    if beta != 0:  # cuBLAS reads C only where beta is not zero
        product += compute(beta) * out.astype(compute)
    out[...] = product.astype(dtype)


def storage(data_type: int) -> np.dtype:
    from deltaprop.kernels.dtypes import DTYPES

    return DTYPES[DATA_TYPES[data_type]].numpy_dtype()
