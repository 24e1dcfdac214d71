"""Verification of proposed tokens against the target model's distributions, in one batch.

Greedy: accept the proposals while each equals the target's argmax; the next token is the target's argmax at
the first mismatch (or after the last proposal). Sampled (Leviathan et al. 2023, Chen et al. 2023): proposal
d_i drawn from the draft's q_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first
rejection the next token is drawn from normalise(max(0, p_i - q_i)); if all k are accepted, a bonus token is
drawn from p_k. Every emitted token is then distributed exactly as the target's p given the tokens before it,
whatever q is. A deterministic proposer (n-gram) has a one-hot q: accept with probability p_i(d_i), on
rejection draw from p_i without d_i.

Shapes: B sequences, up to K proposals each (padded; `num_proposed` [B] says how many are real), V vocab.
p: [B, K + 1, V] target probabilities (already shaped by temperature / top-k / top-p / penalties), q: [B, K, V]
draft probabilities or None (one-hot). Returns (accepted [B] counts, next token [B]): a sequence gains its
first accepted[b] proposals, then next[b].
"""
from __future__ import annotations

import torch


def verify_greedy(target_argmax: torch.Tensor, proposed: torch.Tensor,
                  num_proposed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """target_argmax: [B, K + 1] the target's argmax at each position; proposed: [B, K]."""
    k = proposed.shape[1]
    valid = torch.arange(k, device=proposed.device)[None, :] < num_proposed[:, None]
    match = (target_argmax[:, :k] == proposed) & valid
    accepted = match.int().cumprod(dim=1).sum(dim=1)
    return accepted.long(), target_argmax.gather(1, accepted[:, None].long())[:, 0]


def verify_sampled(p: torch.Tensor, proposed: torch.Tensor, num_proposed: torch.Tensor,
                   q: torch.Tensor | None = None,
                   generators: list[torch.Generator | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact rejection sampling (see the module docstring). `generators`: one per sequence (seeded requests)
    or None (the global generator). Random draws happen on the host (CPU) so that a seed gives the same
    tokens on any device."""
    b, k = proposed.shape
    device = p.device
    u = _uniform(b, k + 1, generators).to(device)
    if k == 0:
        return torch.zeros(b, dtype=torch.long, device=device), _categorical(p[:, 0], u[:, 0])
    valid = torch.arange(k, device=device)[None, :] < num_proposed[:, None]
    p_prop = p[:, :k].gather(2, proposed[..., None].long())[..., 0]                      # [B, K]
    q_prop = torch.ones_like(p_prop) if q is None else q.gather(2, proposed[..., None].long())[..., 0]
    ratio = torch.where(q_prop > 0, p_prop / q_prop.clamp_min(1e-30), torch.zeros_like(p_prop))
    accept = (u[:, :k] < ratio) & valid
    accepted = accept.int().cumprod(dim=1).sum(dim=1)                                     # [B]
    rows = accepted.long()
    target = p.gather(1, rows[:, None, None].expand(b, 1, p.shape[2]))[:, 0]              # p at the stop
    rejected = rows < num_proposed.long()
    if q is None:  # max(0, p - onehot(d)): p without the rejected token
        residual = target.scatter(1, proposed.long().gather(1, rows.clamp(max=k - 1)[:, None]), 0.0)
    else:
        q_at = q.gather(1, rows.clamp(max=k - 1)[:, None, None].expand(b, 1, q.shape[2]))[:, 0]
        residual = (target - q_at).clamp_min(0.0)
    dist = torch.where(rejected[:, None], residual, target)
    # a residual with no mass (p == q there: a rejection then has probability 0, guarded here) falls back to p
    dist = torch.where(dist.sum(1, keepdim=True) > 0, dist, target)
    return accepted.long(), _categorical(dist, u[:, k])


def _uniform(b: int, n: int, generators) -> torch.Tensor:
    if generators is None:
        return torch.rand(b, n, dtype=torch.float64)
    return torch.stack([torch.rand(n, dtype=torch.float64, generator=g) for g in generators])


def _categorical(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row of unnormalised `weights` [B, V], by inverting the CDF at the uniforms u [B]."""
    cdf = weights.double().cumsum(1)
    idx = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1])[:, None].contiguous(), right=True)
    return idx[:, 0].clamp(max=weights.shape[1] - 1)
