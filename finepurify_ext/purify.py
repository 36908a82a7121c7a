"""Steps 1, 3 and 4 of the method: drift, the indicator ``r = drift^2 / (H + eps)`` ranked globally, and
the reset of the most abnormal fraction to the pre-trained values (../shared/DESIGN.md).

The baselines share this machinery and differ only in their ranking, each a scoring spec of the
fused ops (``ops.Ranking`` and the hessians passed), never a score tensor:

- ``fine_purifying``: ``drift^2 / (H + eps)``, the per-dimension clean Hessian (the method);
- ``no_hessian``: ``drift^2 / (mean(H) + eps)`` with each tensor's mean Hessian: the per-dimension
  curvature removed, the layer's scale kept (a literal ``drift^2`` ranks exactly like ``magnitude``);
- ``magnitude``: ``|drift|`` (TIES-style);
- ``fine_mixing``: a random ranking (Fine-mixing's random mask), seeded, drawn per element by the
  ops' counter-based generator (the same mask on CPU, GPU and out of core); the budget counts the
  weights that moved (a random mask over all weights resets the same share of them).

Budget options (issue 4's findings): the word-embedding matrix may be kept out of the ranking
(``embeddings="separate"``: its rows for tokens the clean data never reaches, which have a Hessian
of exactly zero, are reset when they moved, as Fine-mixing's embedding purification does); the
reserve ratio may be counted over the parameters that moved; the Hessian may be floored at a
quantile of its values. ``PurifyConfig.literal()`` is the paper's plain form.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from . import ops
from .errors import UserError
from .sharded import Shards
from .threshold import (BETWEEN_BINS, CANDIDATE_COUNTS, CANDIDATE_KEYS, CANDIDATES_MIN_WEIGHTS, CANDIDATES_ON,
                        LEVEL_BINS, SAMPLE_RUN, RankFeed, _is_dtensor, bracket_from_sample, keys_room, piece_room,
                        rank_spread, sample_budget, sample_stride, search_ranges, threshold_from_histograms)

RANKINGS = ("fine_purifying", "no_hessian", "magnitude", "fine_mixing")
ADDED_TOKENS = ("mean", "keep")
# Largest group of tensors moved to the model's device at once when the pre-trained state or the
# Hessians live elsewhere (or in another dtype): the extra memory of purify_.
GROUP_BYTES = 48 << 20


@dataclass
class PurifyConfig:
    ranking: str = "fine_purifying"
    reserve_ratio: float = 0.3  # fraction of the ranked (moved) dimensions kept at fine-tuned values
    eps: float = 1e-8
    embeddings: str = "separate"  # "separate" or "ranked" (the word-embedding matrix ranked with the rest)
    count_moved_only: bool = True  # reserve ratio counted over dimensions whose drift is not zero
    hessian_floor_quantile: float | None = 0.5  # H floored at this quantile of its values (None: no floor)
    seed: int = 0  # fine_mixing's random ranking
    # Under the embedding rule, the rows of tokens the suspect added to its vocabulary that the clean
    # data never reaches: "mean" resets them to the pre-trained rows' mean, "keep" keeps them.
    added_tokens: str = "mean"

    def __post_init__(self):
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if self.added_tokens not in ADDED_TOKENS:
            raise ValueError(f"added_tokens must be one of {ADDED_TOKENS}, got {self.added_tokens!r}")
        if self.embeddings not in ("separate", "ranked"):
            raise ValueError(f"embeddings must be 'separate' or 'ranked', got {self.embeddings!r}")
        if not 0.0 <= self.reserve_ratio <= 1.0:
            raise ValueError(f"reserve_ratio must be in [0, 1] (the fraction kept), got {self.reserve_ratio}")
        with np.errstate(over="ignore"):
            eps32 = np.float32(self.eps)  # what the kernels add: 1e-50 is 0 there, 1e39 inf
        if not 0 < eps32 < np.inf:
            raise ValueError(f"eps must be a positive finite float32 number, got {self.eps}")
        if self.seed < 0:  # ops.Ranking takes a negative seed for no random ranking: Fine-mixing would not be
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
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
    # How the embedding's unseen rows were found: "hessian" (rows of exactly zero Hessian) or
    # "seen_tokens" (rows of tokens absent from the clean inputs: an embedding tied to the output).
    embedding_rule: str | None = None
    kept_unscored: list[str] = field(default_factory=list)  # no pre-trained value (a new head)
    # tensors a resized vocabulary grew (``added_rows``); the added rows are kept
    added_rows: dict[str, dict[str, int]] = field(default_factory=dict)
    # tensors a resized vocabulary cut (``removed_rows``): ranked against the pre-trained first rows
    removed_rows: dict[str, dict[str, int]] = field(default_factory=dict)
    # the input embedding's added rows the clean data never reaches (``unseen_added_rows``)
    unseen_added_rows: list[int] = field(default_factory=list)
    # how many of them were reset to the pre-trained rows' mean (``PurifyConfig.added_tokens``)
    added_rows_reset: int = 0
    hessian_floor: float | None = None
    threshold_passes: int = 0  # the passes over every ranked weight the threshold search took
    sample: dict[str, list[float]] = field(default_factory=dict)  # drift^2, H, reset flags (plots)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameter names a pre-trained state and Hessians use: a ``torch.compile``d
    model's original (its names gain ``_orig_mod.``) and a DDP or DataParallel replica's module (its
    names gain ``module.``). Ranked by the wrapper's names, nothing would match: no reset at all."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


# The path segments wrappers insert into parameter names, at the top or around a layer:
# torch.compile's, activation checkpointing's (checkpoint_wrapper) and FSDP1's (whose whole
# parameters, inside summon_full_params, are named without it already).
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def sharded_by_fsdp1(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds FSDP1 units (``FullyShardedDataParallel``) outside
    ``summon_full_params``: each rank's parameters are then its slices of flat buffers (1-D, or one
    ``_flat_param``), which no pre-trained tensor matches by name and shape."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no FSDP1 unit exists (and no import's cost)
    return fsdp is not None and any(isinstance(m, fsdp.FullyShardedDataParallel)
                                    and getattr(m.training_state, "name", "") != "SUMMON_FULL_PARAMS"
                                    for m in model.modules())


def parameters_by_name(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The model's parameters under the names a pre-trained state gives them: those of its module
    (``unwrapped``), without the segments wrappers insert around a layer (``WRAPPER_SEGMENTS``),
    which would leave that layer's weights unmatched and unranked."""
    return {".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS): p
            for name, p in unwrapped(model).named_parameters()}


def refuse_unmatched(params: dict, pretrained_state: dict, scored: list[str]) -> None:
    """Refuses a pre-trained state that names none of the model's parameters (keys of another
    prefix: a base model's state for a classifier, say): the purification would reset nothing."""
    if params and not scored:
        theirs = next(iter(pretrained_state), None)
        raise UserError(f"purify: no parameter of the model has a pre-trained tensor of its name and shape (the "
                        f"model's {next(iter(params))!r}, the pre-trained state's {theirs!r}); "
                        + (_unnameable(params) or "give the state of the model it was fine-tuned from under the "
                           "model's parameter names (pipeline.pretrained_state_for maps a base checkpoint onto them)"))


def _unnameable(params: dict) -> str | None:
    """The fix where the model's wrapping hides its layers' names, which no pre-trained state can match."""
    if any("lora_A" in parts or "base_layer" in parts for parts in (name.split(".") for name in params)):
        return ("a PEFT model holds its base weights and adapters apart: merge them first (model = "
                "model.merge_and_unload()), or give the adapter directory to finepurify purify --suspect")
    return None


def matched_parameters(model: torch.nn.Module, pretrained_state: dict[str, torch.Tensor], params=None, resized=None):
    """(scored names, unscored names): a parameter is scored when the pre-trained state holds a
    tensor of the same name and shape, or one whose first rows it shares where a resized vocabulary
    changed its rows (``resized_rows``); the others (a new classifier head) are kept as they are.
    ``params``: the model's ``dict(named_parameters())`` where the caller has it (a walk over a large
    model's modules costs milliseconds), and ``resized``, ``resized_rows``'s, likewise."""
    params = params if params is not None else parameters_by_name(model)
    resized = resized if resized is not None else resized_rows(model, pretrained_state, params)
    scored, unscored = [], []
    for name, p in params.items():
        pre = pretrained_state.get(name)
        (scored if pre is not None and (pre.shape == p.shape or name in resized) else unscored).append(name)
    return scored, unscored


def resized_rows(model: torch.nn.Module, pretrained_state: dict[str, torch.Tensor], params=None) -> dict[str, int]:
    """The parameters whose rows a resized vocabulary changed, each with how many first rows it
    shares with its pre-trained tensor: those rows are scored like any weight.
    ``resize_token_embeddings`` appends rows to the input embedding (and an untied output layer, and
    its bias) after tokens were added: the added tokens' rows have no pre-trained value and are kept,
    as a new head is (``added_rows``). It drops the last rows when cutting a padded vocabulary to its
    tokenizer's length (Qwen2.5 and Phi-2 pad theirs): the suspect's rows are the pre-trained
    tensor's first rows (``removed_rows``). A tensor is taken as resized only where it has the
    suspect's vocabulary rows, the pre-trained tensor the pre-trained vocabulary's (another number),
    and every other dimension alike (as out of core)."""
    params = params if params is not None else parameters_by_name(model)
    embedding = word_embedding_name(model, params)
    if embedding is None:
        return {}
    # the pre-trained vocabulary's rows: its embedding's, or its output layer's where a state lacks the embedding
    output = getattr(model, "get_output_embeddings", lambda: None)()
    told_by = embedding if embedding in pretrained_state else next(
        (n for n, p in params.items() if output is not None and p is getattr(output, "weight", None)), None)
    if told_by not in pretrained_state:
        return {}
    vocabulary, pre_vocabulary = params[embedding].shape[0], pretrained_state[told_by].shape[0]
    if vocabulary == pre_vocabulary:
        return {}
    resized = {}
    for name, p in params.items():
        pre = pretrained_state.get(name)
        if (pre is not None and p.dim() and pre.dim() == p.dim() and p.shape[0] == vocabulary
                and pre.shape[0] == pre_vocabulary and pre.shape[1:] == p.shape[1:]):
            resized[name] = min(vocabulary, pre_vocabulary)
    return resized


def added_rows(shape, pretrained_rows: int) -> dict[str, int]:
    """What a report says of a tensor a resized vocabulary grew to ``shape``: its rows, the first
    ``pretrained_rows`` of which were ranked, and the weights of the others (kept as they are)."""
    return {"rows": shape[0], "pretrained_rows": pretrained_rows,
            "added_weights": (shape[0] - pretrained_rows) * math.prod(shape[1:])}


def vocabulary_resizes(shapes: dict, pretrained_rows: dict) -> tuple[dict, dict]:
    """(``added_rows``, ``removed_rows``) of the tensors a resized vocabulary changed: their shapes
    in the suspect, and the pre-trained tensors' rows, by name. A cut tensor's rows were all ranked,
    against the pre-trained tensor's first rows."""
    added = {n: added_rows(shapes[n], r) for n, r in pretrained_rows.items() if shapes[n][0] > r}
    removed = {n: {"rows": shapes[n][0], "pretrained_rows": r} for n, r in pretrained_rows.items() if shapes[n][0] < r}
    return added, removed


def added_tokens(added_rows: dict) -> int:
    """How many tokens a resized vocabulary added, from ``added_rows``'s report (0: none)."""
    return max((t["rows"] - t["pretrained_rows"] for t in added_rows.values()), default=0)


def word_embedding_name(model: torch.nn.Module, params=None) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    if embedding is None:
        return None
    for name, p in (params if params is not None else parameters_by_name(model)).items():
        if p is embedding.weight:
            return name
    return None


def input_embedding_tied(model: torch.nn.Module) -> bool:
    """Whether the input embedding is the output embedding too (GPT-2, SmolLM2, Llama-3.2-1B): then
    the output softmax gives every row a gradient, and a zero Hessian row no longer means a token the
    clean data never reaches."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    inp, out = (get_in() if get_in else None), (get_out() if get_out else None)
    return inp is not None and out is not None and getattr(out, "weight", None) is inp.weight


def sample_quantile(sample: torch.Tensor, q: float) -> float:
    """The q-quantile of a 1-D sample with linear interpolation, the bits ``torch.quantile`` gives
    (the sign of a zero aside), by a selection on the CPU and a sort on a GPU instead of a sort on
    the CPU, where the sample lives: the order statistics are exact on any device and the
    interpolation is done on the CPU, so every path and device gets the same bits. NaN where the
    sample holds one. Shared by the in-memory and out-of-core paths."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sample_quantile: q must be in [0, 1], got {q}")
    x = sample.reshape(-1).float()
    n = x.numel()
    if n == 0:
        raise ValueError("sample_quantile: the sample is empty")
    rank = torch.tensor(q, dtype=torch.float32) * (n - 1)  # in float32, as torch.quantile ranks
    below = min(int(rank), n - 1)  # float32 can round n - 1 up past 2**24
    above = min(math.ceil(float(rank)), n - 1)
    if x.is_cuda:  # one read from the device: the two order statistics and the largest (NaN sorts last)
        ordered = torch.sort(x).values
        low, high, largest = torch.stack([ordered[below], ordered[above], ordered[-1]]).cpu()
        return math.nan if math.isnan(largest) else float(torch.lerp(low, high, rank - below))
    values = x.numpy()
    if np.isnan(values).any():
        return math.nan
    # numpy's introselect gives both order statistics in one pass over a copy (torch.kthvalue plus
    # a search for the next one took 12-16 ms on a 1M sample here; this 9 ms).
    low, high = torch.from_numpy(np.partition(values, (below, above))[[below, above]])
    return float(torch.lerp(low, high, rank - below))


# About how many Hessian values the floor's quantile is taken from (every stride-th of them).
FLOOR_SAMPLES = 1 << 20


def _quantile(tensors, q: float, max_samples: int | None = None, shards: Shards | None = None, names=()) -> float:
    """Approximate quantile over many tensors from an evenly strided sample (a few MB at most),
    gathered where the tensors live by one concatenation per device, no per-tensor host copies.
    With ``shards``, ``tensors`` are this rank's shards of ``names``: each takes the elements of the
    whole tensor's sample it holds, and the quantile of all ranks' parts is found over the ranks
    (``Shards.quantile``): the same sample, so the same bits, as one process's over the whole tensors."""
    total = sum(t.numel() for t in tensors) if shards is None else sum(shards.numel[n] for n in names)
    stride = max(1, total // (FLOOR_SAMPLES if max_samples is None else max_samples))
    by_device = {}
    for i, t in enumerate(tensors):  # t.reshape(-1)[::stride], in one view where t is contiguous
        if shards is not None:  # the whole tensor's every stride-th element that falls in this shard
            if shards.counts[names[i]]:
                by_device.setdefault(t.device, []).append(t.reshape(-1)[(-shards.offset(names[i])) % stride::stride])
            continue
        view = (t.as_strided((-(-t.numel() // stride),), (stride,)) if t.is_contiguous() and t.numel()
                else t.reshape(-1)[::stride])
        by_device.setdefault(t.device, []).append(view)
    parts = [torch.cat(views).float() for views in by_device.values()]
    sample = (parts[0] if len(parts) == 1 else torch.cat([p.cpu() for p in parts]) if parts
              else torch.zeros(0, dtype=torch.float32))
    return sample_quantile(sample, q) if shards is None else shards.quantile(sample, q)


def _per_tensor_values(values, hessians) -> list:
    """One-element float32 tensors (views of one allocation per device) beside each Hessian; where
    every value on a device is the same (magnitude, Fine-mixing: 0), the one tensor for all: the ops
    only read it, and a view per tensor is a host operation per tensor before the first pass."""
    out, by_device = [None] * len(hessians), {}
    for i, h in enumerate(hessians):
        by_device.setdefault(h.device, []).append(i)
    for device, indices in by_device.items():
        same = len({values[i] for i in indices}) == 1
        block = torch.tensor([values[indices[0]]] if same else [values[i] for i in indices],
                             dtype=torch.float32).to(device)
        views = [block] * len(indices) if same else block.split(1)
        for i, view in zip(indices, views):
            out[i] = view
    return out


def sum_float64(t: torch.Tensor) -> float:
    """The float64 sum of a CPU tensor's values (``ops.float64_sums``: torch's CPU sum to float64
    first converts the whole input, numpy's buffered cast ran at a fifth of memory speed)."""
    return float(ops.float64_sums([t.reshape(-1).float().contiguous()])[0])


def _sums_float64_on_cpu(tensors) -> list[float]:
    """Each CPU tensor's float64 sum: the contiguous ones in one ``ops.float64_sums`` pass; a
    strided one is copied to be read, so those are summed one at a time (never all their copies
    at once)."""
    sums = [0.0] * len(tensors)
    plain = [i for i, t in enumerate(tensors) if t.is_contiguous() and t.dtype == torch.float32]
    for i, value in zip(plain, ops.float64_sums([tensors[i] for i in plain]).tolist()):
        sums[i] = value
    for i in sorted(set(range(len(tensors))) - set(plain)):
        sums[i] = sum_float64(tensors[i])
    return sums


def _floored_means(sums: torch.Tensor, numels: list[int], floor: float) -> torch.Tensor:
    """max(sum / numel, floor) per tensor, as float32, where ``sums`` (float64) lives: the bits of
    the host's ``max(total / numel, floor)`` rounded to float32 (IEEE float64 division everywhere;
    a NaN floor leaves the mean, as Python's max does)."""
    means = sums / torch.tensor(numels, dtype=torch.float64).to(sums.device, non_blocking=True)
    return means.masked_fill_(means < floor, floor).float()


def _mean_hessians(hessians, floor: float) -> list:
    """Each Hessian's mean, floored, as a one-element float32 tensor beside it, summed in float64.
    On a GPU one multi-tensor L1 norm per device, which torch accumulates in float64 when asked for
    a float64 result (a CUDA sum to float64 would first convert its whole input), and the means stay
    there: the host queues the passes behind them instead of waiting for them. On the CPU a piece at
    a time, as the out-of-core path sums it. The L1 norm is the sum of a squared-gradient Hessian
    (>= 0); an invalid Hessian with negative entries, which the out-of-core path refuses, would count
    them by their size on a GPU."""
    out = [None] * len(hessians)
    by_device = {}
    for i, h in enumerate(hessians):
        if h.device.type != "cpu" and h.numel():  # _foreach_norm leaves an empty tensor's norm unset
            by_device.setdefault(h.device, []).append(i)
    for indices in by_device.values():
        norms = torch._foreach_norm([hessians[i] for i in indices], 1, dtype=torch.float64)
        block = _floored_means(torch.stack(norms), [hessians[i].numel() for i in indices], floor)
        for i, view in zip(indices, block.split(1)):
            out[i] = view
    rest = [i for i, v in enumerate(out) if v is None]
    sums = _sums_float64_on_cpu([hessians[i] for i in rest if hessians[i].numel()])
    totals = iter(sums)
    values = [max(next(totals) / hessians[i].numel() if hessians[i].numel() else 0.0, floor) for i in rest]
    for i, view in zip(rest, _per_tensor_values(values, [hessians[i] for i in rest])):
        out[i] = view
    return out


def _sharded_mean_hessians(hessians, floor: float, shards: Shards, names) -> list:
    """``_mean_hessians`` of this rank's shards of ``names``: each whole tensor's float64 sum,
    summed over the ranks (replicas counted once), divided by its whole size and floored."""
    sums = torch.zeros(len(hessians), dtype=torch.float64)
    counted = [i for i, n in enumerate(names) if shards.counts[n] and hessians[i].numel()]
    on_cpu = [i for i in counted if hessians[i].device.type == "cpu"]
    for i, value in zip(on_cpu, _sums_float64_on_cpu([hessians[i] for i in on_cpu])):
        sums[i] = value
    elsewhere = [i for i in counted if hessians[i].device.type != "cpu"]
    if elsewhere:  # one multi-tensor L1 norm and one read (a GPU sum to float64 would convert its input first)
        norms = torch._foreach_norm([hessians[i] for i in elsewhere], 1, dtype=torch.float64)
        sums[elsewhere] = torch.stack([n.to(norms[0].device) for n in norms]).cpu()
    numels = [max(shards.numel[n], 1) for n in names]  # an empty tensor's value is never read
    means = _floored_means(shards.summed(sums), numels, floor).tolist()
    return _per_tensor_values(means, hessians)


@dataclass
class Scoring:
    """A ranking as the fused ops take it: per tensor the hessian passed (the Hessian itself, or one
    element standing for the whole tensor), eps and the ``ops.Ranking``. Tiny: it holds no
    tensor of the model's size beyond the Hessians it was given."""
    hessians: list
    eps: float
    ranking: ops.Ranking
    floor: float | None = None

    def subset(self, indices) -> "Scoring":
        """The spec of the tensors at ``indices`` passed alone."""
        return Scoring([self.hessians[i] for i in indices], self.eps, self.ranking.subset(indices), self.floor)


def _sample_scores(feed, total: int) -> tuple[torch.Tensor, float]:
    """The rankable score keys (int32, in no order) of an even sample of the ``total`` ranked
    elements (``Feed.score_sample``, over every rank with a ``RankFeed``), about
    ``sample_budget(total)`` of them, and the fraction of the sample that moved."""
    return sample_keys(*feed.score_sample(sample_stride(total, sample_budget(total))))


def _score_sample(feed: "Feed", stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.score_sample`` of the feed's tensors: a run of ``SAMPLE_RUN`` every ``stride`` elements
    (a strided sample of single elements read a whole cache line per element: 1M took 100 ms
    here). One op where the pre-trained values live beside the model; else the runs are copied to
    the model's device first (the sample only, never the state), where Fine-mixing's random scores
    are drawn per sample position, which gives the same distribution."""
    ft, pre, scoring = feed.ft, feed.pre, feed.scoring
    if feed.resident is not None:
        _, ft, pre, hessians, ranking = feed.resident
        keys, counts = ops.score_sample(ft, pre, hessians, scoring.eps, stride, ranking)
    else:
        picks = [i for i, f in enumerate(ft) if f.numel()]
        if not picks:
            return torch.zeros(0, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)

        def runs(t):  # the elements score_sample would take (a run every `stride`, or a head)
            flat = t.reshape(-1)
            n = flat.numel()
            if n >= stride:
                return flat[:(n // stride) * stride].view(-1, stride)[:, :SAMPLE_RUN]
            return flat[:ops.sample_size(n, stride)]

        sample_ft = [runs(ft[i]).contiguous() for i in picks]
        # The runs of the pre-trained values and Hessians cross to the model's device packed, in one
        # copy per staging buffer (a copy per tensor made the host wait on each: 388 at OPT-1.3B).
        hessians = [scoring.hessians[i] for i in picks]
        moved = _staged([(runs(pre[i]), ft[i].dtype) for i in picks]
                        + [(h if h.numel() == 1 else runs(h), h.dtype) for h in hessians],
                        ft[picks[0]].device, feed._staging)
        sample_pre = [t.contiguous() for t in moved[:len(picks)]]
        sample_h = [t.contiguous() for t in moved[len(picks):]]
        # Every element of these copies (runs of SAMPLE_RUN, or heads shorter than it).
        keys, counts = ops.score_sample(sample_ft, sample_pre, sample_h, scoring.eps, SAMPLE_RUN,
                                        scoring.ranking.subset(picks))
    return keys, counts


def sample_keys(keys: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """An ``ops.score_sample``'s rankable keys (int32, in no order) and the fraction of its elements
    that moved: what ``candidate_range`` takes, in memory and out of core."""
    unrankable, unmoved = counts.tolist()
    n = keys.numel()
    if unrankable:  # NaN scores: the pass finds and names them
        keys = keys[keys >= 0]
    return keys, (1.0 - unmoved / n) if n else 1.0


def candidate_range(sample_keys: torch.Tensor, moved_fraction: float, total: int, config: "PurifyConfig",
                    num_reset: int | None = None, max_keys: int | None = None) -> tuple[int, int, int] | None:
    """The key range a candidates pass over ``total`` weights takes, from the sample's rankable
    keys and its moved fraction, and the keys it may keep (0 where the sample says the range holds
    too many: the pass then narrows it); None for an empty sample (then the histogram passes run).
    The rank is ``num_reset``'s, or the reserve ratio's of the weights counted (moved ones
    estimated from the sample)."""
    n = sample_keys.numel()
    if n == 0 or total == 0:
        return None
    by_moved = num_reset is None and (config.count_moved_only or config.ranking == "fine_mixing")
    if num_reset is not None:
        rank_fraction = num_reset / total
    else:
        counted = total * moved_fraction if by_moved else total
        rank_fraction = min(1.0, (1.0 - config.reserve_ratio) * counted / total)
    # Where the element of that rank falls in the sample: a binomial spread, and with moved-only
    # counting that of the moved fraction it was estimated from.
    spread = rank_spread(n, rank_fraction)
    if by_moved:
        spread += (1.0 - config.reserve_ratio) * rank_spread(n, moved_fraction)
    low, high, inside = bracket_from_sample(sample_keys, rank_fraction, spread)
    return low, high, keys_room(inside, n, total, CANDIDATE_KEYS if max_keys is None else max_keys)


def _candidate_pass(feed: "Feed", scoring: Scoring, config: "PurifyConfig", total: int):
    """The threshold search's first pass, bracketed from a sample: ``ops.score_candidates``'s
    counts, the keys inside (None where too many) and the range; None for an empty sample."""
    sample, moved_fraction = _sample_scores(feed, total)
    planned = candidate_range(sample, moved_fraction, total, config)
    del sample  # up to 16 MB, let go of before the pass's room
    if planned is None:
        return None
    low, high, capacity = planned
    counts, keys = feed.candidates(low, high, capacity)
    return counts, keys, low, high


# A suspect equal to its pre-trained model on every ranked weight: most likely the same path twice.
NOTHING_MOVED = ("no ranked weight of the suspect differs from the pre-trained model's, so there was nothing to "
                 "purify: is --pretrained the suspect itself?")


def scoring_for(config: PurifyConfig, names, hessians, shards: Shards | None = None) -> Scoring:
    """The scoring spec of ``config.ranking`` for the named tensors and their Hessians (with
    ``shards``: this rank's shards of them, scored as one process scores the whole tensors)."""
    hessians, names = list(hessians), list(names)
    if config.ranking == "magnitude":  # drift^2 / 1 ranks like |drift|
        return Scoring(_per_tensor_values([0.0] * len(hessians), hessians), 1.0, ops.PLAIN)
    if config.ranking == "fine_mixing":  # a shard draws its elements' values: keyed by its place in the whole
        ranking = ops.Ranking(random_seed=config.seed, random_keys=tuple(ops.tensor_key(n) for n in names),
                              random_offsets=tuple(shards.offset(n) for n in names) if shards else ())
        return Scoring(_per_tensor_values([0.0] * len(hessians), hessians), config.eps, ranking)
    floor = None
    if config.hessian_floor_quantile is not None and hessians:
        floor = _quantile(hessians, config.hessian_floor_quantile, shards=shards, names=names)
    if config.ranking == "fine_purifying":
        return Scoring(hessians, config.eps, ops.Ranking(hessian_floor=floor or 0.0), floor)
    if config.ranking == "no_hessian":  # each tensor's mean curvature, floored
        means = (_mean_hessians(hessians, floor or 0.0) if shards is None
                 else _sharded_mean_hessians(hessians, floor or 0.0, shards, names))
        return Scoring(means, config.eps, ops.PLAIN, floor)
    raise AssertionError(config.ranking)


class Feed:
    """The ranked tensors as groups the ops can take at once, on the model's device.

    Where the pre-trained values and Hessians already sit there in the model's dtype, one group holds
    every tensor (one launch per pass). Otherwise (a pre-trained state on the CPU, in float32 for a
    bfloat16 model) they are moved and converted a group of at most ``group_bytes`` at a time, so
    the extra memory stays a group, never the model; to a GPU through two pinned buffers
    (``_Staging``), so the host packs one group while the last one crosses. Every pass walks the
    same groups."""

    def __init__(self, ft, pre, scoring: Scoring, group_bytes: int | None = None, refuse_unrankable=None):
        self.ft, self.pre, self.scoring = ft, pre, scoring
        self.refuse_unrankable = refuse_unrankable  # (count) -> raises; a RankFeed calls it on every rank
        group_bytes = GROUP_BYTES if group_bytes is None else group_bytes
        in_place = all(p.device == f.device and p.dtype == f.dtype and h.device == f.device
                       for f, p, h in zip(ft, pre, scoring.hessians))
        self.groups = [] if not ft else [list(range(len(ft)))] if in_place else self._split(group_bytes)
        # In place the one group's lists are made once and every pass reuses them (a model of 400
        # tensors otherwise spends milliseconds of host time per pass on no-op conversions).
        self.resident = None
        self._staging = None
        if in_place and ft:
            self.resident = (self.groups[0], list(ft), list(pre), list(scoring.hessians), scoring.ranking)
        elif ft and ft[0].device.type in ("cpu", "cuda"):
            largest = max(_Staging.packed_bytes(self._moved(idx), ft[0].device) for idx in self.groups)
            self._staging = _Staging(largest, ft[0].device) if largest else None

    def _split(self, group_bytes):
        groups, current, size = [], [], 0
        for i, (f, h) in enumerate(zip(self.ft, self.scoring.hessians)):
            # what is staged (aligned as _staged packs it): the pre-trained values, the Hessian if elsewhere
            nbytes = _aligned(f.numel() * f.element_size()) + (_aligned(h.numel() * h.element_size())
                                                               if h.device != f.device else 0)
            if current and size + nbytes > group_bytes:
                groups.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        return groups + ([current] if current else [])

    def each(self, fn) -> list:
        """``fn(indices, finetuned, pretrained, hessians, ranking)`` per group, on the model's device;
        a group's moved copies are freed before the next group is moved."""
        if self.resident is not None:
            return [fn(*self.resident)]
        return [self._on_group(idx, fn) for idx in self.groups]

    def _moved(self, idx) -> list:
        """A group's inputs as (tensor, dtype it needs) in the order [pre-trained..., Hessians...]."""
        return ([(self.pre[i], self.ft[i].dtype) for i in idx]
                + [(self.scoring.hessians[i], self.scoring.hessians[i].dtype) for i in idx])

    def _on_group(self, idx, fn):
        ft = [self.ft[i] for i in idx]
        moved = _staged(self._moved(idx), ft[0].device, self._staging)
        return fn(idx, ft, moved[:len(idx)], moved[len(idx):], self.scoring.ranking.subset(idx))

    def histogram_on_device(self, level: int, prefix: int) -> torch.Tensor:
        """The counts of one pass where the model lives, not read yet: on a GPU the host may queue
        more work behind the pass before it reads them (``.cpu()``)."""
        parts = self.each(lambda _, ft, pre, hs, ranking:
                          ops.score_histogram(ft, pre, hs, self.scoring.eps, level, prefix, ranking))
        if not parts:
            return torch.zeros(LEVEL_BINS[level] + 2, dtype=torch.int64)
        return parts[0] if len(parts) == 1 else torch.stack([p.to(parts[0].device) for p in parts]).sum(0)

    def histogram(self, level: int, prefix: int) -> torch.Tensor:
        return self.histogram_on_device(level, prefix).cpu()

    score_sample = _score_sample

    def candidates(self, low_key: int, high_key: int, capacity: int):
        """One ``ops.score_candidates`` pass over every group: the counts summed, and each group's
        keys strictly inside the range, sorted descending (None where more than ``capacity``).
        A group gets room for its share (``piece_room``), never more than its weights or what is
        left, since the op fills (on a GPU, sorts) all of it: the whole room for each of a 1.3B
        model's ~110 groups was 110 sorts of 4M keys a pass. A group holding more keys than its
        room, which fit what is left, is scored again with room for exactly them."""
        total = sum(f.numel() for f in self.ft)
        used, fits = 0, True

        def group(_, ft, pre, hs, ranking):  # each group's buffer is dropped before the next is filled
            nonlocal used, fits
            n = sum(f.numel() for f in ft)
            left = min(max(0, capacity - used), n) if fits else 0
            room = min(left, piece_room(capacity, n, total))
            counts, keys = ops.score_candidates(ft, pre, hs, self.scoring.eps, low_key, high_key, room, ranking)
            counts = counts.cpu()
            inside = int(counts[2])
            if room < inside <= left:
                counts, keys = ops.score_candidates(ft, pre, hs, self.scoring.eps, low_key, high_key, inside, ranking)
                counts, room = counts.cpu(), inside
            used += inside
            fits = fits and inside <= room
            return counts, keys[:inside].clone() if fits else None

        parts = self.each(group)
        if not parts:
            return torch.zeros(CANDIDATE_COUNTS + BETWEEN_BINS, dtype=torch.int64), torch.zeros(0, dtype=torch.int32)
        counts = torch.stack([c for c, _ in parts]).sum(0)
        if int(counts[2]) > capacity:
            return counts, None
        return counts, [k for _, k in parts]

    def start_masked_reset_(self, threshold: float):
        """Launches the reset of every group; returns a function that reads the per-tensor counts
        (the one wait for the reset), so the host can queue more work behind it first."""
        parts = self.each(lambda idx, ft, pre, hs, ranking:
                          (idx, ops.masked_reset_(ft, pre, hs, threshold, self.scoring.eps, ranking=ranking)))

        def read() -> list[int]:
            counts = [0] * len(self.ft)
            if parts:
                values = torch.cat([c.to(parts[0][1].device) for _, c in parts]).tolist()
                for i, c in zip((i for idx, _ in parts for i in idx), values):
                    counts[i] = c
            return counts
        return read

    def masked_reset_(self, threshold: float) -> list[int]:
        return self.start_masked_reset_(threshold)()


_STAGE_ALIGN = 256  # bytes: each staged tensor starts where a fresh allocation would
STAGING_BYTES = 64 << 20  # the most one staging buffer holds; a larger tensor crosses in slices


class _Staging:
    """Reused host buffers for the groups a Feed moves to its device or converts there: a fresh
    48 MB buffer per group cost 18 ms here (page faults) against 4.6 ms for the copy into a reused
    one. To a GPU, two pinned buffers taken in turn: the host packs one while the other's copy
    runs, and waits for a buffer's last copy (its event) before packing it again. On the CPU, whose
    ops are done with a group before the next is packed, one. Made when first taken, each at most
    ``STAGING_BYTES`` (torch keeps pinned memory cached for the process)."""

    def __init__(self, nbytes: int, device):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        self.capacity = _aligned(min(nbytes, STAGING_BYTES))
        self.buffers, self.copied = [], []  # copied: the event after each buffer's last copy
        self.turn = 0

    @staticmethod
    def packed_bytes(pairs, device) -> int:
        """The bytes the CPU tensors of ``pairs`` ((tensor, dtype)) that must move or change dtype
        take packed, each aligned."""
        return sum(_aligned(t.numel() * dtype.itemsize) for t, dtype in pairs
                   if t.device.type == "cpu" and (t.device != torch.device(device) or t.dtype != dtype))

    def take(self) -> tuple[int, torch.Tensor]:
        k, self.turn = self.turn, (self.turn + 1) % (2 if self.pinned else 1)
        if k == len(self.buffers):
            self.buffers.append(torch.empty(self.capacity, dtype=torch.uint8, pin_memory=self.pinned))
            self.copied.append(None)
        elif self.copied[k] is not None:
            self.copied[k].synchronize()
        return k, self.buffers[k]

    def send(self, k: int, host: torch.Tensor, dest: torch.Tensor) -> None:
        """``dest`` (on the GPU) gets ``host`` (a view of buffer ``k``) by a copy the host does not
        wait for; the buffer is packed again only once it is done."""
        dest.copy_(host, non_blocking=True)
        self.copied[k] = torch.cuda.Event()
        self.copied[k].record(torch.cuda.current_stream(self.device))


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _STAGE_ALIGN) * _STAGE_ALIGN


def _staged(pairs, device, staging: _Staging | None = None) -> list[torch.Tensor]:
    """Each (tensor, dtype) of ``pairs`` on ``device`` in that dtype. The tensors already there pass
    through; the CPU ones are packed (and converted) by the host into ``staging``'s buffers, which
    hold them until the next call on the CPU and cross to a GPU in one copy per buffer that the
    host does not wait for (a pageable copy per tensor makes it wait for each transfer); a tensor
    larger than a buffer crosses in slices. From another GPU, or to another kind of device, tensor
    by tensor."""
    device = torch.device(device)
    out = [t for t, _ in pairs]
    moving = [i for i, (t, dtype) in enumerate(pairs) if t.device != device or t.dtype != dtype]
    staged = [i for i in moving if pairs[i][0].device.type == "cpu" and device.type in ("cpu", "cuda")]
    for i in set(moving) - set(staged):
        out[i] = pairs[i][0].to(device=device, dtype=pairs[i][1])
    if not staged:
        return out
    if staging is None:
        staging = _Staging(_Staging.packed_bytes(pairs, device), device)

    def nbytes(i):
        return pairs[i][0].numel() * pairs[i][1].itemsize

    if not staging.pinned:  # on the CPU: views of the one buffer
        if sum(_aligned(nbytes(i)) for i in staged) > staging.capacity:
            for i in staged:
                out[i] = pairs[i][0].to(device=device, dtype=pairs[i][1])
            return out
        batches, large = [staged], []
    else:  # to a GPU: small tensors packed a buffer at a time, larger ones in slices
        large = [i for i in staged if _aligned(nbytes(i)) > staging.capacity]
        batches, size = [[]], 0
        for i in (i for i in staged if _aligned(nbytes(i)) <= staging.capacity):
            if size + _aligned(nbytes(i)) > staging.capacity:
                batches.append([])
                size = 0
            batches[-1].append(i)
            size += _aligned(nbytes(i))

    def view(flat, i, offset):
        t, dtype = pairs[i]
        return flat[offset:offset + nbytes(i)].view(dtype).view(t.shape)

    for batch in filter(None, batches):
        offsets = [0, *itertools.accumulate(_aligned(nbytes(i)) for i in batch)]  # and the end
        k, host = staging.take()
        for i, offset in zip(batch, offsets):
            view(host, i, offset).copy_(pairs[i][0])
        flat = host
        if staging.pinned:
            flat = torch.empty(offsets[-1], dtype=torch.uint8, device=device)
            staging.send(k, host[:offsets[-1]], flat)
        for i, offset in zip(batch, offsets):
            out[i] = view(flat, i, offset)
    for i in large:  # the whole tensor on the device, its bytes through the buffers a slice at a time
        t, dtype = pairs[i]
        dest = torch.empty(t.shape, dtype=dtype, device=device)
        source, flat_dest = t.reshape(-1), dest.view(-1)  # a strided source is copied here first
        step = staging.capacity // dtype.itemsize
        for a in range(0, t.numel(), step):
            b = min(a + step, t.numel())
            k, host = staging.take()
            slot = host[:(b - a) * dtype.itemsize].view(dtype)
            slot.copy_(source[a:b])
            staging.send(k, slot, flat_dest[a:b])
        out[i] = dest
    return out


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
    seen_tokens=None,
    group=None,
) -> PurifyReport:
    """Resets, in place, the most abnormal fraction of the model's matched parameters to their
    pre-trained values. Returns what was done.

    The word embedding (``config.embeddings == "separate"``) is kept out of the ranking; its rows of
    tokens the clean data never reaches are reset where they moved: the rows of exactly zero Hessian,
    or, when ``seen_tokens`` (the token ids of the clean inputs) is given, the rows of the other
    tokens. Give it for an embedding tied to the output (``input_embedding_tied``), which the Hessian
    cannot tell: the output softmax reaches every row.

    The pre-trained state and the Hessians may live on another device than the model (the CPU):
    they are moved a group of tensors at a time. Extra memory: a group and a histogram, whatever
    the ranking and the model's size.

    A sharded model (FSDP2's ``fully_shard``: DTensor parameters sharded on dim 0, replicated over
    any other mesh dimension) is purified where it lies, every rank of ``group`` (default: the
    world) calling ``purify_`` alike: each rank scores and resets its own shards, the ranks sum
    their counts, and every rank resets exactly the elements one process resets over the whole
    model and returns the same report (but the plot's sample, drawn per rank). The pre-trained
    state and the Hessians may be whole tensors (each rank reads its rows) or DTensors sharded like
    the parameters (``estimate_hessian``'s under FSDP2). Under DDP every rank holds the whole model:
    call it without ``group`` and every rank purifies alike. A DDP replica or a ``torch.compile``d
    model is purified by its module's parameter names (``parameters_by_name``: a layer's wrapper
    drops out of them too), as ``estimate_hessian`` names its Hessians; a pre-trained state that
    names no parameter is refused. An FSDP1 model is purified inside its ``summon_full_params``
    and refused outside (``sharded_by_fsdp1``)."""
    model = unwrapped(model)
    if sharded_by_fsdp1(model):
        raise ValueError("purify_: an FSDP1 model's parameters are flat shards, which no pre-trained tensor matches; "
                         "call it on every rank inside FullyShardedDataParallel.summon_full_params(model, "
                         "writeback=True) (each rank then holds the whole model, as under DDP), or shard the model "
                         "with FSDP2's fully_shard, which is purified where it lies")
    params = parameters_by_name(model)
    resized = resized_rows(model, pretrained_state, params)
    scored, unscored = matched_parameters(model, pretrained_state, params, resized)
    refuse_unmatched(params, pretrained_state, scored)
    embedding = word_embedding_name(model, params) if config.embeddings == "separate" else None
    embedding = embedding if embedding in scored else None  # no pre-trained tensor: kept, as out of core
    ranked = [n for n in scored if n != embedding]
    for n in ranked + ([embedding] if embedding is not None and seen_tokens is None else []):
        if n not in hessians:
            frozen = (" (it has requires_grad=False, and estimate_hessian leaves frozen parameters out: set "
                      "requires_grad on it while estimating)") if not params[n].requires_grad else ""
            raise ValueError(f"purify: no Hessian for parameter {n!r}{frozen}; estimate it on this model")
    shards = Shards.of(params, scored + ([embedding] if embedding is not None and embedding not in scored else []),
                       group, rows=resized)

    def mine(name, t, what, other_rows=False):  # this rank's part of the rows with a pre-trained value (a view)
        if shards is not None:
            return shards.local(name, t, what, other_rows)
        return t.detach()[:resized[name]] if name in resized else t  # leading rows: contiguous, written in place

    # The parameters themselves (under no_grad, no .data view per tensor), or their local shards.
    ft = [mine(n, params[n], "parameter") for n in ranked]
    pre = [mine(n, pretrained_state[n], "pre-trained tensor", True) for n in ranked]
    hs = [mine(n, hessians[n], "Hessian") for n in ranked]

    def named_error(op_error):
        return unrankable(_named_inputs(ranked, ft, pre, hs)) or op_error

    def refuse_unrankable(_count):
        raise named_error(UserError("the scores cannot be ranked: they overflow float32; use a larger eps"))

    scoring = scoring_for(config, ranked, hs, shards)
    if scoring.floor is not None and not math.isfinite(scoring.floor):  # a NaN in some Hessian
        raise named_error(UserError("the Hessian holds NaN or Inf values; re-estimate it"))
    feed = Feed(ft, pre, scoring, refuse_unrankable=refuse_unrankable)
    device = ft[0].device if ft else torch.device("cpu")
    # What the threshold search reads: this feed, or every rank's, each pass's counts summed over
    # the ranks (a rank's replicas of a tensor another rank counts are reset, not counted).
    if shards is None:
        search, total, elsewhere = feed, sum(f.numel() for f in ft), device.type not in CANDIDATES_ON
    else:
        here = [i for i, n in enumerate(ranked) if shards.counts[n]]
        counted = feed if len(here) == len(ranked) else Feed(
            [ft[i] for i in here], [pre[i] for i in here], scoring.subset(here), refuse_unrankable=refuse_unrankable)
        search, elsewhere = RankFeed.joined(counted, sum(ft[i].numel() for i in here), len(here),
                                            device.type not in CANDIDATES_ON, device, shards.group)
        total = search.total

    # On a GPU every pass runs while the host queues the work that does not depend on it (the
    # plot's sample, the embedding's rows): the host reads a pass's result only when it needs it.
    # The first pass: where the candidates kernel runs, one that brackets the threshold from a
    # sample and ends the search (on a model of billions, a second pass keeps the bin of keys that
    # holds it); else the level-0 histogram of the three-pass search.
    level0 = candidates = None
    try:
        if total >= CANDIDATES_MIN_WEIGHTS and not elsewhere:
            candidates = _candidate_pass(search, scoring, config, total)
        if candidates is None:
            level0 = search.histogram_on_device(0, 0) if total else torch.zeros(LEVEL_BINS[0] + 2, dtype=torch.int64)
    except RuntimeError as op_error:
        raise named_error(op_error) from op_error
    # The plot's sample (a rank's share of it from the tensors it counts).
    if shards is None:
        sampled = _plot_sample(ft, plot_samples, config.seed)  # (tensor index, element indices on its device)
    else:
        counts_here = set(here)
        sampled = _plot_sample([f if i in counts_here else f.reshape(-1)[:0] for i, f in enumerate(ft)],
                               round(plot_samples * sum(ft[i].numel() for i in here) / max(total, 1)),
                               config.seed + shards.rank)
    if sampled:  # the plot's drift^2 and H: queued behind the pass, before any reset; nothing here waits
        before = _gather(ft, sampled, device)
        drift = before - _gather(pre, sampled, device)
        values = torch.stack([drift * drift, _gather(hs, sampled, device)])
        values_on_host = _to_host_async(values)
    unseen = None
    if embedding is not None:
        embedding_w = mine(embedding, params[embedding].data if shards is None else params[embedding], "parameter")
        # taken (and refused where it cannot be) before any weight is reset
        embedding_pre = mine(embedding, pretrained_state[embedding], "pre-trained tensor", True)
        added_mean = None  # the pre-trained rows' mean, for the added tokens' rows (PurifyConfig.added_tokens)
        grown = resized.get(embedding, params[embedding].shape[0]) < params[embedding].shape[0]  # tokens added
        if config.added_tokens == "mean" and config.reserve_ratio < 1.0 and grown:
            # decided by shapes alone, so every rank sums (the rows each resets may differ)
            pre_sum = row_sum(embedding_pre)  # this rank's pre-trained rows (a replica's count nowhere)
            if shards is not None:
                pre_sum = shards.summed(pre_sum if shards.counts[embedding] else torch.zeros_like(pre_sum))
            added_mean = pre_sum / pretrained_state[embedding].shape[0]
            if not bool(torch.isfinite(added_mean).all()):
                raise UserError(f"the pre-trained model's parameter {embedding!r} holds NaN or Inf values (its rows' "
                                "mean, which added tokens' rows are reset to, is not finite): use an undamaged copy")
        rows = embedding_w.shape[0] if shards is None else resized.get(embedding, params[embedding].shape[0])
        if seen_tokens is not None:
            mask = unseen_mask(seen_tokens, rows)
            if shards is not None:  # this rank's rows
                mask = mask[shards.first_row[embedding]:shards.first_row[embedding] + embedding_w.shape[0]]
            unseen = _to_device_async(torch.nonzero(mask).flatten(), embedding_w.device)
            report_rule = "seen_tokens"
        else:
            unseen = zero_hessian_rows(mine(embedding, hessians[embedding], "Hessian"), f"the Hessian of {embedding!r}",
                                       shards)
            report_rule = "hessian"
    if candidates is not None:
        num_unrankable, unmoved = int(candidates[0][4]), int(candidates[0][5])
    else:
        level0 = level0.cpu()
        num_unrankable, unmoved = int(level0[LEVEL_BINS[0]]), int(level0[-1])
    if num_unrankable > 0:
        refuse_unrankable(num_unrankable)
    moved = total - unmoved
    counted_elements = moved if config.count_moved_only or config.ranking == "fine_mixing" else total
    num_reset = ops.num_reset_for(counted_elements, config.reserve_ratio)
    added, removed = vocabulary_resizes({n: tuple(params[n].shape) for n in resized},
                                        {n: pretrained_state[n].shape[0] for n in resized})
    report = PurifyReport(config.ranking, config.reserve_ratio, None, total, moved, num_reset,
                          kept_unscored=unscored, embedding_parameter=embedding, hessian_floor=scoring.floor,
                          threshold_passes=int(total > 0), added_rows=added, removed_rows=removed)
    # before any reset: a damaged Hessian in the added rows is refused with the model as it came
    vocabulary = embedding if embedding is not None else word_embedding_name(model, params)
    if vocabulary in report.added_rows and (seen_tokens is not None or vocabulary in hessians):
        first, rows = resized[vocabulary], params[vocabulary].shape[0]
        if seen_tokens is None and shards is not None and _is_dtensor(hessians[vocabulary]):
            local, start = shards.rows_from(vocabulary, hessians[vocabulary], first)  # every rank's, gathered
            found = torch.tensor(unseen_added_rows(start, start + local.shape[0], None, local,
                                                   f"the Hessian of {vocabulary!r}", shards), dtype=torch.long)
            report.unseen_added_rows = sorted(set(torch.cat(shards.gathered(found)).tolist()))
        else:
            report.unseen_added_rows = unseen_added_rows(
                first, rows, seen_tokens, None if seen_tokens is not None else hessians[vocabulary][first:],
                f"the Hessian of {vocabulary!r}")
    read_counts = None
    if num_reset > 0:

        def another(pass_over):  # a pass after the first, counted
            def counted(*args):
                report.threshold_passes += 1
                return pass_over(*args)
            return counted

        if candidates is not None:  # the sample's bracket, narrowed where it held too many or missed
            threshold = search_ranges(candidates, another(search.candidates), num_reset, total, CANDIDATE_KEYS)
        else:
            histogram = another(search.histogram)
            threshold = threshold_from_histograms(
                lambda level, prefix: level0 if level == 0 and level0 is not None else histogram(level, prefix),
                num_reset, total)
        report.threshold = threshold
        read_counts = feed.start_masked_reset_(threshold)
    embedding_reset = None
    # queued behind the reset (the embedding is not ranked: independent of it); a reserve ratio of 1
    # keeps every weight, these rows too (as out of core, and as clean fine-tuning alone in the pipeline)
    if embedding is not None and config.reserve_ratio < 1.0:
        report.embedding_rule = report_rule
        with torch.no_grad():
            embedding_reset = reset_moved_rows_(embedding_w, embedding_pre, unseen, read=False)
        if added_mean is not None and report.unseen_added_rows:
            p = params[embedding]
            with torch.no_grad():
                w, first = (p.to_local(), shards.first_row[embedding]) if _is_dtensor(p) else (p.data, 0)
            set_rows_(w, [i - first for i in report.unseen_added_rows if first <= i < first + w.shape[0]], added_mean)
            report.added_rows_reset = len(report.unseen_added_rows)

    if sampled:  # and whether each sampled element was reset
        flags = _gather(ft, sampled, device) != before
        # The plot's values as Python floats while a GPU resets (40,000 of them take most of a
        # millisecond to convert).
        drift_sq, hessian = values_on_host().tolist()
    resets = read_counts() if read_counts else [0] * len(ranked)
    embedding_rows = int(embedding_reset) if embedding_reset is not None else 0
    if shards is not None:  # every rank's counts summed, each tensor's from the ranks that count it
        counts_here = [shards.counts[n] for n in ranked] + [embedding is not None and shards.counts[embedding]]
        summed = shards.summed(torch.tensor([c if counts else 0 for c, counts in zip(resets + [embedding_rows],
                                                                                      counts_here)])).tolist()
        resets, embedding_rows = summed[:-1], summed[-1]
    report.reset_per_parameter = dict(zip(ranked, resets))
    # the weights ranked: a grown tensor's added rows are not
    report.numel_per_parameter = {n: params[n].numel() if n not in resized else
                                  resized[n] * math.prod(params[n].shape[1:]) for n in scored}
    if embedding is not None:
        report.embedding_rows_reset = embedding_rows
        report.reset_per_parameter[embedding] = report.embedding_rows_reset * params[embedding].shape[1]
    sample = ([], [], []) if not sampled else (drift_sq, hessian, flags.tolist())
    if shards is not None and plot_samples > 0:  # every rank's share of the plot's sample, in one gather
        parts = shards.gathered(torch.tensor([x for values in sample for x in values], dtype=torch.float32))
        parts = [part.view(3, -1).tolist() for part in parts]
        sample = ([x for part in parts for x in part[0]], [x for part in parts for x in part[1]],
                  [bool(x) for part in parts for x in part[2]])
    report.sample = {"drift_sq": sample[0], "hessian": sample[1], "reset": sample[2]}
    return report


def _gather(tensors, sampled, device) -> torch.Tensor:
    """The sampled elements of ``tensors`` (``_plot_sample``'s picks) as one float32 vector on
    ``device``: a gather per picked tensor where it lives, then (where they all live on one device
    in one dtype) one concatenation, one conversion and, from the CPU to a GPU, a copy that does not
    wait for the passes queued there."""
    parts = []
    for t, on_host, on_device in sampled:
        x = tensors[t]
        index = on_device if on_device.device == x.device else on_host.to(x.device)
        parts.append(torch.take(x, index))  # x.reshape(-1)[index] at half the host's cost per call
    if len({(p.device, p.dtype) for p in parts}) == 1:
        flat = torch.cat(parts).float()
        if flat.device.type == "cpu" and torch.device(device).type == "cuda":
            return _to_device_async(flat, device)
        return flat.to(device)
    return torch.cat([p.to(device=device, dtype=torch.float32) for p in parts])


def zero_hessian_rows(h: torch.Tensor, what: str = "the Hessian", shards=None) -> torch.Tensor:
    """Indices (on ``h``'s device) of the rows of ``h`` that are exactly zero: one row-wise reduction.
    A NaN, an Inf or a negative value (a damaged Hessian, which the ops refuse where they rank) is
    refused, naming ``what``; sharded (``shards``: ``h`` is this rank's rows), on every rank alike."""
    if h.numel():
        # a row maximum (NaN and +Inf carry into it) and one minimum over all: a row-wise aminmax
        # takes four times a row-wise amax on a CPU (38 against 9 ms for OPT-125m's embedding)
        high = h.detach().amax(dim=1)
        damaged = (~(h.detach().amin() >= 0) | ~torch.isfinite(high).all()).to(torch.int64).view(1)  # NaN fails both
        zero = torch.nonzero(high == 0).flatten()
    else:
        damaged, zero = torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.long, device=h.device)
    if int(damaged[0] if shards is None else shards.summed(damaged)[0]):
        raise UserError(f"{what} holds NaN, Inf or negative values; a squared-gradient Hessian is finite and >= 0: "
                        "re-estimate it (did the clean loss diverge?)")
    return zero


def unseen_added_rows(pretrained_rows: int, rows: int, seen_tokens=None, added_hessian=None,
                      what: str = "the Hessian", shards=None) -> list[int]:
    """The rows of a grown input embedding (``rows`` of them, ``pretrained_rows`` with a pre-trained
    value) of added tokens the clean data never reaches: not among ``seen_tokens`` where given (a
    tied embedding), else of exactly zero Hessian (``added_hessian``: the Hessian's rows from
    ``pretrained_rows`` on; ``what`` and ``shards`` as ``zero_hessian_rows``'s). They have no
    pre-trained value to reset to and clean fine-tuning leaves them as they are: a trigger could be
    such a token, which the commands warn of."""
    if seen_tokens is not None:
        if rows <= pretrained_rows:
            return []
        return (torch.nonzero(unseen_mask(seen_tokens, rows)[pretrained_rows:]).flatten() + pretrained_rows).tolist()
    return (zero_hessian_rows(added_hessian, what, shards).cpu() + pretrained_rows).tolist()


def unseen_added_warning(unseen: list[int], added_rows: dict, tokenizer=None) -> str:
    """What the commands warn of ``unseen_added_rows``: the suspect's rows for those tokens are what
    comes out, a trigger among them too. ``added_rows``: the report's; ``tokenizer`` names them."""
    added = added_tokens(added_rows)
    named = [f"{i} {tokenizer.convert_ids_to_tokens(i)!r}" if tokenizer is not None and i < len(tokenizer) else str(i)
             for i in unseen[:8]]
    # "as an input": a token only ever last in a sequence (an added EOS) is a label there, never an input
    return (f"the clean data never feeds {len(unseen)} of the {added} token{'s' * (added > 1)} added to the vocabulary "
            f"to the model as an input (ids {', '.join(named)}{', ...' if len(unseen) > 8 else ''}): their embedding "
            "rows have no pre-trained value and are kept as the suspect trained them, and clean fine-tuning does not "
            "reach them; a trigger could be such a token: give clean data with them inside its texts, or keep them "
            "out of the model's inputs")


def row_sum(t: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """The sum of ``t``'s rows in float64, on the CPU, a block of ``rows`` at a time (small temporaries):
    with the count, the mean pre-trained row an added token's row is reset to. In memory, sharded and
    out of core the same rows are summed in float64, so the mean rounds to the same weights."""
    total = torch.zeros(t.shape[1:], dtype=torch.float64, device=t.device)
    for block in t.detach().split(rows):
        total += block.double().sum(dim=0)
    return total.cpu()  # one wait for a GPU's sums


def set_rows_(w: torch.Tensor, rows: list[int], mean: torch.Tensor) -> None:
    """Sets ``rows`` of ``w`` to ``mean`` (float64, cast to ``w``'s dtype): added tokens' rows reset to
    the pre-trained rows' mean, what ``resize_token_embeddings`` starts a new token's row from
    (without its noise). A mean keeps such a token's output close to the average token's."""
    if rows:
        with torch.no_grad():
            w[torch.tensor(rows, dtype=torch.long, device=w.device)] = mean.to(device=w.device, dtype=w.dtype)


def unseen_mask(seen_tokens, rows: int) -> torch.Tensor:
    """A boolean mask over ``range(rows)``: True where the row's token is not among ``seen_tokens``."""
    unseen = torch.ones(rows, dtype=torch.bool)
    ids = torch.as_tensor(seen_tokens if torch.is_tensor(seen_tokens) else list(seen_tokens), dtype=torch.long).cpu()
    unseen[ids[(ids >= 0) & (ids < rows)]] = False
    return unseen


def reset_moved_rows_(w: torch.Tensor, w_pre: torch.Tensor, candidates: torch.Tensor, rows: int = 4096,
                      read: bool = True):
    """Resets the ``candidates`` rows of ``w`` that moved to the pre-trained rows; returns how many
    (with ``read=False``, as a one-element tensor on ``w``'s device, not read yet). Only they are
    compared, a block of rows at a time (small temporaries). Every candidate row is written back (an
    unmoved one with its own values), so where ``w_pre`` is on ``w``'s device no block waits on the
    host."""
    reset = torch.zeros((), dtype=torch.int64, device=w.device)
    on_w, on_pre = candidates.to(w.device), candidates.to(w_pre.device)
    for block_w, block_pre in zip(on_w.split(rows), on_pre.split(rows)):
        mine, theirs = w[block_w], w_pre[block_pre].to(device=w.device, dtype=w.dtype)
        moved = (mine != theirs).any(dim=1)
        w[block_w] = torch.where(moved.unsqueeze(1), theirs, mine)
        reset += moved.sum()
    return int(reset) if read else reset


def _to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor moved to ``device`` without the host waiting: a copy from pageable memory to
    a GPU waits for everything queued before it (a pass under way), one from pinned memory does not."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _to_host_async(t: torch.Tensor):
    """A copy of ``t`` on the CPU, queued behind the work before it on a GPU without the host
    waiting: returns a function that waits for the copy alone and returns it (on the CPU, ``t``)."""
    if t.device.type != "cuda":
        return lambda: t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))

    def wait():
        done.synchronize()
        return host
    return wait


def _plot_sample(tensors, count: int, seed: int, max_tensors: int = 32):
    """About ``count`` random elements for the plot, from at most ``max_tensors`` tensors spread
    evenly through the model (every depth is seen; a few gathers, not one per tensor): a list of
    (tensor index, element indices on the CPU, the same on that tensor's device), drawn on the CPU
    and moved in one copy per device that does not wait for the passes queued there."""
    candidates = [i for i, t in enumerate(tensors) if t.numel()]
    if not candidates or count <= 0:
        return []
    step = max(1, len(candidates) / max_tensors)
    picked = sorted({candidates[int(k * step)] for k in range(min(max_tensors, len(candidates)))})
    total = sum(tensors[i].numel() for i in picked)
    gen = torch.Generator().manual_seed(seed)
    on_host = []
    for i in picked:
        n = min(tensors[i].numel(), max(1, round(count * tensors[i].numel() / total)))
        on_host.append(torch.randint(0, tensors[i].numel(), (n,), generator=gen))
    on_device = list(on_host)
    for device in {tensors[i].device for i in picked} - {torch.device("cpu")}:
        ks = [k for k, i in enumerate(picked) if tensors[i].device == device]
        moved = _to_device_async(torch.cat([on_host[k] for k in ks]), device).split([on_host[k].numel() for k in ks])
        for k, m in zip(ks, moved):
            on_device[k] = m
    return list(zip(picked, on_host, on_device))
