"""Fidelity of a decoded tensor to its reference, per tensor kind (feeds `draftfeed bench encodings`).

hidden: relative error per row and cosine; probs: KL with the residual mass spread over the decoded
distribution's zeros, retained mass, top-1 agreement; mask/ids: exact agreement.
"""

from __future__ import annotations

import math

import torch

from .errors import InvalidArgument

__all__ = ["fidelity"]


def _row_chunks(x: torch.Tensor, y: torch.Tensor, chunk: int = 4096):
    width = x.shape[-1] if x.dim() else 1
    x, y = x.reshape(-1, width), y.reshape(-1, width)
    for start in range(0, x.shape[0], chunk):
        yield x[start : start + chunk].double(), y[start : start + chunk].to(x.device).double()


def _hidden_fidelity(ref: torch.Tensor, dec: torch.Tensor) -> dict:
    rel, cos, abs_err = [], [], 0.0
    for x, y in _row_chunks(ref, dec):
        nx, ny, err = x.norm(dim=-1), y.norm(dim=-1), (x - y).norm(dim=-1)
        rel.append(torch.where(nx > 0, err / nx.clamp_min(1e-300), torch.where(err > 0, math.inf, 0.0)))
        both_zero = (nx == 0) & (ny == 0)
        cos.append(torch.where(both_zero, 1.0, (x * y).sum(-1) / (nx * ny).clamp_min(1e-300)))
        abs_err = max(abs_err, (x - y).abs().max().item() if x.numel() else 0.0)
    rel_t, cos_t = torch.cat(rel), torch.cat(cos)
    empty = rel_t.numel() == 0
    return {
        "max_rel_err": 0.0 if empty else rel_t.max().item(),
        "mean_rel_err": 0.0 if empty else rel_t.mean().item(),
        "min_cosine": 1.0 if empty else cos_t.min().item(),
        "max_abs_err": abs_err,
    }


def _probs_fidelity(ref: torch.Tensor, dec: torch.Tensor) -> dict:
    """KL(p||q'), where q' keeps q's shape on its support, scaled to the mass p puts there, and spreads
    the rest (the mass p puts on q's zeros) uniformly over q's zeros, so KL stays finite."""
    kl, kept, agree, abs_err, mass_err = [], [], [], 0.0, 0.0
    for p, q in _row_chunks(ref, dec):
        support = q > 0
        on_support = torch.where(support, p, 0.0).sum(-1, keepdim=True)
        residual = (p.sum(-1, keepdim=True) - on_support).clamp_min(0.0)
        zeros = (~support).sum(-1, keepdim=True)
        q_sum = q.sum(-1, keepdim=True)
        shaped = q / torch.where(q_sum > 0, q_sum, 1.0) * on_support
        q2 = torch.where(support, shaped, residual / zeros.clamp_min(1))
        kl.append((torch.xlogy(p, p) - torch.xlogy(p, q2)).sum(-1))
        kept.append(on_support.squeeze(-1))
        if p.shape[-1]:
            agree.append((p.argmax(-1) == q.argmax(-1)).double())
        else:
            agree.append(torch.ones(p.shape[0], dtype=torch.float64, device=p.device))
        if p.numel():
            abs_err = max(abs_err, (p - q).abs().max().item())
            mass_err = max(mass_err, (q_sum - 1).abs().max().item())
    kl_t, kept_t, agree_t = torch.cat(kl), torch.cat(kept), torch.cat(agree)
    empty = kl_t.numel() == 0
    return {
        "kl_mean": 0.0 if empty else kl_t.mean().item(),
        "kl_max": 0.0 if empty else kl_t.max().item(),
        "retained_min": 1.0 if empty else kept_t.min().item(),
        "retained_mean": 1.0 if empty else kept_t.mean().item(),
        "top1_agreement": 1.0 if empty else agree_t.mean().item(),
        "max_abs_err": abs_err,
        "max_mass_err": mass_err,
    }


def _exact_fidelity(ref: torch.Tensor, dec: torch.Tensor) -> dict:
    same_shape = list(ref.shape) == list(dec.shape)
    agreement = (ref == dec.to(ref.device)).double().mean().item() if same_shape and ref.numel() else 1.0
    exact = same_shape and ref.dtype == dec.dtype and torch.equal(ref, dec.to(ref.device))
    return {"agreement": agreement if same_shape else 0.0, "exact": bool(exact)}


_FIDELITY = {
    "hidden": _hidden_fidelity,
    "probs": _probs_fidelity,
    "mask": _exact_fidelity,
    "ids": _exact_fidelity,
}


def fidelity(
    reference: torch.Tensor, decoded: torch.Tensor, kind: str, rows: torch.Tensor | None = None
) -> dict:
    """How close `decoded` is to `reference`, as a flat dict of floats (keys depend on `kind`).

    hidden: max/mean relative error per row (||x-y|| / ||x||), min cosine, max abs error.
    probs: KL(p||q) mean/max (residual mass spread uniformly over q's zeros), retained mass of p on
    q's support (min/mean), top-1 agreement, max abs error, max |sum(q) - 1|.
    mask/ids: fraction of equal elements, and whether dtype, shape and values are all exact.
    `rows` (hidden/probs): a bool tensor over the leading dims selecting the rows that count, e.g.
    the supervised positions (the shifted tail row of target_probs is uniform by construction).
    """
    if kind not in _FIDELITY:
        raise InvalidArgument(f"unknown tensor kind {kind!r}; expected one of {', '.join(_FIDELITY)}")
    if kind in ("hidden", "probs"):
        if list(reference.shape) != list(decoded.shape):
            raise InvalidArgument(
                f"fidelity: decoded shape {list(decoded.shape)} differs from reference {list(reference.shape)}"
            )
        if rows is not None:
            if list(rows.shape) != list(reference.shape[:-1]):
                raise InvalidArgument(
                    f"fidelity: rows has shape {list(rows.shape)}; expected the leading dims "
                    f"{list(reference.shape[:-1])} of the reference"
                )
            keep = rows.to(reference.device).bool()
            reference, decoded = reference[keep], decoded.to(reference.device)[keep]
    return _FIDELITY[kind](reference, decoded)
