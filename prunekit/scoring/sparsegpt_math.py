"""SparseGPT (Frantar & Alistarh 2023) as pure tensor functions: the OBS-style prune-and-update of one
linear layer's weight, given the Hessian of its layer-wise reconstruction loss.

Faithful to the reference (IST-DASLab/sparsegpt `fasterprune`, as locuslab/wanda runs it) except:
  * Unstructured masks prune exactly k = int(numel * sparsity) weights per block of columns, ties in
    stable (row-major) order, as prunekit's magnitude does. The reference takes
    `tmp <= sort(tmp.flatten())[k]`, which prunes the k-th weight too (k + 1) and every tie with it.
  * The column loop runs in sub-blocks of at most `_STEP` columns, each followed by one matmul update of
    every later column. The update each column receives is the same sum, err_i * Hinv[i, k] over i < k,
    only grouped differently. The reference's per-block rank-1 updates do rows x blocksize^2 / 2 work
    per block; the sub-blocks do most of it as one matmul. `blocksize` still sets the granularity of the
    unstructured mask, as in the reference.
  * The weight is worked on transposed (in x out), so a column of W is a contiguous row.
  * Hinv, the upper Cholesky factor of H^-1, comes from one Cholesky factorisation of H with rows and
    columns reversed and one triangular inverse (see _upper_chol_of_inverse), not from three steps.
  * A failed Cholesky factorisation (not positive definite) retries with 10x the damping, recorded
    in the result. It never falls back silently, and it raises PrunekitError once the tries run out;
    a Hessian with NaN/inf raises PrunekitError at once (no damping fixes it).
The N:M mask of each group of M columns is chosen when the loop reaches the group's first column,
on the weights as updated so far, as the reference does.

`reference_inverse_factor` and `sparsegpt_prune_reference` are the other arithmetic
(`--sparsegpt-arithmetic reference`): the reference's float32 operations in the reference's order
(three-step Hinv, per-column rank-1 updates, `tmp <= sorted[k]`), which with the running-average
Hessian (stats.running_hessian) and one sequence per pass reproduce the reference's masks and
weights bit for bit, at the reference's speed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PrunekitError
from ..masks import matrix_lowest_mask

# Columns per sub-block of the column loop (rounded down to a multiple of M for N:M). Measured on
# CPU over SmolLM2-135M's shapes: 16 is fastest; 8 slows the matmul, 64 the per-column updates.
_STEP = 16


@dataclass
class InverseFactor:
    """Upper Cholesky factor U of the damped H^-1 (H^-1 = U^T U), computed once per Hessian. Linears that
    share an input (q/k/v, gate/up) share H, so they can share this."""
    hinv: torch.Tensor     # (in, in) float32, upper triangular
    dead: torch.Tensor     # (in,) bool: inputs that were always 0 (diag H == 0)
    damp: float            # lambda added to the diagonal: percdamp * mean(diag H) * 10^retries
    retries: int           # how many times the damping had to be raised 10x


@dataclass
class SparseGPTResult:
    weight: torch.Tensor   # (out, in) float32, pruned entries exactly 0, kept entries updated
    mask: torch.Tensor     # (out, in) bool, True = pruned
    loss: torch.Tensor     # (out,) float32: sum over pruned (w - q)^2 / Hinv_jj^2 / 2, the reference's Losses
    damp: float
    retries: int


def sparsegpt_hessian(gram: torch.Tensor, nseq: int) -> torch.Tensor:
    """H = (2 / N_seq) * sum over calibration tokens of x x^T, float32, from gram = sum x x^T.
    (Wanda's statistic s_j = diag(gram) / N_seq = diag(H) / 2.)"""
    if nseq <= 0:
        raise ValueError(f"the SparseGPT Hessian needs at least one calibration sequence, got nseq={nseq}")
    return gram.to(torch.float32) * (2.0 / nseq)


def _upper_triangular_inverse(r: torch.Tensor) -> torch.Tensor:
    """R^-1 for upper-triangular R, by halves: [[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]].
    n^3/3 multiply-adds, nearly all in two matmuls per level (a triangular solve against the
    identity would do n^3)."""
    n = r.shape[0]
    if n <= 128:
        # triu_: exact zeros below the diagonal, which the column loop relies on.
        return torch.linalg.solve_triangular(r, torch.eye(n, dtype=r.dtype, device=r.device), upper=True).triu_()
    h = n // 2
    a_inv = _upper_triangular_inverse(r[:h, :h])
    c_inv = _upper_triangular_inverse(r[h:, h:])
    out = torch.zeros_like(r)
    out[:h, :h] = a_inv
    out[h:, h:] = c_inv
    torch.mm(a_inv @ r[:h, h:], c_inv, out=out[:h, h:])
    out[:h, h:].neg_()
    return out


def _upper_chol_of_inverse(h_rev: torch.Tensor) -> torch.Tensor | None:
    """U upper triangular with U^T U = h^-1, or None when h is not numerically positive definite;
    h_rev = J h J, h with its rows and columns reversed.

    The reference computes chol_upper(cholesky_inverse(chol(h))). The same U, by uniqueness of the
    Cholesky factor, with one factorisation and no explicit inverse: with J the reversal permutation,
    chol(J h J) = L gives h = R R^T for the upper R = J L J, so h^-1 = R^-T R^-1 and U = R^-1.
    2/3 n^3 multiply-adds instead of 4/3 n^3: 1.5x faster on CPU at in = 1536 (about equal at 576), as
    accurate (relative error vs float64 within 1.5x of the recipe's), and no second factorisation of
    a float32 H^-1 that can fail on its own.
    """
    lower, info = torch.linalg.cholesky_ex(h_rev)
    if info.item() != 0:
        return None
    upper = _upper_triangular_inverse(lower.flip(0, 1))
    if not torch.isfinite(upper.sum()):
        return None
    return upper


def _check_finite(hessian: torch.Tensor) -> None:
    if not torch.isfinite(hessian.sum()):  # one reduction; NaN and inf propagate into the sum
        raise PrunekitError("NaN/inf in the SparseGPT Hessian (calibration activations overflowed): "
                            "try --dtype float32 or check the model weights")


def _not_positive_definite(max_damp_tries: int, damp: float, percdamp: float) -> PrunekitError:
    return PrunekitError(
        f"SparseGPT Hessian is not positive definite even with its damping raised 10x "
        f"{max_damp_tries} times (to {damp:.3g}, from percdamp {percdamp}): use more calibration "
        f"samples or a larger percdamp")


def _check_pattern(cols: int, sparsity: float, nm: tuple[int, int] | None, blocksize: int) -> None:
    if nm is not None:
        n, m = nm
        if cols % m or blocksize % m or not 0 <= n <= m:
            raise ValueError(f"SparseGPT {n}:{m} needs in_features ({cols}) and blocksize ({blocksize}) "
                             f"divisible by {m}, and 0 <= N <= M")
    elif not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")


def sparsegpt_inverse_factor(hessian: torch.Tensor, percdamp: float = 0.01,
                             max_damp_tries: int = 4) -> InverseFactor:
    """Hinv = chol_upper((H + lambda I)^-1), lambda = percdamp * mean(diag H), after setting H_dd = 1 for
    every dead input d (diag H == 0). On failure lambda grows 10x, up to max_damp_tries times."""
    _check_finite(hessian)
    # Our own copy, reversed for _upper_chol_of_inverse; its diagonal is diag(H) reversed.
    h_rev = hessian.detach().to(torch.float32).flip(0, 1)
    diag = h_rev.diagonal()
    dead_rev = diag == 0
    diag.masked_fill_(dead_rev, 1.0)
    undamped = diag.clone()
    base = percdamp * float(undamped.mean())
    for retries in range(max(max_damp_tries, 0) + 1):
        damp = base * 10.0 ** retries
        torch.add(undamped, damp, out=diag)
        hinv = _upper_chol_of_inverse(h_rev)
        if hinv is not None:
            return InverseFactor(hinv, dead_rev.flip(0), damp, retries)
    raise _not_positive_definite(max_damp_tries, damp, percdamp)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor | None, sparsity: float,
                    nm: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01,
                    max_damp_tries: int = 4, factor: InverseFactor | None = None) -> SparseGPTResult:
    """Prune W (out x in) column by column, each time spreading the pruned weights' error over the
    columns not yet visited:  err = (w - q) / Hinv_jj,  W[:, k] -= err * Hinv_jk for k > j.

    Unstructured: per block of `blocksize` columns, prune the int(numel * sparsity) lowest
    W^2 / diag(Hinv)^2 of the block (rows x block, one threshold). N:M: at every M-th column of a
    block, prune the n lowest of W[:, i:i+M]^2 / diag(Hinv)[i:i+M]^2 of each row (`sparsity` unused).
    Pass `factor` (from sparsegpt_inverse_factor) to reuse one Hinv for linears fed the same input;
    `hessian`, `percdamp` and `max_damp_tries` are then unused. The inputs are not modified.
    """
    rows, cols = weight.shape
    step = _STEP
    _check_pattern(cols, sparsity, nm, blocksize)
    if nm is not None:
        n, m = nm
        step = max(m, step - step % m)  # a group's columns all in one sub-block, all updated when masked
    if factor is None:
        if hessian is None:
            raise ValueError("sparsegpt_prune needs the Hessian or a precomputed factor")
        factor = sparsegpt_inverse_factor(hessian.to(weight.device), percdamp, max_damp_tries)
    hinv = factor.hinv
    d = hinv.diagonal()
    inv_d = d.reciprocal().unsqueeze(1)
    d_sq = d.square().unsqueeze(1)
    # Transposed: column j of W is row j of w_t, contiguous for the per-column ops. Always a copy
    # (.t().contiguous() would alias a 1 x in weight).
    w_t = torch.empty((cols, rows), dtype=torch.float32, device=weight.device).copy_(weight.detach().t())
    w_t.masked_fill_(factor.dead.unsqueeze(1), 0.0)
    mask_t = torch.zeros((cols, rows), dtype=torch.bool, device=w_t.device)
    # scale_t[j] = mask[:, j] / Hinv_jj, so err = w * scale_t[j] in one op (0 where kept).
    scale_t = torch.zeros((cols, rows), dtype=torch.float32, device=w_t.device)
    err_t = torch.empty((step, rows), dtype=torch.float32, device=w_t.device)
    err_rows = err_t.unbind(0)
    loss = torch.zeros(rows, dtype=torch.float32, device=w_t.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if nm is None:
            # The block's columns have every update from columns < i1 already: choose the mask now.
            score = w_t[i1:i2].square().div_(d_sq[i1:i2])
            block_mask = matrix_lowest_mask(score.t(), sparsity).t()  # row-major order, as the reference
            mask_t[i1:i2] = block_mask
            torch.mul(block_mask, inv_d[i1:i2], out=scale_t[i1:i2])
        for s1 in range(i1, i2, step):
            s2 = min(s1 + step, i2)
            w_sub = w_t[s1:s2]
            w_rows, scale_rows = w_sub.unbind(0), scale_t[s1:s2].unbind(0)
            hinv_rows = hinv[s1:s2, s1:s2].unbind(0)
            for c in range(s2 - s1):
                if nm is not None and (s1 + c - i1) % m == 0:
                    _nm_group(w_t, d_sq, inv_d, mask_t, scale_t, s1 + c, n, m)
                e = torch.mul(w_rows[c], scale_rows[c], out=err_rows[c])
                # Whole sub-block, not just the columns after c: Hinv is upper triangular, so earlier
                # columns get 0, and column c becomes w - err * Hinv_cc (0 if pruned, zeroed exactly
                # below; unchanged if kept). No slicing per column: 1.3x faster than
                # updating only the columns after c.
                w_sub.addr_(hinv_rows[c], e, alpha=-1.0)
            errs = err_t[:s2 - s1]
            if s2 < cols:
                # Lazy update of every later column with this sub-block's errors, one matmul.
                w_t[s2:].addmm_(hinv[s1:s2, s2:].t(), errs, alpha=-1.0)
            loss.add_(errs.square().sum(0), alpha=0.5)

    # Pruned entries exactly +0 (mul by the float keep mask, then + 0.0 turns -0.0 into +0.0): about
    # 7x faster than masked_fill with a random mask on CPU.
    w_t.mul_(mask_t.logical_not().to(torch.float32)).add_(0.0)
    return SparseGPTResult(w_t.t().contiguous(), mask_t.t().contiguous(), loss, factor.damp, factor.retries)


def _nm_group(w_t, d_sq, inv_d, mask_t, scale_t, j, n, m):
    """Mask the n lowest W^2 / Hinv_jj^2 of each row within columns j..j+m, on the weights as updated now."""
    if n == 0:
        return
    score = w_t[j:j + m].square().div_(d_sq[j:j + m])
    mask_t[j:j + m].scatter_(0, torch.topk(score, n, dim=0, largest=False).indices, True)
    torch.mul(mask_t[j:j + m], inv_d[j:j + m], out=scale_t[j:j + m])


def reference_inverse_factor(hessian: torch.Tensor, percdamp: float = 0.01, max_damp_tries: int = 4) -> InverseFactor:
    """Hinv as the reference computes it: H_dd = 1 for dead inputs, H += percdamp * mean(diag H) * I,
    then chol_upper(cholesky_inverse(chol(H))), each step the reference's float32 operation. A failed
    factorisation retries with 10x the damping, as sparsegpt_inverse_factor does."""
    _check_finite(hessian)
    h = hessian.detach().to(torch.float32, copy=True)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    idx = torch.arange(h.shape[0], device=h.device)
    base = percdamp * torch.mean(torch.diag(h))
    undamped = h[idx, idx].clone()
    for retries in range(max(max_damp_tries, 0) + 1):
        damp = base if retries == 0 else base * 10.0 ** retries
        h[idx, idx] = undamped
        h[idx, idx] += damp
        lower, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0:
                return InverseFactor(hinv, dead, float(damp), retries)
    raise _not_positive_definite(max_damp_tries, float(damp), percdamp)


def sparsegpt_prune_reference(weight: torch.Tensor, factor: InverseFactor, sparsity: float,
                              nm: tuple[int, int] | None = None, blocksize: int = 128) -> SparseGPTResult:
    """The reference's column loop (IST-DASLab/sparsegpt `fasterprune`, as locuslab/wanda runs it), its
    float32 operations in its order. Unstructured: per block, prune every W^2 / diag(Hinv)^2 <= the
    k-th smallest (k + 1 weights and ties, k = int(numel * sparsity)); N:M as sparsegpt_prune."""
    w = weight.detach().to(torch.float32, copy=True)
    rows, cols = w.shape
    _check_pattern(cols, sparsity, nm, blocksize)
    hinv = factor.hinv
    w[:, factor.dead] = 0
    mask = torch.zeros_like(w, dtype=torch.bool)
    losses = torch.zeros(rows, dtype=torch.float32, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1, losses1 = torch.zeros_like(w1), torch.zeros_like(w1), torch.zeros_like(w1)
        if nm is None:
            tmp = w1 ** 2 / (torch.diag(hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(w1) == 1
        for i in range(i2 - i1):
            col, d = w1[:, i], hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                tmp = w1[:, i:i + nm[1]] ** 2 / (torch.diag(hinv1)[i:i + nm[1]].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, nm[0], dim=1, largest=False)[1], True)
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            losses1[:, i] = (col - q) ** 2 / d ** 2
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = e
        w[:, i1:i2] = q1
        mask[:, i1:i2] = mask1
        losses += torch.sum(losses1, 1) / 2
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return SparseGPTResult(w, mask, losses, factor.damp, factor.retries)
