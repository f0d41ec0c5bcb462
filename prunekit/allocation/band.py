"""Two-stage symmetric eigenvalues: dense -> band on the device, band -> eigenvalues on the host.

A one-stage eigensolver (LAPACK's sytrd, cuSOLVER's syevd) reduces the matrix to tridiagonal form one
column at a time: n matrix-vector products over the trailing matrix, a long chain of small,
memory-bound GPU kernels (~120 ms for one float64 4096 x 4096 matrix on an H100, and barely less in
float32). The two-stage reduction (Bischof, Lang and Sun's successive band reduction, LAPACK's
dsytrd_2stage) first reduces to a band of half-width b by blocked Householder transformations, all
matrix-matrix products, batched here over many matrices at once; the band (n x (b+1) numbers) then
goes to the host, where LAPACK's dsbev (band -> tridiagonal -> eigenvalues, O(n^2 b)) runs, one matrix
per thread, while the device reduces the next batch. Both stages are orthogonal similarity
transformations in float64: the eigenvalues are backward stable, like eigvalsh's.

band_reduce is a pure function on tensors (any device); band_eigvalsh calls LAPACK through SciPy's
Cython LAPACK table with ctypes, which releases the GIL, so threads run in parallel.

Measured on an H100 with 16 host cores (README, "AlphaPruning's ESD on the GPU"): the device half
is bound by its ~15 kernel launches a column (~2.4 s a batch of 32 Grams of 4096, whatever b), the
host half by dsbev (~1.5 s a matrix a thread at b = 16); LLaMA-7B's 224 Grams took 22.0 s against
cuSOLVER's 26.7 s.
"""

import ctypes
import functools

import torch

BAND = 16  # half-bandwidth (--esd-band): narrower moves work from the host's LAPACK (O(n^2 b)) to the device


def _householder_panel(P: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Householder QR of the first p columns of P (B, m, c), m > p, in place (LAPACK dgeqr2 and
    dlarfg's reflector, column by column). Every reflector is applied to all c columns, so P ends as
    H^T P with H = H_1 ... H_p = I - V T V^T. Returns V (B, m, p), unit lower trapezoidal, and T (B, p, p),
    upper triangular, from T^-1 = diag(1/tau) + striu(V^T V) (Joffrain et al. 2006), where
    tau_j = 2 / ||v_j||^2 makes each H_j = I - tau_j v_j v_j^T an exact reflector. A column with nothing
    to zero gets v = 0 (H_j = I). About 15 small kernels a column: the device's cost is in launches."""
    B, m, _ = P.shape
    V = P.new_zeros(B, m, p)
    tiny = torch.finfo(P.dtype).tiny
    for j in range(p):
        x = P[:, j:, j]
        alpha = x[:, 0]
        sigma = x[:, 1:].norm(dim=1)
        denom = alpha + torch.copysign(torch.hypot(alpha, sigma), alpha)  # alpha - beta, beta = -sign(alpha) r
        live = sigma > 0
        v = x * torch.where(live, denom, torch.inf).reciprocal()[:, None]
        v[:, 0] = live
        V[:, j:, j] = v
        tau = torch.linalg.vecdot(v, v).clamp_min_(tiny).reciprocal_().mul_(2.0)  # v = 0: 0 * 2/tiny = 0
        rest = P[:, j:, j:]  # H_j is symmetric: rest -= tau v (v^T rest)
        rest.baddbmm_((tau[:, None] * v).unsqueeze(2), torch.bmm(v.unsqueeze(1), rest), alpha=-1.0)
    gram = V.mT @ V
    half = torch.diagonal(gram, dim1=1, dim2=2) / 2  # 1 / tau_j; a dead column's T_jj = 1 (its v is 0)
    Tinv = torch.triu(gram, diagonal=1) + torch.diag_embed(torch.where(half > 0, half, 1.0))
    eye = torch.eye(p, dtype=P.dtype, device=P.device).expand(B, p, p)
    T = torch.linalg.solve_triangular(Tinv, eye, upper=True)
    return V, T


def band_reduce(A: torch.Tensor, b: int | None = None) -> torch.Tensor:
    """Symmetric A (B, n, n) -> the band form of an orthogonally similar matrix, in LAPACK's lower band
    storage transposed: out[:, j, d] = A'[j + d, j] for d = 0..b (zero past the end), shape (B, n, b+1),
    float64, on A's device. A is overwritten (it ends holding A' in its lower triangle).

    For each panel of b columns k..k+b-1: the block below the band, P = A[k+b:, k:k+b] (m x b), is
    reduced to upper triangular by H^T (Householder, H = I - V T V^T), and the trailing matrix
    A22 = A[k+b:, k+b:] becomes H^T A22 H = A22 - Z V^T - V Z^T, with Y = A22 V T and
    Z = Y - 1/2 V (T^T V^T Y): one matrix product over A22 and one rank-2b update of it."""
    if A.dim() != 3 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"band_reduce needs a batch of square matrices, got shape {tuple(A.shape)}")
    B, n, _ = A.shape
    b = BAND if b is None else b
    if b < 1:
        raise ValueError(f"band_reduce needs a half-bandwidth >= 1, got {b}")
    b = max(1, min(b, n - 1))
    for k in range(0, n, b):
        m = n - k - b
        p = min(b, m - 1)  # columns with something below their diagonal to zero
        if p <= 0:
            break
        P = A[:, k + b:, k:k + b]
        panel = P.clone()
        V, T = _householder_panel(panel, p)
        P.copy_(panel)
        A22 = A[:, k + b:, k + b:]
        Y = torch.bmm(A22, V) @ T
        Z = Y - 0.5 * (V @ (T.mT @ (V.mT @ Y)))
        A22.baddbmm_(torch.cat([Z, V], dim=2), torch.cat([V, Z], dim=2).mT, alpha=-1.0)
    out = A.new_zeros(B, n, b + 1)
    for d in range(min(b, n - 1) + 1):
        out[:, :n - d, d] = torch.diagonal(A, offset=-d, dim1=1, dim2=2)
    return out


class BandReduceGraph:
    """band_reduce of a (B, n, n) batch at half-width b, captured once as a CUDA graph and replayed for
    every batch of that shape. The eager reduction is bound by its ~15 kernel launches a column (~40 us
    each on an H100, README); a replay issues the same kernels from the driver, without Python and the
    dispatcher in between. Capturing costs about one eager run, so it pays from the second batch on.
    Write the Grams into `.grams`, call the object, read the bands it returns (overwritten by the next
    call). CUDA only; `--esd-graph` turns it on (esd._two_stage), not yet the default: unmeasured."""

    def __init__(self, B: int, n: int, b: int | None, device: torch.device):
        b = BAND if b is None else b
        self.grams = torch.zeros(B, n, n, dtype=torch.float64, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # the libraries' lazy set-up (cuBLAS handles, workspaces) outside the capture
            m = min(n, b + 3)
            band_reduce(torch.eye(m, dtype=torch.float64, device=device)[None], b)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a weight prefetcher) neither break the capture nor fail
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.bands = band_reduce(self.grams, b)

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.bands


@functools.cache
def _dsbev():
    """LAPACK dsbev from SciPy's Cython LAPACK table, as a ctypes function (GIL released), or None."""
    try:
        from scipy.linalg import cython_lapack
        capsule = cython_lapack.__pyx_capi__["dsbev"]
        api = ctypes.pythonapi
        api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        pointer = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    except Exception:  # no SciPy, or a build without the table: the caller falls back to eigvalsh
        return None
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 11)(pointer)


def host_band_solver() -> bool:
    """Whether band_eigvalsh can run here (SciPy's LAPACK is importable)."""
    return _dsbev() is not None


def band_eigvalsh(band: torch.Tensor) -> torch.Tensor:
    """Eigenvalues, ascending, float64, of one symmetric band matrix in band_reduce's storage (n, b+1) on
    the CPU: LAPACK dsbev (jobz N: band -> tridiagonal -> dsterf). Releases the GIL while it runs."""
    f = _dsbev()
    if f is None:
        raise RuntimeError("the two-stage ESD needs SciPy's LAPACK: pip install scipy")
    n, ldab = band.shape
    ab = band.detach().to("cpu", torch.float64, memory_format=torch.contiguous_format, copy=True)  # dsbev overwrites it
    w = torch.empty(n, dtype=torch.float64)
    work = torch.empty(max(1, 3 * n - 2), dtype=torch.float64)
    z = torch.empty(1, dtype=torch.float64)
    ints = (ctypes.c_int * 5)(n, ldab - 1, ldab, 1, 0)  # n, kd, ldab, ldz, info
    jobz, uplo = ctypes.c_char(b"N"), ctypes.c_char(b"L")
    addr = ctypes.addressof
    f(addr(jobz), addr(uplo), addr(ints), addr(ints) + 4, ab.data_ptr(), addr(ints) + 8, w.data_ptr(),
      z.data_ptr(), addr(ints) + 12, work.data_ptr(), addr(ints) + 16)
    if ints[4] != 0:
        raise RuntimeError(f"LAPACK dsbev failed (info {ints[4]}) on a {n} x {n} band matrix")
    return w
