"""Index arithmetic shared by the Triton kernels: 64-bit offsets of a flat index in a 5-d layout."""
import triton
import triton.language as tl


@triton.jit
def strided_offset(idx, s1, s2, s3, s4, t0, t1, t2, t3, t4):
    """Offset of flat (row-major) index `idx` in a tensor of sizes (., s1, s2, s3, s4) with strides t*."""
    i4 = idx % s4
    r = idx // s4
    i3 = r % s3
    r = r // s3
    i2 = r % s2
    r = r // s2
    i1 = r % s1
    i0 = r // s1
    return i0 * t0 + i1 * t1 + i2 * t2 + i3 * t3 + i4 * t4


@triton.jit
def offset(idx, CONTIG: tl.constexpr, s1, s2, s3, s4, t0, t1, t2, t3, t4):
    """`idx` itself for a dense row-major operand (no index arithmetic), else `strided_offset`."""
    if CONTIG:
        off = idx
    else:
        off = strided_offset(idx, s1, s2, s3, s4, t0, t1, t2, t3, t4)
    return off
