"""GPTQ (Frantar et al. 2022): rounding that minimises a linear layer's output error on calibration inputs.

Round-to-nearest minimises each weight's own error ||W - Ŵ||. What a layer is judged by is its output on real
inputs, ||(W - Ŵ) X||^2 = tr(dW H dW^T) with H = X X^T = sum over tokens of x x^T (lutq/quantize/calibration.py
collects it). GPTQ quantizes W one input column k at a time and after each column moves that column's
rounding error onto the columns not yet quantized, in the direction the inputs' correlations (H^-1) say cancels it
best (the optimal brain surgeon update). Rows are independent given H, so all rows move together.

    U = upper Cholesky factor of (H + damp I)^-1          (H^-1 = U^T U; row k of U is the update for column k)
    for each column k in sweep order:   q_k = round(W[:, k]);   e = (W[:, k] - q_k) / U[k, k];
                                        W[:, later columns] -= e U[k, later columns]

Lazy blocks of BLOCK columns: the update of the columns right of the block is deferred and applied once per block as
one matrix product (same arithmetic, far fewer passes over W). Dampening by DAMP x mean(diag H) keeps H invertible
(an input dimension the calibration never excites has H[k, k] = 0) and the updates tame.

Groups: each format's own group parameters, and groups stay contiguous along K, so the stored layout and every
kernel are unchanged: the codes and parameters go through the format's own packer. Two sweeps (gptq_codes):
- act-order (ACT_ORDER, the default): columns in order of falling H[k, k], the inputs with the most energy first,
  while the most columns are left to absorb their errors. Groups are then static: every group's grid (scale and
  offset, or nf scale) is chosen first, by the format's own scale search on the original weights. On SmolLM2 int3k
  G = 32 it measured perplexity 57.45, nf3 G = 32 52.76 (models.md);
- left to right: each group's grid is chosen by the same search from its error-updated weights when the sweep
  reaches its first column (75.48 and 60.22).
Supported: the uniform formats and their k variants (the per-tensor scale step comes from the format's first pass on
the original weights) and the nf formats; any other format falls back to its plain quantize.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lutq.quantize import nf, uniform
from lutq.quantize.packed import PackedTensor, check_shape, to_f16

DAMP = 0.01  # of the mean diagonal of H
BLOCK = 128  # columns per lazy update; a multiple of every group size, so a group never straddles two blocks
ACT_ORDER = True  # sweep columns by falling H[k, k], groups fitted first (static): gptq_codes
REFIT_ROUNDS = 3  # rounds of refitting the grids to the codes for the least output error, then sweeping again
RIDGE = 1e-6  # refit's pull towards the sweep's grid, of the mean diagonal of each row's system (singular groups)


@dataclass
class Hessian:
    """A weight's input statistics as GPTQ uses them: H f64[K, K], the sweep order (None: left to right) and the
    factor u = inverse_hessian_factor of H in that order. Computed once per input: q, k and v share one."""

    h: np.ndarray
    order: np.ndarray | None
    u: np.ndarray

    @classmethod
    def of(cls, h: np.ndarray, act_order: bool | None = None) -> "Hessian":
        if act_order if act_order is not None else ACT_ORDER:
            order = np.argsort(-np.diag(h), kind="stable")
            return cls(h, order, inverse_hessian_factor(h[order][:, order], DAMP))
        return cls(h, None, inverse_hessian_factor(h, DAMP))


class UniformGrid:
    """int2/3/4/6 and their k variants: per group W = s q + b, q in [0, 2^B); for the k variants s and b come from
    8-bit codes on a per-tensor scale step, fixed before the sweep from the original weights."""

    def __init__(self, fmt: uniform.UniformFormat, w: np.ndarray, group_size: int, refine: bool):
        self.fmt, self.refine, self.bits = fmt, refine, fmt.bits
        self.nmax = (1 << fmt.bits) - 1
        m, ng = w.shape[0], w.shape[1] // group_size
        if fmt.quantized_params:
            self.step = fmt.scale_step(w, group_size, refine)
            self.params = {"scale_codes": np.zeros((m, ng), np.uint8), "zero_codes": np.zeros((m, ng), np.uint8),
                           "scale_step": np.array([self.step], np.float32)}
        else:
            self.params = {"scales": np.zeros((m, ng), np.float16), "biases": np.zeros((m, ng), np.float16)}
        self.s, self.b = np.zeros((m, ng)), np.zeros((m, ng))  # each group's grid, f64 (fp16 values)

    def fit(self, g: int, x: np.ndarray) -> None:
        """Choose group g's grid from its current weights x f64[M, G]."""
        d, b, _ = uniform.fit_groups(x, self.bits, self.refine)
        if self.fmt.quantized_params:
            d = uniform.scale_for_zero_point(d, b, self.bits)
            sq, zq, _ = uniform.fit_params_k(x, d, b, self.step, self.bits, self.refine)
            self.params["scale_codes"][:, g], self.params["zero_codes"][:, g] = sq, zq
            d, b = uniform.expand_params_f64(sq, zq, self.step, self.bits)
        else:
            self.params["scales"][:, g], self.params["biases"][:, g] = d, b
        self.s[:, g], self.b[:, g] = d, b

    def round(self, g: int, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest codes of one column f64[M] of group g on its grid, and their values."""
        s, b = self.s[:, g], self.b[:, g]
        q = uniform.assign(col[:, None], s, b, self.nmax)[:, 0]
        return q, s * q + b

    def values(self, q: np.ndarray, group_size: int) -> np.ndarray:
        return np.repeat(self.s, group_size, axis=1) * q + np.repeat(self.b, group_size, axis=1)

    def refit(self, q: np.ndarray, w: np.ndarray, h: np.ndarray, group_size: int) -> None:
        """Every row's (scale, offset) pairs re-solved by least squares of tr(dW H dW^T) for the codes q: two
        unknowns per group, coupled across groups by H. The k variants then round to their 8-bit codes (the offset
        re-solved for the rounded scales first). gptq_quantize keeps each row's best grid across rounds."""
        qf, ones = q.astype(np.float64), np.ones_like(w, np.float64)
        ng = w.shape[1] // group_size
        m = np.block([[block_gram(qf, qf, h, group_size), block_gram(qf, ones, h, group_size)],
                      [block_gram(ones, qf, h, group_size), block_gram(ones, ones, h, group_size)]])
        wh = w.astype(np.float64) @ h
        v = np.concatenate([block_rhs(qf, wh, group_size), block_rhs(ones, wh, group_size)], axis=1)
        theta = ridge_solve(m, v, np.concatenate([self.s, self.b], axis=1))
        s, b = theta[:, :ng], theta[:, ng:]
        if self.fmt.quantized_params:
            sq = np.clip(np.rint(s / self.step), 1, 255) if self.step > 0 else np.zeros_like(s)
            s16, _ = uniform.expand_params_f64(sq, np.zeros_like(sq), self.step, self.bits)
            b = ridge_solve(m[:, ng:, ng:], v[:, ng:] - np.einsum("rab,rb->ra", m[:, ng:, :ng], s16), self.b)
            zq = np.clip(np.rint(-b / np.where(s16 > 0, s16, 1.0) / uniform.zero_point_grid(self.bits)), 0, 255)
            new_s, new_b = uniform.expand_params_f64(sq, zq, self.step, self.bits)
            new = {"scale_codes": sq.astype(np.uint8), "zero_codes": zq.astype(np.uint8)}
        else:
            new_s, new_b = to_f16(s), to_f16(b)
            new = {"scales": new_s.astype(np.float16), "biases": new_b.astype(np.float16)}
        self.s, self.b = new_s, new_b
        self.params.update(new)

    def state(self) -> dict[str, np.ndarray]:
        """The per-row arrays of the grid ([M, K/G] each), for keeping each row's best."""
        return {"s": self.s, "b": self.b, **{n: a for n, a in self.params.items() if n != "scale_step"}}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.s, self.b = state["s"], state["b"]
        self.params.update({n: a for n, a in state.items() if n not in ("s", "b")})

    def pack(self, q: np.ndarray, group_size: int) -> PackedTensor:
        return self.fmt.pack(q, group_size, self.params)


class NormalFloatGrid:
    """nf2/3/4 and their k variants: per group W = s codebook[q]; for the k variants s comes from an 8-bit code on a
    per-tensor scale step, fixed before the sweep from the original weights."""

    def __init__(self, fmt: nf.NormalFloatFormat, w: np.ndarray, group_size: int, refine: bool):
        self.fmt, self.refine = fmt, refine
        self.cb = fmt.codebook.astype(np.float64)
        m, ng = w.shape[0], w.shape[1] // group_size
        if fmt.quantized_params:
            self.step = fmt.scale_step(w, group_size, refine)
            self.params = {"scale_codes": np.zeros((m, ng), np.int8), "scale_step": np.array([self.step], np.float32)}
        else:
            self.params = {"scales": np.zeros((m, ng), np.float16)}
        self.s = np.zeros((m, ng))  # each group's scale, f64 (fp16 values)

    def fit(self, g: int, x: np.ndarray) -> None:
        s, _ = nf.fit_groups(x, self.fmt.codebook, self.refine)
        if self.fmt.quantized_params:
            c, _ = nf.fit_scale_codes(x, s, self.step, self.fmt.codebook, self.refine)
            self.params["scale_codes"][:, g] = c
            s = nf.expand_scales(c, self.step)
        else:
            self.params["scales"][:, g] = s
        self.s[:, g] = s

    def round(self, g: int, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.s[:, g]
        q = nf.codes_for(col[:, None], s, self.cb)[:, 0]
        return q, s * self.cb[q]

    def values(self, q: np.ndarray, group_size: int) -> np.ndarray:
        return np.repeat(self.s, group_size, axis=1) * self.cb[q]

    def refit(self, q: np.ndarray, w: np.ndarray, h: np.ndarray, group_size: int) -> None:
        """Every row's scales re-solved by least squares of tr(dW H dW^T) for the codes q (one unknown per group,
        coupled across groups by H), rounded to fp16 or to the nearest 8-bit code (gptq_quantize keeps each row's
        best across rounds)."""
        c = self.cb[q]
        s = ridge_solve(block_gram(c, c, h, group_size), block_rhs(c, w.astype(np.float64) @ h, group_size), self.s)
        if self.fmt.quantized_params:
            codes = nf.scale_codes_near(s, self.step)
            self.s = nf.expand_scales(codes, self.step).astype(np.float64)
            self.params["scale_codes"] = codes.astype(np.int8)
        else:
            self.s = to_f16(s)
            self.params["scales"] = self.s.astype(np.float16)

    def state(self) -> dict[str, np.ndarray]:
        """The per-row arrays of the grid ([M, K/G] each), for keeping each row's best."""
        return {"s": self.s, **{n: a for n, a in self.params.items() if n != "scale_step"}}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.s = state["s"]
        self.params.update({n: a for n, a in state.items() if n != "s"})

    def pack(self, q: np.ndarray, group_size: int) -> PackedTensor:
        return self.fmt.pack(q, group_size, self.params)


def grid_for(fmt, w: np.ndarray, group_size: int, refine: bool):
    """The format's grid for GPTQ, or None when GPTQ does not cover the format."""
    if isinstance(fmt, uniform.UniformFormat):
        return UniformGrid(fmt, w, group_size, refine)
    if isinstance(fmt, nf.NormalFloatFormat):
        return NormalFloatGrid(fmt, w, group_size, refine)
    return None


def block_gram(f: np.ndarray, g: np.ndarray, h: np.ndarray, group_size: int) -> np.ndarray:
    """M f64[R, n, n] with M[r, a, b] = sum over k in group a, l in group b of f[r, k] H[k, l] g[r, l], for features
    f, g f64[R, K] (n = K / G groups): the normal matrix of a least-squares fit whose unknowns are per group."""
    r, k = f.shape
    n = k // group_size
    out = np.empty((r, n, n))
    chunk = max(1, (1 << 23) // (k * n))  # rows per pass: the work array y is chunk x K x n
    for r0 in range(0, r, chunk):
        fr, gr = f[r0 : r0 + chunk], g[r0 : r0 + chunk]
        y = np.empty((len(fr), k, n))  # y[r, k, b] = sum over l in group b of H[k, l] g[r, l]
        for b in range(n):
            sl = slice(b * group_size, (b + 1) * group_size)
            y[:, :, b] = gr[:, sl] @ h[:, sl].T
        out[r0 : r0 + chunk] = np.einsum("rag,ragb->rab", fr.reshape(len(fr), n, group_size),
                                         y.reshape(len(fr), n, group_size, n))
    return out


def block_rhs(f: np.ndarray, wh: np.ndarray, group_size: int) -> np.ndarray:
    """v f64[R, n]: v[r, a] = sum over k in group a of f[r, k] (W H)[r, k], the right-hand side beside block_gram."""
    r, k = f.shape
    return (f * wh).reshape(r, k // group_size, group_size).sum(axis=2)


def ridge_solve(m: np.ndarray, v: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Per row, argmin of x^T M x - 2 v^T x + lam ||x - prior||^2, lam = RIDGE x mean(diag M): a group whose codes
    are all equal (its scale and offset then act alike) stays near its prior instead of going singular."""
    n = m.shape[1]
    lam = RIDGE * np.maximum(np.einsum("rii->r", m) / n, 1e-30)
    a = m + lam[:, None, None] * np.eye(n)
    return np.linalg.solve(a, (v + lam[:, None] * prior)[:, :, None])[:, :, 0]


def row_errors(w: np.ndarray, values: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Each row's output error d H d^T, d = w - values: f64[M]."""
    d = w.astype(np.float64) - values
    return np.einsum("ij,ij->i", d @ h, d)


def supports(fmt) -> bool:
    return isinstance(fmt, (uniform.UniformFormat, nf.NormalFloatFormat))


def inverse_hessian_factor(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """U, upper triangular with U^T U = (H + damp mean(diag H) I)^-1: f64[K, K].

    An input never active in the calibration (H[k, k] = 0) gets H[k, k] = 1: its row and column of H are zero, so its
    rounding error moves nothing, and the weight is simply rounded to nearest.
    """
    h = np.array(h, np.float64)  # a copy: the caller's H is reused for the next tensor reading the same input
    idx = np.arange(len(h))
    diag = h[idx, idx]
    diag[diag <= 0] = 1.0
    while True:
        h[idx, idx] = diag + damp * float(diag.mean())
        try:
            return np.linalg.cholesky(np.linalg.inv(h)).T
        except np.linalg.LinAlgError:  # numerically not positive definite: dampen harder
            damp = max(10 * damp, 0.01)


def gptq_codes(w: np.ndarray, u: np.ndarray, grid, group_size: int, block: int = BLOCK,
               order: np.ndarray | None = None, fitted: bool = False):
    """GPTQ of w f32[M, K] on `grid`: (codes u8[M, K], values f64[M, K]), in W's column order.

    u = inverse_hessian_factor(H) with H's rows and columns in the sweep's order. order=None sweeps columns left to
    right and fits each group's grid when the sweep reaches it, from its error-updated weights. Given a permutation
    (act-order: the columns with the largest H[k, k] first, while the most freedom is left to absorb their errors),
    every group's grid is fitted first from the original weights (static groups: a group's columns are no longer
    swept together) and the columns are rounded in that order; u must then be the factor of H[order][:, order].
    fitted=True keeps the grid as it is (no group is fitted): the sweeps after a refit.
    """
    m, k = w.shape
    block = max(block, group_size)
    if block % group_size:
        raise ValueError(f"block {block} is not a multiple of the group size {group_size}")
    if order is not None and not fitted:
        x = w.astype(np.float64)
        for g in range(k // group_size):
            grid.fit(g, x[:, g * group_size : (g + 1) * group_size])
    perm = order if order is not None else np.arange(k)
    work = w[:, perm].astype(np.float64)  # the error-updated weights, in sweep order
    codes = np.empty((m, k), np.uint8)
    values = np.empty((m, k), np.float64)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = work[:, b0:b1].copy()  # f64[M, B], updated column by column
        errs = np.empty_like(wb)  # the scaled errors e of the block's columns, for the deferred update
        ub = u[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = perm[b0 + j]
            if order is None and not fitted and col % group_size == 0:  # a group's first column: fit it now
                grid.fit(col // group_size, wb[:, j : j + group_size])
            q, v = grid.round(col // group_size, wb[:, j])
            codes[:, col], values[:, col] = q, v
            e = (wb[:, j] - v) / ub[j, j]
            wb[:, j + 1 :] -= np.outer(e, ub[j, j + 1 :])
            errs[:, j] = e
        work[:, b1:] -= errs @ u[b0:b1, b1:]
    return codes, values


def gptq_quantize(fmt, w: np.ndarray, hessian: Hessian, group_size: int = 64, refine: bool = True,
                  refit_rounds: int | None = None) -> PackedTensor:
    """w f32[M, K] quantized by GPTQ for its inputs' Hessian, stored exactly as fmt.quantize stores it; formats GPTQ
    does not cover get fmt.quantize.

    Then refit_rounds (default REFIT_ROUNDS) rounds of: every group's grid refitted to the codes by least squares of
    the output error (grid.refit), and the columns swept again on the refitted grids. GPTQ's grids come from the
    weights alone (the format's scale search, weight error); for the codes it chose, the grid of least output error
    is another, and on that grid other codes are better. Rows are independent (H is shared, the grids are per row),
    so each row keeps its best pass: the output error never rises."""
    check_shape(w, group_size)
    if hessian.h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"Hessian of shape {hessian.h.shape} for a weight of shape {w.shape}")
    grid = grid_for(fmt, w, group_size, refine)
    if grid is None:
        return fmt.quantize(w, group_size, refine)
    codes, values = gptq_codes(w, hessian.u, grid, group_size, order=hessian.order)
    best_codes, best_state, best_err = codes, grid.state(), row_errors(w, values, hessian.h)
    for _ in range(REFIT_ROUNDS if refit_rounds is None else refit_rounds):
        grid.refit(codes, w, hessian.h, group_size)
        for sweep in (False, True):
            if sweep:
                codes, values = gptq_codes(w, hessian.u, grid, group_size, order=hessian.order, fitted=True)
            else:
                values = grid.values(codes, group_size)
            err = row_errors(w, values, hessian.h)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_codes = np.where(better[:, None], codes, best_codes)
            best_state = {n: np.where(better[:, None], a, best_state[n]) for n, a in grid.state().items()}
    grid.set_state(best_state)
    return grid.pack(best_codes, group_size)


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """tr(dW H dW^T) = sum over calibration tokens of ||(W - Ŵ) x||^2, dW = W - Ŵ (float64)."""
    return float(row_errors(w, w_hat, h).sum())
