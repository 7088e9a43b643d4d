"""Bayes-error estimate by local posterior averaging (Algorithm 1, Eq. (6)-(7) of
"Towards Provably Unlearnable Examples via Bayes Error Optimisation"), blocked and differentiable.

For query points ``q_i`` and key points ``k_j`` with labels ``y_j`` (queries usually are keys
themselves, self-pairs excluded by index), the leave-one-out kernel posterior is

    p(c | q_i) = sum_j [y_j = c] s(k_j, q_i) / sum_j s(k_j, q_i),   s = exp(-|q - k|^2 / 2 sigma^2)

computed as a softmax over the logits ``(2 q.k - |k|^2) / 2 sigma^2`` (the ``|q|^2`` term is
constant along a row, so it drops out of the softmax exactly). A softmax never divides 0 by 0,
whatever the dimension or the bandwidth. The estimate is ``beta = 1 - mean_i max_c p(c|q_i)``.

Memory is O(block x n_keys): query rows are processed in blocks, and the gradient of a block
(w.r.t. queries and keys) is accumulated while the block is in memory, so nothing of size
n_queries x n_keys is ever kept. The gradient is exact (first order) and analytic:
with ``W`` the softmax weights, ``c*`` the arg-max class and ``m`` the max posterior of a row,
``d m_i / d logit_ij = W_ij ([y_j = c*_i] - m_i)``.
"""
from __future__ import annotations

import math
from typing import Any

import torch

#: Elements of one block's ``rows x keys`` matrices (4 such live at once, fp32: 4 x 64 MiB).
BLOCK_ELEMENTS = 1 << 24


# validation ----------------------------------------------------------------------------------
def check_embeddings(e: torch.Tensor, name: str = "embeddings") -> None:
    if not isinstance(e, torch.Tensor) or e.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor (n x d), got "
                         f"{tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__}")
    if e.shape[0] == 0 or e.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(e.shape)})")
    if not e.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {e.dtype}")
    if not bool(torch.isfinite(e.detach()).all()):
        bad = int((~torch.isfinite(e.detach())).any(dim=1).sum())
        raise ValueError(f"{name} contain NaN or infinite values ({bad} of {e.shape[0]} rows)")


def check_labels(y: torch.Tensor, n: int, name: str = "labels") -> None:
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D tensor with {n} entries, got shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class indices, got {y.dtype}")
    if n and int(y.min()) < 0:
        raise ValueError(f"{name} must be non-negative class indices, got {int(y.min())}")


def check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma (kernel bandwidth) must be a finite number > 0, got {sigma}")
    return sigma


# bandwidth -----------------------------------------------------------------------------------
@torch.no_grad()
def median_sigma(embeddings: torch.Tensor, max_points: int = 2000, scale: float = 1.0,
                 nearest: int | None = None) -> float:
    """Median-distance bandwidth heuristic, computed on at most ``max_points`` evenly strided rows.

    ``nearest=None``: ``scale x`` the median pairwise distance (the classic heuristic).
    ``nearest=k``: ``scale x`` the median over points of the distance to their k-th nearest
    neighbour, a local scale that stays meaningful in high dimension, where all pairwise
    distances concentrate around their median and the classic kernel becomes nearly flat.
    """
    check_embeddings(embeddings)
    e = embeddings.detach()
    n = e.shape[0]
    if n < 2:
        raise ValueError(f"the bandwidth heuristic needs at least 2 points, got {n}")
    if n > max_points:
        e = e[torch.linspace(0, n - 1, max_points, device=e.device).round().long()]
    e = (e - e.mean(0)).double()
    sq = (e * e).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp_min_(0)
    m = e.shape[0]
    off = ~torch.eye(m, dtype=torch.bool, device=e.device)
    if nearest is None:
        value = d2[off].sqrt().median()
    else:
        # on a subsample of m of the n points, the k-th neighbour of the full set is about
        # the (k m / n)-th one
        k = max(1, min(round(int(nearest) * m / n), m - 1))
        d2.fill_diagonal_(float("inf"))
        value = d2.kthvalue(k, dim=1).values.sqrt().median()
    sigma = float(value) * float(scale)
    if not sigma > 0:
        # duplicated points: fall back to the mean pairwise distance, then to 1
        mean = float(d2[off & torch.isfinite(d2)].sqrt().mean()) * float(scale)
        sigma = mean if mean > 0 else 1.0
    return sigma


def resolve_sigma(sigma: float | str | None, embeddings: torch.Tensor,
                  nearest: int | None = 0, scale: float = 1.0) -> float:
    """``sigma`` as given (checked > 0), or the heuristic when None / ``"auto"``: the median
    distance to the k-th nearest neighbour with ``k = nearest``, ``ceil(sqrt(n))`` when 0 (the
    default: a bandwidth that averages over about sqrt(n) neighbours, as a consistent kernel
    estimate needs), or the classic median pairwise distance when None."""
    if sigma is None or (isinstance(sigma, str) and sigma.strip().lower() in ("auto", "median", "")):
        if nearest == 0:
            nearest = max(1, math.ceil(math.sqrt(embeddings.shape[0])))
        return median_sigma(embeddings, nearest=nearest, scale=scale)
    return check_sigma(float(sigma))


# the blocked, differentiable kernel --------------------------------------------------------
def default_block(n_keys: int, n_queries: int) -> int:
    return max(1, min(n_queries, BLOCK_ELEMENTS // max(1, n_keys)))


def _block_logits(q: torch.Tensor, keys: torch.Tensor, half_key_sq: torch.Tensor, inv_s2: float,
                  self_idx: torch.Tensor | None) -> torch.Tensor:
    # (2 q.k - |k|^2) / (2 sigma^2): the matmul form, never a B x n x d difference tensor
    logits = torch.addmm(half_key_sq.unsqueeze(0), q, keys.T, beta=-inv_s2, alpha=inv_s2)
    if self_idx is not None:
        rows = torch.nonzero(self_idx >= 0).squeeze(1)
        if rows.numel():
            logits[rows, self_idx[rows]] = float("-inf")
    return logits


def _max_posterior_blocks(queries: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
                          num_classes: int, sigma: float, self_index: torch.Tensor | None,
                          weights: torch.Tensor | None, block_size: int | None, want_grad: bool,
                          want_posterior: bool = False) -> dict[str, Any]:
    nq, nk = queries.shape[0], keys.shape[0]
    inv_s2 = 1.0 / (sigma * sigma)
    dtype = queries.dtype
    half_key_sq = 0.5 * (keys * keys).sum(1)
    onehot = torch.nn.functional.one_hot(key_labels, num_classes).to(dtype)
    onehot_t = onehot.T.contiguous() if want_grad else None
    block = int(block_size) if block_size else default_block(nk, nq)
    max_post = torch.empty(nq, dtype=dtype, device=queries.device)
    arg = torch.empty(nq, dtype=torch.long, device=queries.device)
    posterior = torch.empty(nq, num_classes, dtype=dtype, device=queries.device) if want_posterior else None
    gq = torch.zeros_like(queries) if want_grad else None
    gk = torch.zeros_like(keys) if want_grad else None
    colsum = torch.zeros(nk, dtype=dtype, device=keys.device) if want_grad else None
    for r0 in range(0, nq, block):
        r1 = min(nq, r0 + block)
        q = queries[r0:r1]
        logits = _block_logits(q, keys, half_key_sq, inv_s2,
                               self_index[r0:r1] if self_index is not None else None)
        # softmax in place with one exp: the row max is finite (every row keeps >= 1 key)
        w = logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
        w.div_(w.sum(dim=1, keepdim=True))               # softmax weights: b x nk
        p = w @ onehot                                   # b x C posterior
        m, c = p.max(dim=1)
        max_post[r0:r1] = m
        arg[r0:r1] = c
        if posterior is not None:
            posterior[r0:r1] = p
        if want_grad:
            coef = onehot_t.index_select(0, c)           # [y_j = c*_i], b x nk
            coef.sub_(m.unsqueeze(1))
            if weights is not None:
                coef.mul_(weights[r0:r1].unsqueeze(1))
            g = w.mul_(coef)                             # d(sum w_i m_i)/d logits, b x nk
            del coef
            gq[r0:r1] = (g @ keys).mul_(inv_s2)
            gk.addmm_(g.T, q, alpha=inv_s2)
            colsum += g.sum(0)
    if want_grad:  # the -k_j / sigma^2 part of d logit_ij / d k_j, once for all blocks
        gk.sub_(keys * (colsum * inv_s2).unsqueeze(1))
    return {"max": max_post, "argmax": arg, "posterior": posterior, "grad_q": gq, "grad_k": gk}


class _WeightedMaxPosterior(torch.autograd.Function):
    """``sum_i w_i max_c p(c | q_i)`` with its gradient accumulated block by block in forward."""

    @staticmethod
    def forward(ctx, queries, keys, key_labels, num_classes, sigma, self_index, weights, block_size):
        want = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        out = _max_posterior_blocks(queries.detach(), keys.detach(), key_labels, num_classes, sigma,
                                    self_index, weights, block_size, want_grad=want)
        m = out["max"]
        total = (m * weights).sum() if weights is not None else m.sum()
        if want:
            ctx.save_for_backward(out["grad_q"], out["grad_k"])
        ctx.want = want
        ctx.mark_non_differentiable(m)
        return total, m

    @staticmethod
    def backward(ctx, grad_total, _grad_m):
        if not ctx.want:
            return (None,) * 8
        gq, gk = ctx.saved_tensors
        return (gq * grad_total if ctx.needs_input_grad[0] else None,
                gk * grad_total if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None)


def _prepare(queries: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
             num_classes: int | None, self_index: torch.Tensor | None, sigma: float):
    check_embeddings(queries, "queries")
    check_embeddings(keys, "keys")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]} but keys {keys.shape[1]}")
    check_labels(key_labels, keys.shape[0], "key labels")
    sigma = check_sigma(sigma)
    classes = int(key_labels.max()) + 1
    if num_classes is None:
        num_classes = classes
    elif classes > num_classes:
        raise ValueError(f"labels go up to {classes - 1} but num_classes={num_classes}")
    if int(torch.unique(key_labels).numel()) < 2:
        raise ValueError(f"the Bayes error needs at least 2 classes among the labels, got only "
                         f"class {int(key_labels[0])}")
    if self_index is not None:
        self_index = torch.as_tensor(self_index, dtype=torch.long, device=queries.device)
        if self_index.shape != (queries.shape[0],):
            raise ValueError(f"self_index must have one entry per query ({queries.shape[0]}), "
                             f"got shape {tuple(self_index.shape)}")
        if int(self_index.max()) >= keys.shape[0]:
            raise ValueError(f"self_index {int(self_index.max())} out of range for "
                             f"{keys.shape[0]} keys")
    excluded = 1 if self_index is not None and bool((self_index >= 0).any()) else 0
    if keys.shape[0] - excluded < 1:
        raise ValueError(f"need at least one key besides the query itself, got {keys.shape[0]} keys")
    # a detached common shift of queries and keys leaves every distance (and gradient) unchanged
    # and keeps the matmul form accurate in fp32 when embeddings sit far from the origin
    centre = keys.detach().mean(0, keepdim=True)
    return queries - centre, keys - centre, key_labels.to(queries.device), num_classes, self_index, sigma


def max_posterior_sum(queries: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
                      sigma: float, num_classes: int | None = None,
                      self_index: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                      block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i w_i max_c p(c | q_i), per-query max posterior)``, differentiable in queries and keys.

    ``self_index[i]`` is the position of query ``i`` among the keys (excluded from its own
    posterior), or -1 when the query is not a key. The per-query maxima are detached.
    """
    q, k, y, c, idx, s = _prepare(queries, keys, key_labels, num_classes, self_index, sigma)
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=q.dtype, device=q.device).detach()
    return _WeightedMaxPosterior.apply(q, k, y, c, s, idx, weights, block_size)


@torch.no_grad()
def kernel_posterior(queries: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
                     sigma: float, num_classes: int | None = None,
                     self_index: torch.Tensor | None = None,
                     block_size: int | None = None) -> torch.Tensor:
    """The leave-one-out kernel posterior ``p(c | q_i)`` (n_queries x C), blocked, no gradient."""
    q, k, y, c, idx, s = _prepare(queries, keys, key_labels, num_classes, self_index, sigma)
    return _max_posterior_blocks(q, k, y, c, s, idx, None, block_size, want_grad=False,
                                 want_posterior=True)["posterior"]


def bayes_error(embeddings: torch.Tensor, labels: torch.Tensor, sigma: float | str | None = None,
                num_classes: int | None = None, bank: torch.Tensor | None = None,
                bank_labels: torch.Tensor | None = None,
                block_size: int | None = None) -> torch.Tensor:
    """Eq. (7): ``1 - mean_i max_c p(c | x_i)`` over the rows of ``embeddings`` (differentiable).

    Keys are the embeddings themselves (self-pairs excluded) plus, optionally, fixed ``bank``
    rows with ``bank_labels``. ``sigma=None``: the median distance to the ``ceil(sqrt(n))``-th
    nearest neighbour among all keys (:func:`resolve_sigma`).
    """
    check_embeddings(embeddings)
    check_labels(labels, embeddings.shape[0])
    keys, key_labels = embeddings, labels
    if bank is not None:
        check_embeddings(bank, "bank")
        if bank_labels is None:
            raise ValueError("bank_labels are required with a bank")
        check_labels(bank_labels, bank.shape[0], "bank labels")
        keys = torch.cat([embeddings, bank.detach().to(embeddings)])
        key_labels = torch.cat([labels, bank_labels.to(labels.device)])
    sigma = resolve_sigma(sigma, keys.detach())
    n = embeddings.shape[0]
    idx = torch.arange(n, device=embeddings.device)
    total, _ = max_posterior_sum(embeddings, keys, key_labels, sigma, num_classes, idx,
                                 block_size=block_size)
    return 1.0 - total / n


def dense_bayes_error(embeddings: torch.Tensor, labels: torch.Tensor, sigma: float,
                      num_classes: int | None = None) -> torch.Tensor:
    """Plain n x n reference (tests and benchmark only): same value and gradient, O(n^2) memory."""
    n = embeddings.shape[0]
    num_classes = num_classes or int(labels.max()) + 1
    sq = (embeddings * embeddings).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2 * embeddings @ embeddings.T
    logits = -d2 / (2 * sigma * sigma)
    eye = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    logits = logits.masked_fill(eye, float("-inf"))
    p = torch.softmax(logits, dim=1) @ torch.nn.functional.one_hot(labels, num_classes).to(embeddings.dtype)
    return 1.0 - p.max(dim=1).values.mean()
