"""How a GEMM of the contract on row-major (or strided) arrays becomes one column-major cuBLAS call.

cuBLAS reads a matrix X either as stored (column-major) or transposed (a row-major X is the transpose of
a column-major one); a matrix that no leading dimension describes (a broadcast, a reversed or doubly
strided view) must be copied first. Pure arithmetic on shapes and strides, tested on the host against
NumPy's matmul: importing it imports no CuPy.
"""

from __future__ import annotations

from dataclasses import dataclass

# dtype -> (cudaDataType of the matrices, cuBLAS compute type); the 16-bit types compute in float32
CUBLAS_TYPES = {
    "float32": ("CUDA_R_32F", "CUBLAS_COMPUTE_32F"),
    "float64": ("CUDA_R_64F", "CUBLAS_COMPUTE_64F"),
    "float16": ("CUDA_R_16F", "CUBLAS_COMPUTE_32F"),
    "bfloat16": ("CUDA_R_16BF", "CUBLAS_COMPUTE_32F"),
}


def blas_layout(shape, strides, itemsize):
    """How cuBLAS (column-major) reads a matrix, or a stack of them, of this layout without a copy.

    shape, strides: of a 2-D (rows, cols) or 3-D (stack, rows, cols) array, strides in bytes.
    Returns (transposed, leading dimension, stack stride) in elements, where ``transposed`` means cuBLAS
    sees the transpose (a row-major matrix); None where no leading dimension fits (then copy).
    """
    if any(s < 0 or s % itemsize for s in strides):
        return None
    rows, cols = shape[-2:]
    row_step, col_step = strides[-2] // itemsize, strides[-1] // itemsize
    stack_step = strides[0] // itemsize if len(shape) == 3 else 0
    if col_step == 1 or cols == 1:  # rows are contiguous: the transpose of a column-major matrix
        lead = row_step if rows > 1 else cols
        if lead >= cols:
            return True, lead, stack_step
    if row_step == 1 or rows == 1:  # columns are contiguous: column-major
        lead = col_step if cols > 1 else rows
        if lead >= rows:
            return False, lead, stack_step
    return None


@dataclass(frozen=True)
class CublasGemm:
    """One column-major cuBLAS call, for each of ``batch`` products: C = op(first) @ op(second), where
    C (m, n) is ``out`` or, when cuBLAS must write out's transpose, out.T = op(b).T @ op(a).T."""

    first_is_a: bool
    trans_first: bool
    ld_first: int
    stride_first: int
    trans_second: bool
    ld_second: int
    stride_second: int
    ld_out: int
    stride_out: int
    m: int
    n: int
    k: int
    batch: int


def cublas_gemm(a, b, out, trans_a, trans_b) -> CublasGemm:
    """The cuBLAS call for out = op(a) @ op(b) on arrays that ``blas_layout`` describes (2-D or 3-D).

    cuBLAS reads a matrix X either as stored (column-major) or transposed (row-major); its op flag is
    then "X is transposed" xor "op transposes X". A row-major ``out`` is written as out.T instead.
    """
    (a_t, lda, stride_a), (b_t, ldb, stride_b), (out_t, ldc, stride_c) = (
        blas_layout(x.shape, x.strides, x.itemsize) for x in (a, b, out)
    )
    m, n = out.shape[-2:]
    k = a.shape[-2] if trans_a else a.shape[-1]
    batch = out.shape[0] if out.ndim == 3 else 1
    op_a, op_b = a_t != trans_a, b_t != trans_b
    if out_t:
        return CublasGemm(False, not op_b, ldb, stride_b, not op_a, lda, stride_a, ldc, stride_c, n, m, k, batch)
    return CublasGemm(True, op_a, lda, stride_a, op_b, ldb, stride_b, ldc, stride_c, m, n, k, batch)

