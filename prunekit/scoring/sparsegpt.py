"""SparseGPT (Frantar & Alistarh 2023): prune column by column and update the kept weights to
compensate, using the Hessian H = (2/N_seq) sum x x^T of the layer's input. The math is in
sparsegpt_math.py; this is the scorer that the execution stage calls.

Its statistic shares the hook with Wanda's: the same accumulator keeps X^T X (float32) and the sum of
squares (Wanda's s_j = diag(X^T X) / N_seq). Linears fed one input (q/k/v, gate/up) share one
accumulator, hence one Hessian and one inverse factor.

`--sparsegpt-arithmetic reference` runs the reference's float32 operations in its order instead
(running-average Hessian, one sequence per pass, three-step Hinv, per-column updates, `<=`
threshold): the reference's masks and weights bit for bit, to reproduce its published figures.
"""
from __future__ import annotations

from . import LinearPrune, Scorer, register_scorer
from .sparsegpt_math import (reference_inverse_factor, sparsegpt_hessian, sparsegpt_inverse_factor,
                             sparsegpt_prune, sparsegpt_prune_reference)


@register_scorer("sparsegpt")
class SparseGPT(Scorer):
    blocksize = 128
    percdamp = 0.01

    def gram(self, norm_fed: bool) -> bool | str:
        return "running" if self.config.sparsegpt_reference else True

    def scores(self, weight, stats, norm_fed):  # what the unstructured mask of a block ranks
        raise NotImplementedError("SparseGPT chooses its mask inside the column loop: use prune()")

    def prune(self, weight, stats, sparsity, nm, norm_fed) -> LinearPrune:
        factor = stats.derived.get("sparsegpt")
        if factor is None:  # once per distinct input: q/k/v and gate/up share it
            factor = reference_inverse_factor(stats.gram_matrix(), self.percdamp) if self.config.sparsegpt_reference \
                else sparsegpt_inverse_factor(sparsegpt_hessian(stats.gram_matrix(), stats.nseq), self.percdamp)
            stats.derived["sparsegpt"] = factor
            stats.xtx = None  # the Hessian is consumed; free its memory
        if self.config.sparsegpt_reference:
            result = sparsegpt_prune_reference(weight, factor, sparsity, nm, self.blocksize)
        else:
            result = sparsegpt_prune(weight, None, sparsity, nm, self.blocksize, self.percdamp, factor=factor)
        info = {"damp_retries": factor.retries, "damp": factor.damp} if factor.retries else None
        return LinearPrune(result.mask, result.weight, None, None, info)
