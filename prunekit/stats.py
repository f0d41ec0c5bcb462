"""Per-input-channel activation statistics, accumulated in float32 over calibration batches.

One accumulator serves every scorer: Wanda needs the sum of squares, STADE the mean and variance
(merged batch by batch with Chan's parallel form of Welford's update, which stays exact when the
mean is much larger than the spread, unlike E[x^2] - E[x]^2). `centred=False` keeps only the sum of
squares (what Wanda and OWL read): one pass over the batch instead of four. `gram=True` also keeps
X^T X (SparseGPT's Hessian is 2/N_seq of it), accumulated in float32 by one matmul per batch.
`gram="running"` keeps the Hessian itself as the SparseGPT reference accumulates it, a running
average updated batch by batch in the reference's order of float32 operations (running_hessian).

On a GPU (FUSED_REDUCTIONS) each batch is read once: the sum of squares by one float32-accumulating
norm reduction, the mean and M2 by one var_mean, with no squared or centred float32 copy of the
batch (at a 7B shape each copy is hundreds of MB per batch). They agree with the CPU's to float32
rounding (~1e-6 relative; tests/test_stade.py); the CPU keeps its own order of operations, so the
reference protocol's float32 figures are unchanged.

X^T X of a bf16/fp16 batch on a GPU (EXACT_LOW_GRAM) is one bf16/fp16 GEMM with a float32 output
(`torch.mm(..., out_dtype=torch.float32)`): the product of two bf16 (or fp16) numbers is exact in
float32 and the GEMM sums in float32, so it is the float32 GEMM of the same numbers, at the tensor
cores' rate instead of float32's, and with no float32 copy of the batch. (On an H200 the statistics
passes, float32 X^T X included, were 20.4 of SparseGPT's 36.7 s over 8 blocks of a 7B model, before
linears reading one tensor shared one X^T X.) In a bf16 pass the batches that are bf16 are the
inputs of o_proj and down_proj (their producers' outputs); q/k/v and gate/up read the float32
normed residual stream before autocast lowers it, so their X^T X stays the float32 GEMM. At 7B
widths the two bf16 ones are 80 % of the X^T X products (4096^2 + 11008^2 of 3 x 4096^2 + 11008^2).
The CPU has no such kernel and keeps the float32 GEMM, but on the CPU (TRIANGULAR_GRAM) only the
upper triangle of X^T X is accumulated, in GRAM_BANDS bands of rows, one GEMM each (9/16 of the
products at 8 bands), and mirrored once when it is read (`gram_matrix()`). Each entry is the same
dot product over the same tokens as in the full GEMM; on this project's CPU the result is the full
GEMM's bit for bit, in 0.67 to 0.73 of its time at SmolLM2's widths (bench/bench_gram.py,
bench/results/gram.json). The reference arithmetic (`gram="running"`) keeps its own float32
operations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FUSED_REDUCTIONS = {"cuda"}  # device types whose statistics read each batch once (see above)
EXACT_LOW_GRAM = {"cuda"}    # device types whose X^T X of a bf16/fp16 batch is one GEMM to float32 (see above)
TRIANGULAR_GRAM = {"cpu"}    # device types that accumulate the upper triangle of a float32 X^T X only (see above)
GRAM_BANDS = 8
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(a, b, out_dtype) exists (torch >= 2.8)


def low_precision_gram(x: torch.Tensor) -> bool:
    """Whether X^T X of this (tokens, columns) batch is taken by one bf16/fp16 GEMM with a float32 output."""
    return _MM_OUT_DTYPE and x.dtype in (torch.bfloat16, torch.float16) and x.device.type in EXACT_LOW_GRAM


def exact_low_gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X (float32) of a bf16/fp16 (tokens, columns) batch by one GEMM with a float32 output."""
    return torch.mm(x.T, x, out_dtype=torch.float32)


def add_upper_gram(h: torch.Tensor, x: torch.Tensor, bands: int | None = None) -> torch.Tensor:
    """h += X^T X on and above the diagonal, for a float32 (tokens, columns) batch x: rows [i, i + b)
    of h get x[:, i:i+b]^T x[:, i:], one GEMM per band of b = ceil(columns / bands) rows. Entries
    below the diagonal outside the diagonal blocks are left as they were (mirror_upper reads none)."""
    b = -(-x.shape[1] // (bands or GRAM_BANDS))
    for i in range(0, x.shape[1], b):
        h[i:i + b, i:].addmm_(x[:, i:i + b].T, x[:, i:])
    return h


def mirror_upper(h: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is h's, in h's own memory."""
    lower = h.triu(1).T
    return h.triu_().add_(lower)


def chan_merge(n_a: int, mean_a: torch.Tensor, m2_a: torch.Tensor, n_b: int, mean_b: torch.Tensor,
               m2_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan et al.'s merge of two sets' means and sums of squared deviations (M2):
    mean = mean_a + d n_b / n,  M2 = M2_a + M2_b + d^2 n_a n_b / n,  d = mean_b - mean_a, n = n_a + n_b."""
    n = n_a + n_b
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


def running_hessian(h: torch.Tensor | None, n: int, x: torch.Tensor, nseq: int) -> torch.Tensor:
    """SparseGPT's H = (2/N_seq) sum x x^T as IST-DASLab/sparsegpt's `add_batch` builds it, operation
    for operation: H *= n / (n + b); x = sqrt(2 / (n + b)) * x; H += x^T x, with n sequences seen
    before this batch of b and x the batch's (tokens, columns) float32 inputs. One sequence per batch
    gives the reference's float32 result bit for bit (the rounding differs from 2/N_seq * sum x x^T)."""
    if h is None:
        h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    h *= n / (n + nseq)
    x = math.sqrt(2 / (n + nseq)) * x
    h += x.t().matmul(x)
    return h


@dataclass
class ChannelStats:
    columns: int
    nseq: int = 0                 # sequences seen (Wanda normalises by this)
    ntokens: int = 0              # tokens seen
    sum_sq: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None  # sum of squared deviations from the mean
    centred: bool = True            # False: sum of squares only (no mean/variance)
    gram: bool | str = False        # also keep xtx = sum over tokens of x x^T (columns x columns);
                                    # "running": xtx is SparseGPT's Hessian, the reference's running average
    xtx: torch.Tensor | None = None  # read it by gram_matrix(): on the CPU only its upper triangle is kept
    xtx_upper: bool = False          # xtx holds X^T X's upper triangle (TRIANGULAR_GRAM), not yet mirrored
    derived: dict = field(default_factory=dict)  # what a scorer computes once per input (SparseGPT's Hinv)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs x of shape (..., columns); the leading dims are (sequences, tokens) or tokens."""
        nseq = x.shape[0] if x.dim() == 3 else 1
        flat = x.reshape(-1, x.shape[-1])
        fused = flat.device.type in FUSED_REDUCTIONS
        low_gram = self.gram is True and low_precision_gram(flat)
        # the batch in float32, converted at most once (X^T X needs it; the CPU's reductions too)
        f32 = flat if flat.dtype == torch.float32 else flat.float() if self.gram and not low_gram else None
        if self.centred:
            self._merge_centred(flat, f32, fused)
        else:
            if fused:
                sq_b = torch.linalg.vector_norm(flat, dim=0, dtype=torch.float32).square_()
            elif f32 is None:
                sq_b = flat.float().square_().sum(dim=0)
            else:
                sq_b = f32.square().sum(dim=0)
            self.sum_sq = sq_b if self.sum_sq is None else self.sum_sq + sq_b
        if self.gram:  # float32 even inside a bf16 pass: autocast would lower this matmul
            with torch.autocast(flat.device.type, enabled=False):
                if low_gram:
                    xtx = exact_low_gram(flat)
                    self.xtx = xtx if self.xtx is None else self.xtx.add_(xtx)
                elif self.gram == "running":
                    self.xtx = running_hessian(self.xtx, self.nseq, f32, nseq)
                elif f32.device.type in TRIANGULAR_GRAM and (self.xtx is None or self.xtx_upper):
                    if self.xtx is None:
                        self.xtx = torch.zeros(f32.shape[1], f32.shape[1], dtype=torch.float32, device=f32.device)
                    self.xtx, self.xtx_upper = add_upper_gram(self.xtx, f32), True
                else:
                    self.xtx = f32.T @ f32 if self.xtx is None else self.xtx.addmm_(f32.T, f32)
        self.ntokens += flat.shape[0]
        self.nseq += nseq

    def _merge_centred(self, flat: torch.Tensor, f32: torch.Tensor | None, fused: bool) -> None:
        """Chan's merge of this batch's mean and M2 into the running ones (before ntokens grows)."""
        n_b = flat.shape[0]
        if fused:  # one read of the float32 batch (Welford within it)
            var_b, mean_b = torch.var_mean(flat.float() if f32 is None else f32, dim=0, correction=0)
            m2_b = var_b * n_b
        else:
            centred = flat.to(torch.float32, copy=True)  # our own buffer: edited in place
            mean_b = centred.mean(dim=0)
            m2_b = centred.sub_(mean_b).square_().sum(dim=0)  # two-pass within the batch, Chan's merge across
        sq_b = m2_b + n_b * mean_b * mean_b  # sum of x^2 without another pass (all terms >= 0)
        if self.mean is None:
            self.mean, self.m2, self.sum_sq = mean_b, m2_b, sq_b
        else:
            self.mean, self.m2 = chan_merge(self.ntokens, self.mean, self.m2, n_b, mean_b, m2_b)
            self.sum_sq = self.sum_sq + sq_b

    def gram_matrix(self) -> torch.Tensor | None:
        """X^T X, the whole symmetric matrix (mirrored once, in place, where only its upper triangle was
        accumulated)."""
        if self.xtx_upper:
            self.xtx, self.xtx_upper = mirror_upper(self.xtx), False
        return self.xtx

    @property
    def wanda_norm_sq(self) -> torch.Tensor:
        """s_j = (1/N_seq) * sum over all calibration tokens of x_j^2 (Wanda's scaler_row)."""
        return self.sum_sq / self.nseq

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased per-channel variance sigma_j^2 = M2_j / (n - 1)."""
        if not self.centred:
            raise ValueError("the variance needs ChannelStats(centred=True); these kept the sum of squares only")
        return self.m2 / max(self.ntokens - 1, 1)

    def nonfinite(self) -> torch.Tensor:
        """A device-side bool: whether any statistic holds NaN/inf (checked without a host sync;
        the engine reads it once per block)."""
        parts = [t for t in (self.sum_sq, self.mean) if t is not None]
        return torch.stack([~torch.isfinite(t).all() for t in parts]).any()
