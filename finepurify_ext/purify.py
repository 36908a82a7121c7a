"""Steps 1, 3 and 4 of the method: drift, the indicator ``r = drift^2 / (H + eps)`` ranked globally, and
the reset of the most abnormal fraction to the pre-trained values (../shared/DESIGN.md).

The baselines share this machinery and differ only in their ranking:

- ``fine_purifying``: ``drift^2 / (H + eps)``, the per-dimension clean Hessian (the method);
- ``no_hessian``: ``drift^2 / (mean(H) + eps)`` with each tensor's mean Hessian: the per-dimension
  curvature removed, the layer's scale kept (a literal ``drift^2`` ranks exactly like ``magnitude``);
- ``magnitude``: ``|drift|`` (TIES-style);
- ``fine_mixing``: a random ranking (Fine-mixing's random mask), seeded.

Budget options (issue 4's findings): the word-embedding matrix may be kept out of the ranking
(``embeddings="separate"``: its rows for tokens the clean data never reaches, which have a Hessian
of exactly zero, are reset when they moved, as Fine-mixing's embedding purification does); the
reserve ratio may be counted over the parameters that moved; the Hessian may be floored at a
quantile of its values. ``PurifyConfig.literal()`` is the paper's plain form.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from . import ops
from .errors import UserError

RANKINGS = ("fine_purifying", "no_hessian", "magnitude", "fine_mixing")


@dataclass
class PurifyConfig:
    ranking: str = "fine_purifying"
    reserve_ratio: float = 0.3  # fraction of the ranked (moved) dimensions kept at fine-tuned values
    eps: float = 1e-8
    embeddings: str = "separate"  # "separate" or "ranked" (the word-embedding matrix ranked with the rest)
    count_moved_only: bool = True  # reserve ratio counted over dimensions whose drift is not zero
    hessian_floor_quantile: float | None = 0.5  # H floored at this quantile of its values (None: no floor)
    seed: int = 0  # fine_mixing's random ranking

    def __post_init__(self):
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if self.embeddings not in ("separate", "ranked"):
            raise ValueError(f"embeddings must be 'separate' or 'ranked', got {self.embeddings!r}")
        if not 0.0 <= self.reserve_ratio <= 1.0:
            raise ValueError(f"reserve_ratio must be in [0, 1] (the fraction kept), got {self.reserve_ratio}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        q = self.hessian_floor_quantile
        if q is not None and not 0.0 <= q <= 1.0:
            raise ValueError(f"hessian_floor_quantile must be in [0, 1] or None, got {q}")

    @classmethod
    def literal(cls, **kw) -> "PurifyConfig":
        """The paper's plain form: every matched parameter ranked, rho over all, no floor."""
        return cls(**{"embeddings": "ranked", "count_moved_only": False, "hessian_floor_quantile": None, **kw})

    def replace(self, **kw) -> "PurifyConfig":
        return dataclasses.replace(self, **kw)


@dataclass
class PurifyReport:
    ranking: str
    reserve_ratio: float
    threshold: float | None  # the k-th largest score (None when nothing is ranked for reset)
    ranked_elements: int
    moved_elements: int
    num_reset: int  # the budget; ties at the threshold may add a few
    reset_per_parameter: dict[str, int] = field(default_factory=dict)
    numel_per_parameter: dict[str, int] = field(default_factory=dict)
    embedding_rows_reset: int = 0
    embedding_parameter: str | None = None
    kept_unscored: list[str] = field(default_factory=list)  # no pre-trained value (a new head)
    hessian_floor: float | None = None
    sample: dict[str, list[float]] = field(default_factory=dict)  # drift^2, H, reset flags (plots)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def matched_parameters(model: torch.nn.Module, pretrained_state: dict[str, torch.Tensor]):
    """(scored names, unscored names): a parameter is scored when the pre-trained state holds a
    tensor of the same name and shape; the others (a new classifier head) are kept as they are."""
    scored, unscored = [], []
    for name, p in model.named_parameters():
        pre = pretrained_state.get(name)
        (scored if pre is not None and pre.shape == p.shape else unscored).append(name)
    return scored, unscored


def word_embedding_name(model: torch.nn.Module) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    if embedding is None:
        return None
    for name, p in model.named_parameters():
        if p is embedding.weight:
            return name
    return None


def _quantile(tensors, q: float, max_samples: int = 1 << 20) -> float:
    """Approximate quantile over many tensors from an evenly strided sample."""
    total = sum(t.numel() for t in tensors)
    stride = max(1, total // max_samples)
    sample = torch.cat([t.reshape(-1)[::stride].float() for t in tensors])
    return float(torch.quantile(sample[:16_000_000], q))  # torch.quantile's size limit


def _ranking_hessians(config: PurifyConfig, hessians):
    """The (hessian-like tensors, eps) for which the op's score drift^2 / (h + eps) ranks as the
    configured ranking, and the Hessian floor applied (fine_mixing is ranked in purify_)."""
    if config.ranking == "magnitude":
        # drift^2 / 1 ranks like |drift|
        return [torch.zeros_like(h) for h in hessians], 1.0, None
    floor = None
    if config.hessian_floor_quantile is not None and hessians:
        floor = _quantile(hessians, config.hessian_floor_quantile)
    if config.ranking == "fine_purifying":
        hs = hessians if floor is None else [h.clamp_min(floor) for h in hessians]
        return hs, config.eps, floor
    if config.ranking == "no_hessian":
        hs = [torch.full_like(h, max(float(h.mean()) if h.numel() else 0.0, floor or 0.0)) for h in hessians]
        return hs, config.eps, floor
    raise AssertionError(config.ranking)


def unrankable(inputs) -> UserError | None:
    """The error naming the first input that cannot be scored, or None. ``inputs``: (what, tensor)
    pairs such as ("the suspect model's parameter 'x'", tensor) or ("the Hessian of 'x'", tensor).
    The ops name list indices; a user needs names, so this runs once an op has refused."""
    for what, t in inputs:
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            fix = "re-estimate it (did the clean loss diverge?)" if "Hessian" in what else "use an undamaged copy"
            return UserError(f"{what} holds {bad} NaN or Inf value{'s' if bad > 1 else ''}; scores cannot be "
                             f"ranked: {fix}")
        if "Hessian" in what and bool((t < 0).any()):
            return UserError(f"{what} has negative values; a squared-gradient Hessian is >= 0: re-estimate it")
    return None


def _named_inputs(names, ft, pre, hs):
    for n, f, p, h in zip(names, ft, pre, hs):
        yield f"the suspect model's parameter {n!r}", f
        yield f"the pre-trained model's parameter {n!r}", p
        yield f"the Hessian of {n!r}", h


@torch.no_grad()
def purify_(
    model: torch.nn.Module,
    pretrained_state: dict[str, torch.Tensor],
    hessians: dict[str, torch.Tensor],
    config: PurifyConfig,
    plot_samples: int = 20_000,
) -> PurifyReport:
    """Resets, in place, the most abnormal fraction of the model's matched parameters to their
    pre-trained values. Returns what was done."""
    params = dict(model.named_parameters())
    scored, unscored = matched_parameters(model, pretrained_state)
    embedding = word_embedding_name(model) if config.embeddings == "separate" else None
    ranked = [n for n in scored if n != embedding]
    for n in ranked:
        if n not in hessians:
            raise ValueError(f"purify: no Hessian for parameter {n!r}; estimate it on this model")
    ft = [params[n].data for n in ranked]
    pre = [pretrained_state[n].to(device=params[n].device, dtype=params[n].dtype) for n in ranked]
    hs = [hessians[n].to(params[n].device) for n in ranked]

    moved_masks = [f != p for f, p in zip(ft, pre)]
    moved = sum(int(m.sum()) for m in moved_masks)
    total = sum(f.numel() for f in ft)
    counted = moved if config.count_moved_only else total
    num_reset = ops.num_reset_for(counted, config.reserve_ratio)

    report = PurifyReport(config.ranking, config.reserve_ratio, None, total, moved, num_reset,
                          kept_unscored=unscored, embedding_parameter=embedding)
    sample_idx = _plot_sample(ft, plot_samples, config.seed)
    before = [f.reshape(-1)[i.to(f.device)].clone() for f, i in zip(ft, sample_idx)]

    if num_reset > 0:
        if config.ranking == "fine_mixing":  # random scores: the op sees no weights to check
            error = unrankable(_named_inputs(ranked, ft, pre, hs))
            if error is not None:
                raise error
            gen = torch.Generator().manual_seed(config.seed)
            # Random scores in (0, 1]; 0 for dimensions that never moved when rho counts moved ones.
            scores = [(1.0 - torch.rand(f.shape, generator=gen)).to(f.device) for f in ft]
            if config.count_moved_only:
                scores = [s * m for s, m in zip(scores, moved_masks)]
            zeros = [torch.zeros_like(s) for s in scores]
            threshold = ops.score_threshold(scores, zeros, zeros, num_reset, 1.0)
            counts = []
            for f, p, s in zip(ft, pre, scores):
                reset = s * s / 1.0 >= threshold
                f.copy_(torch.where(reset, p, f))
                counts.append(int(reset.sum()))
            report.threshold = threshold
        else:
            hs_rank, eps, floor = _ranking_hessians(config, hs)
            report.hessian_floor = floor
            try:
                threshold = ops.score_threshold(ft, pre, hs_rank, num_reset, eps)
            except RuntimeError as op_error:
                raise (unrankable(_named_inputs(ranked, ft, pre, hs)) or op_error) from op_error
            counts = ops.masked_reset_(ft, pre, hs_rank, threshold, eps).tolist()
            report.threshold = threshold
        report.reset_per_parameter = {n: int(c) for n, c in zip(ranked, counts)}
    else:
        report.reset_per_parameter = {n: 0 for n in ranked}
    report.numel_per_parameter = {n: params[n].numel() for n in scored}

    if embedding is not None:
        # Rows of tokens the clean data never reaches (Hessian exactly zero) that moved.
        w = params[embedding].data
        w_pre = pretrained_state[embedding].to(device=w.device, dtype=w.dtype)
        h = hessians[embedding].to(w.device)
        unseen = (h == 0).all(dim=1) & (w != w_pre).any(dim=1)
        w[unseen] = w_pre[unseen]
        report.embedding_rows_reset = int(unseen.sum())
        report.reset_per_parameter[embedding] = int(unseen.sum()) * w.shape[1]

    # A sample for the plot: drift^2 and H before the reset, and whether the element was reset.
    d2, hv, flag = [], [], []
    for f, p, h, i, b in zip(ft, pre, hs, sample_idx, before):
        i = i.to(f.device)
        d2 += ((b.float() - p.reshape(-1)[i].float()) ** 2).tolist()
        hv += h.reshape(-1)[i].tolist()
        flag += (f.reshape(-1)[i] != b).tolist()
    report.sample = {"drift_sq": d2, "hessian": hv, "reset": flag}
    return report


def _plot_sample(tensors, count: int, seed: int):
    total = sum(t.numel() for t in tensors)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in tensors:
        n = min(t.numel(), max(1, round(count * t.numel() / max(total, 1)))) if t.numel() else 0
        out.append(torch.randint(0, t.numel(), (n,), generator=gen) if n else torch.zeros(0, dtype=torch.long))
    return out
