"""torch.distributed: two processes on the gloo backend (CPU) agree with one process exactly.

The threshold over sharded plain tensors, over DTensors (sharded and replicated: no double counting)
and over replicated plain tensors; the reset of the local parts; and the Hessian under DDP and FSDP2.
"""
import math
import os
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from finepurify_ext import ops
from finepurify_ext.threshold import distributed_masked_reset_, distributed_score_threshold

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no torch.distributed gloo backend")
WORLD = 2
SHAPES = [(37, 11), (64,), (10, 3), (129, 5), (1,), (0, 4), (50, 50)]


def full_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    ft = [torch.randn(s, generator=g) for s in SHAPES]
    pre = [(t + 0.1 * torch.randn(t.shape, generator=g)) for t in ft]
    hs = [torch.rand(s, generator=g) ** 2 for s in SHAPES]
    hs[1][:7] = 0
    ft[3][:2] = pre[3][:2]  # ties at zero drift
    return ft, pre, hs


def run(tmp_path, fn, *args, world=WORLD):
    mp.start_processes(_entry, args=(str(tmp_path / "rendezvous"), world, fn, args), nprocs=world,
                       start_method="spawn")


def _entry(rank, rendezvous, world, fn, args):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    fn(rank, *args)  # an assertion error here reaches the parent through torch.multiprocessing
    dist.barrier()
    sys.stdout.flush()
    # Leave at once: tearing down gloo's threads can abort the interpreter's exit ("terminate called
    # without an active exception") after the test has passed.
    os._exit(0)


# ----------------------------------------------------------------------------------- threshold


FINE_MIXING = ops.Ranking(random_seed=5, random_keys=tuple(range(100, 100 + len(SHAPES))))


def _plain_sharded(rank, k, eps, search, random):
    ft, pre, hs = full_state()
    ranking = FINE_MIXING if random else ops.PLAIN
    expected = ops.score_threshold(ft, pre, hs, k, eps, ranking=ranking)
    ref = [t.clone() for t in ft]
    ops.masked_reset_(ref, pre, hs, expected, eps, ranking=ranking)
    # Rank r holds every other tensor and one half of the rows of the largest: elements differ per rank.
    mine = [i for i in range(len(ft)) if i % WORLD == rank and i != 6]
    rows = slice(0, 25) if rank == 0 else slice(25, 50)
    local = [[t[i].clone() for i in mine] + [t[6][rows].clone()] for t in (ft, pre, hs)]
    # Fine-mixing's random scores follow each element: its tensor's key and its place in the whole tensor.
    local_ranking = ops.Ranking(random_seed=5, random_keys=tuple(FINE_MIXING.random_keys[i] for i in mine + [6]),
                                random_offsets=(0,) * len(mine) + (rows.start * 50,)) if random else None
    got = distributed_score_threshold(*local, k, eps, ranking=local_ranking, search=search)
    assert got == expected, (got, expected)
    distributed_masked_reset_(*local, got, eps, ranking=local_ranking)
    for j, i in enumerate(mine):
        assert torch.equal(local[0][j], ref[i]), i
    assert torch.equal(local[0][-1], ref[6][rows])


@pytest.mark.parametrize("random", [False, True], ids=["fine_purifying", "fine_mixing"])
@pytest.mark.parametrize("search", ["histograms", "sample"])
@pytest.mark.parametrize("k", [1, 100, 2000, 3647])
def test_sharded_plain_tensors_match_one_process(tmp_path, k, search, random):
    """Either search, over two ranks' shards, gives one process's threshold and reset."""
    assert sum(torch.Size(s).numel() for s in SHAPES) == 3647
    run(tmp_path, _plain_sharded, k, 1e-6, search, random)


def _misled(rank, case):
    import finepurify_ext.threshold as threshold_module

    g = torch.Generator().manual_seed(11 + rank)  # each rank its own elements
    n = (1 << 20) // WORLD + 333 * rank  # "auto" searches from a sample from 1M weights over all ranks
    ft, pre, hs = [torch.randn(n, generator=g)], [torch.randn(n, generator=g)], [torch.rand(n, generator=g)]
    everything = [[torch.cat(gathered(t[0]))] for t in (ft, pre, hs)]
    passes = []
    candidates = threshold_module.RankFeed.candidates

    def counted(self, *args):
        passes.append(args)
        return candidates(self, *args)

    threshold_module.RankFeed.candidates = counted
    if case == "missed":  # a bracket that holds no score but denormals: the passes narrow over the ranks
        threshold_module.bracket_from_sample = lambda *_: (1, 2, 0.0)
    elif case == "too_many":  # room for 8 keys: a pass counts bins, the next keeps the bin that holds it
        threshold_module.CANDIDATE_KEYS = 8
    total = everything[0][0].numel()
    for k in (1, total // 3, total - 1):
        passes.clear()
        expected = ops.score_threshold(*everything, k, 1e-6, search="histograms")
        assert distributed_score_threshold(ft, pre, hs, k, 1e-6) == expected, (case, k)
        assert (len(passes) == 1) == (case == "held"), (case, k, passes)


def gathered(t):
    parts = [torch.empty(0)] * dist.get_world_size()
    dist.all_gather_object(parts, t)
    return parts


def _one_rank_holds_most(rank, search):
    import finepurify_ext.threshold as threshold_module

    g = torch.Generator().manual_seed(5 + rank)
    n = 300_000 if rank == 1 else 40 * rank  # rank 0 holds nothing; rank 1 nearly all; rank 2 forty
    ft, pre, hs = [torch.randn(n, generator=g)], [torch.randn(n, generator=g)], [torch.rand(n, generator=g)]
    everything = [[torch.cat(gathered(t[0]))] for t in (ft, pre, hs)]
    broadcasts = []
    broadcast = dist.broadcast

    def counted(tensor, *args, **kwargs):
        broadcasts.append((kwargs.get("src"), tensor.numel()))
        return broadcast(tensor, *args, **kwargs)

    dist.broadcast = counted
    total = everything[0][0].numel()
    for k in (1, total // 4, total - 1):
        expected = ops.score_threshold(*everything, k, 1e-6, search="histograms")
        assert distributed_score_threshold(ft, pre, hs, k, 1e-6, search=search) == expected, k
    # From a sample: the sample and the keys kept come by a broadcast from each rank, at its own
    # length (rank 0's: the one padding slot of its empty tensor), not padded to rank 1's.
    assert (search == "sample") == bool(broadcasts), broadcasts
    assert all(size <= 1 for src, size in broadcasts if src == 0)
    assert search == "histograms" or max(size for _, size in broadcasts) > 1000


@pytest.mark.parametrize("search", ["histograms", "sample"])
def test_one_rank_holding_most_elements(tmp_path, search):
    """Three ranks, one holding nearly every element and one none: the same threshold as one
    process; the gathers of the sample and the kept keys broadcast from the ranks that hold them."""
    run(tmp_path, _one_rank_holds_most, search, world=3)


def _in_a_subgroup(rank, search):
    sub = dist.new_group([1, 2, 3])  # every rank makes it; rank 0 is not in it

    def held_by(r):  # rank 1 holds nothing, rank 2 nearly all, rank 3 eighty: the gathers are broadcasts
        g = torch.Generator().manual_seed(5 + r)
        n = 300_000 if r == 2 else 40 * (r - 1)
        return [torch.randn(n, generator=g)], [torch.randn(n, generator=g)], [torch.rand(n, generator=g)]

    if rank == 0:
        return
    sources, broadcast = [], dist.broadcast

    def recorded(tensor, *args, **kwargs):
        sources.append(kwargs.get("src"))
        return broadcast(tensor, *args, **kwargs)

    dist.broadcast = recorded
    everything = [[torch.cat([held_by(r)[i][0] for r in (1, 2, 3)])] for i in range(3)]
    total = everything[0][0].numel()
    for k in (1, total // 4, total - 1):
        expected = ops.score_threshold(*everything, k, 1e-6, search="histograms")
        assert distributed_score_threshold(*held_by(rank), k, 1e-6, group=sub, search=search) == expected, k
    assert (search == "sample") == bool(sources) and set(sources) <= {1, 2, 3}, sources


@pytest.mark.parametrize("search", ["histograms", "sample"])
def test_a_subgroup_whose_ranks_are_not_the_worlds(tmp_path, search):
    """The search over a process group of ranks 1 to 3 (its ranks 0 to 2) on four: each broadcast
    comes from the global rank that holds what it sends."""
    run(tmp_path, _in_a_subgroup, search, world=4)


@pytest.mark.parametrize("case", ["held", "missed", "too_many"])
def test_the_search_from_a_sample_over_ranks(tmp_path, case):
    """From 1M weights over all ranks "auto" brackets the threshold from every rank's sample: one
    pass where the bracket holds it; where it missed or held too many keys, the ranks narrow it
    together, pass by pass, to the threshold one process finds."""
    run(tmp_path, _misled, case)


def _dtensors(rank, k, eps, search):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    ft, pre, hs = full_state(1)
    expected = ops.score_threshold(ft, pre, hs, k, eps)
    ref = [t.clone() for t in ft]
    ops.masked_reset_(ref, pre, hs, expected, eps)
    # FSDP-style sharded tensors and replicated ones (counted once, not twice)
    placements = [[Shard(0)] if i % 2 == 0 else [Replicate()] for i in range(len(ft))]
    dts = [[distribute_tensor(t.clone(), mesh, p) for t, p in zip(ts, placements)] for ts in (ft, pre, hs)]
    got = distributed_score_threshold(*dts, k, eps, search=search)
    assert got == expected, (got, expected)
    distributed_masked_reset_(*dts, got, eps)
    for i, t in enumerate(dts[0]):
        assert torch.equal(t.full_tensor(), ref[i]), i


@pytest.mark.parametrize("search", ["histograms", "sample"])
@pytest.mark.parametrize("k", [1, 777, 3647])
def test_dtensors_sharded_and_replicated_match_one_process(tmp_path, k, search):
    run(tmp_path, _dtensors, k, 1e-6, search)


def _one_rank_has_nan(rank, search, empty):
    ft, pre, hs = full_state(3)
    mine = [t[rank::WORLD] for t in (ft, pre, hs)]
    if rank == 1:
        mine[0][1].view(-1)[5] = float("nan")
    elif empty:  # rank 0 holds only empty shards
        mine = [[x.view(-1)[:0] for x in ts] for ts in mine]
    # Every rank raises (none waits on a pass the others left); the rank that holds it names the tensor.
    expected = "finetuned\\[1\\] contains NaN" if rank == 1 else "1 scores are NaN or Inf"
    with pytest.raises((RuntimeError, ValueError), match=expected):
        distributed_score_threshold(*mine, 100, 1e-6, search=search)


@pytest.mark.parametrize("empty", [False, True], ids=["", "other_rank_empty"])
@pytest.mark.parametrize("search", ["histograms", "sample"])
def test_a_nan_on_one_rank_stops_every_rank(tmp_path, search, empty):
    run(tmp_path, _one_rank_has_nan, search, empty)


def _replicated_plain(rank, k, eps):
    ft, pre, hs = full_state(2)
    expected = ops.score_threshold(ft, pre, hs, k, eps)
    assert distributed_score_threshold(ft, pre, hs, k, eps, replicated=True) == expected
    assert ops.score_threshold(ft, pre, hs, k, eps, group=dist.group.WORLD, replicated=True) == expected
    assert distributed_score_threshold(ft, pre, hs, k, eps, replicated=True, search="sample") == expected
    with pytest.raises(ValueError, match="out of range"):  # counted twice without replicated=True
        distributed_score_threshold(ft, pre, hs, 2 * 3647 + 1, eps)
    with pytest.raises(ValueError, match="search='fast' is not one of"):
        distributed_score_threshold(ft, pre, hs, k, eps, search="fast")


def test_replicated_plain_tensors_are_not_counted_twice(tmp_path):
    run(tmp_path, _replicated_plain, 999, 1e-6)


# ------------------------------------------------------------------------------------- Hessian


@dataclass
class Output:
    loss: torch.Tensor


class TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x, labels):
        return Output(torch.nn.functional.cross_entropy(self.head(torch.tanh(self.body(x))), labels))


def global_batches():
    g = torch.Generator().manual_seed(3)
    return [{"x": torch.randn(8, 6, generator=g), "labels": torch.randint(0, 3, (8,), generator=g)} for _ in range(5)]


def single_process_hessian():
    from finepurify_ext.hessian import estimate_hessian

    return estimate_hessian(TinyClassifier(), global_batches(), progress=False)[0]


def _ddp_hessian(rank, wrap, out_dir):
    from safetensors.torch import load_file

    from finepurify_ext.hessian import estimate_hessian, save_hessian

    expected = single_process_hessian()
    model = TinyClassifier()
    if wrap == "ddp":  # named as the module's parameters, as purify_ and a pre-trained state name them
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    # each rank sees its half of every global batch; the gradients are averaged across ranks
    local = [{k: v[rank::WORLD] for k, v in b.items()} for b in global_batches()]
    hessians, count = estimate_hessian(model, local, progress=False)
    assert count == 5
    for name, h in expected.items():
        got = hessians[name]
        if wrap == "fsdp2":
            assert type(got).__name__ == "DTensor"
            got = got.full_tensor()
        torch.testing.assert_close(got, h, rtol=1e-5, atol=1e-9)
    # Saved by every rank, a tensor gathered at a time: never two gathered Hessians alive at once.
    if wrap == "fsdp2":
        import weakref

        from torch.distributed.tensor import DTensor

        gathered, most_alive, full_tensor = [], [0], DTensor.full_tensor

        def watched(self, *args, **kwargs):
            out = full_tensor(self, *args, **kwargs)
            gathered[:] = [ref for ref in gathered if ref() is not None] + [weakref.ref(out)]
            most_alive[0] = max(most_alive[0], len(gathered))
            return out

        DTensor.full_tensor = watched
        try:
            save_hessian(os.path.join(out_dir, f"hessian{rank}.safetensors"), hessians, count)
        finally:
            DTensor.full_tensor = full_tensor
        assert most_alive[0] == 1
        saved = load_file(os.path.join(out_dir, f"hessian{rank}.safetensors"))
        assert set(saved) == set(expected)
        for name, h in expected.items():
            torch.testing.assert_close(saved[name], h, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_hessian_under_ddp_and_fsdp2(tmp_path, wrap):
    run(tmp_path, _ddp_hessian, wrap, str(tmp_path))


# --------------------------------------------------------------------------- purify_ of a sharded model


class ShardedToy(torch.nn.Module):
    """Uneven rows for two ranks, a one-row layer (a rank holds an empty shard), a word embedding and
    a new head the pre-trained state lacks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(23, 8)
        self.body = torch.nn.Linear(8, 37)
        self.mid = torch.nn.Linear(37, 11)
        self.norm = torch.nn.LayerNorm(11)
        self.tiny = torch.nn.Linear(11, 1)
        self.head = torch.nn.Linear(1, 3)

    def get_input_embeddings(self):
        return self.embed


def toy_state():
    """(pre-trained state, Hessians): some weights unmoved, embedding rows of zero Hessian, ties."""
    model, g = ShardedToy(), torch.Generator().manual_seed(7)
    pre, hs = {}, {}
    for name, p in model.named_parameters():
        if name.startswith("head."):
            continue
        moved = torch.rand(p.shape, generator=g) < 0.8
        pre[name] = torch.where(moved, p.detach() + 0.05 * torch.randn(p.shape, generator=g), p.detach())
        hs[name] = torch.rand(p.shape, generator=g) ** 3
    hs["embed.weight"][[2, 5, 11, 12, 20]] = 0  # rows the clean data never reaches
    hs["mid.weight"].view(-1)[:40] = hs["mid.weight"].view(-1)[40]  # ties
    return pre, hs


def _sharded_purify(rank, variant):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    import finepurify_ext.purify as purify_module
    from finepurify_ext.purify import PurifyConfig, purify_

    world = dist.get_world_size()
    mesh = (init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard")) if variant == "hsdp"
            else init_device_mesh("cpu", (world,)))
    configs = [PurifyConfig(ranking=r) for r in ("fine_purifying", "no_hessian", "magnitude", "fine_mixing")]
    configs += [PurifyConfig.literal(), PurifyConfig(hessian_floor_quantile=0.9, reserve_ratio=0.95, seed=3)]
    purify_module.FLOOR_SAMPLES = 97  # the floor's sample every 9th or so Hessian value: where a shard starts counts
    searches = {"histograms": dict(CANDIDATES_MIN_WEIGHTS=1 << 40),
                "sample": dict(CANDIDATES_MIN_WEIGHTS=0),  # one candidates pass over the ranks
                "narrowed": dict(CANDIDATES_MIN_WEIGHTS=0, CANDIDATE_KEYS=8)}  # narrowing passes over the ranks
    for search, patches in searches.items():
        for key, value in patches.items():
            setattr(purify_module, key, value)
        if variant == "groups":  # a Feed of many groups: the pre-trained state converted from float64
            purify_module.GROUP_BYTES = 512
        for config in configs:
            for seen in (None, [0, 1, 3, 4, 9]):
                pre, hs = toy_state()
                if variant == "groups":
                    pre = {n: t.double() for n, t in pre.items()}
                one = ShardedToy()
                expected = purify_(one, pre, hs, config, seen_tokens=seen)
                model = ShardedToy()
                fully_shard(model, mesh=mesh)
                placements = next(model.parameters()).placements
                if variant in ("dtensors", "hsdp"):  # the Hessians as estimate_hessian leaves them under FSDP2
                    hs = {n: distribute_tensor(h, mesh, placements) for n, h in hs.items()}
                if variant == "dtensors":
                    pre = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in pre.items()}
                got = purify_(model, pre, hs, config, seen_tokens=seen)
                where = (variant, search, config, seen)
                for name, p in one.named_parameters():
                    assert torch.equal(dict(model.named_parameters())[name].full_tensor(), p.detach()), (where, name)
                for field in ("threshold", "ranked_elements", "moved_elements", "num_reset", "reset_per_parameter",
                              "numel_per_parameter", "embedding_rows_reset", "embedding_rule", "kept_unscored",
                              "hessian_floor", "threshold_passes"):
                    assert getattr(got, field) == getattr(expected, field), (where, field)
                assert expected.num_reset > 0 and sum(expected.reset_per_parameter.values()) > 0, where
                # The plot's sample: every rank's share of it, gathered (each share rounded).
                assert len(got.sample["reset"]) == len(got.sample["drift_sq"]) == len(got.sample["hessian"]), where
                assert abs(len(got.sample["drift_sq"]) - len(expected.sample["drift_sq"])) <= world, where
                if config.embeddings == "separate":
                    assert got.embedding_rows_reset > 0, where


@pytest.mark.parametrize("variant,world", [("whole", 2), ("dtensors", 2), ("groups", 2), ("hsdp", 2), ("whole", 3)])
def test_purify_of_a_sharded_model_matches_one_process(tmp_path, variant, world):
    """purify_ on an FSDP2 model, every rank its own shards: each ranking, both searches (and the
    narrowing passes), the seen-token rule, the pre-trained state and Hessians whole, as DTensors,
    or moved in groups, HSDP's replicas (counted once), and three ranks (torch.chunk's rows: the
    one-row layer leaves two ranks empty): the same weights reset and the same report as one
    process over the whole model."""
    run(tmp_path, _sharded_purify, variant, world=world)


def _resized_vocabulary(rank, rows):
    """The embedding resized with the vocabulary: the pre-trained state has ``rows`` rows, fewer
    (tokens added) or more (a padded vocabulary cut) than its 23."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from finepurify_ext.purify import PurifyConfig, purify_

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for config in (PurifyConfig(), PurifyConfig(ranking="fine_mixing"), PurifyConfig(embeddings="ranked")):
        for seen in (None, [0, 1, 3, 4, 9, 21]):  # 21: an added token's
            for hessians_as, pre_as in (("whole", "whole"), ("dtensors", "whole"), ("dtensors", "dtensors")):
                pre, hs = toy_state()
                hs["embed.weight"][22] = 0  # a token the clean data never reaches
                unreached = [i for i in range(rows, 23) if not hs["embed.weight"][i].any()]
                padding = torch.randn(max(0, rows - 23), 8, generator=torch.Generator().manual_seed(3))
                pre["embed.weight"] = torch.cat([pre["embed.weight"][:rows], padding])
                pre_mean = (pre["embed.weight"].double().sum(dim=0) / pre["embed.weight"].shape[0]).float()
                one = ShardedToy()
                expected = purify_(one, pre, hs, config, seen_tokens=seen)
                model = ShardedToy()
                fully_shard(model, mesh=mesh)
                if hessians_as == "dtensors":
                    placements = next(model.parameters()).placements
                    hs = {n: distribute_tensor(h, mesh, placements) for n, h in hs.items()}
                if pre_as == "dtensors":  # as the pre-trained model's own FSDP2 shards: its rows split otherwise
                    pre = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in pre.items()}
                got = purify_(model, pre, hs, config, seen_tokens=seen)
                where = (rows, config, seen, hessians_as, pre_as)
                for name, p in one.named_parameters():
                    assert torch.equal(dict(model.named_parameters())[name].full_tensor(), p.detach()), (where, name)
                for field in ("threshold", "ranked_elements", "num_reset", "reset_per_parameter", "embedding_rows_reset",
                              "added_rows", "removed_rows", "unseen_added_rows", "added_rows_reset"):
                    assert getattr(got, field) == getattr(expected, field), (where, field)
                if rows < 23:
                    assert expected.added_rows == {"embed.weight": {"rows": 23, "pretrained_rows": rows,
                                                                    "added_weights": (23 - rows) * 8}}
                    # the unseen added rows reset to the pre-trained mean under the embedding rule, the others kept
                    unseen = expected.unseen_added_rows if config.embeddings == "separate" else []
                    kept = [i for i in range(rows, 23) if i not in unseen]
                    assert torch.equal(one.embed.weight[kept], ShardedToy().embed.weight[kept]), where
                    assert expected.added_rows_reset == len(unseen), where
                    assert all(torch.equal(one.embed.weight[i], pre_mean) for i in unseen), where
                    assert expected.unseen_added_rows == (unreached if seen is None else
                                                          [i for i in range(rows, 23) if i not in seen]), where
                    assert 22 in expected.unseen_added_rows, where
                else:
                    assert expected.removed_rows == {"embed.weight": {"rows": 23, "pretrained_rows": rows}}


@pytest.mark.parametrize("rows", [20, 9, 30])  # rank 1 holds some of the pre-trained rows, or none; a cut one
def test_a_resized_vocabulary_sharded_is_purified_as_one_process(tmp_path, rows):
    """FSDP2 shards the resized embedding on its rows: each rank ranks the rows with a pre-trained
    value it holds (maybe none) and keeps the added ones, as one process does over the whole model;
    a cut vocabulary's rows are ranked against the pre-trained tensor's first rows."""
    run(tmp_path, _resized_vocabulary, rows)


def _sharded_refusals(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from finepurify_ext.errors import UserError
    from finepurify_ext.purify import PurifyConfig, purify_
    from finepurify_ext.sharded import Shards

    mesh = init_device_mesh("cpu", (WORLD,))
    pre, hs = toy_state()
    model = ShardedToy()
    fully_shard(model, mesh=mesh)
    if rank == 1:  # a NaN in rank 1's shard: every rank stops, rank 1 names the tensor
        pre["body.weight"][-1, 0] = float("nan")
    expected = "pre-trained model's parameter 'body.weight' holds 1 NaN" if rank == 1 else "cannot be ranked"
    with pytest.raises((UserError, ValueError), match=expected):
        purify_(model, pre, hs, PurifyConfig(hessian_floor_quantile=None))
    pre, hs = toy_state()
    hs["mid.weight"] = distribute_tensor(hs["mid.weight"], mesh, [Shard(1)])
    with pytest.raises(ValueError, match="Hessian of 'mid.weight' is sharded unlike the parameter"):
        purify_(model, pre, hs, PurifyConfig())
    pre, hs = toy_state()
    pre["embed.weight"] = pre["embed.weight"][:20]
    hs["embed.weight"] = distribute_tensor(hs["embed.weight"][:20], mesh, [Shard(0)])  # the pre-trained model's rows
    with pytest.raises(ValueError, match="Hessian of 'embed.weight' is a DTensor of shape \\[20, 8\\] "
                                         "placed as .*, the parameter \\[23, 8\\] placed as .*; pass it whole"):
        purify_(model, pre, hs, PurifyConfig())
    pre, hs = toy_state()
    pre["embed.weight"] = pre["embed.weight"][:20]
    for name in ("embed.weight", "mid.weight"):  # replicated: whole on every rank, not the parameter's rows
        hs = toy_state()[1]
        hs[name] = distribute_tensor(hs[name], mesh, [Replicate()])
        with pytest.raises(ValueError, match=f"Hessian of '{name}' is .*sharded.*parameter"):
            purify_(model, pre, hs, PurifyConfig())
    # A NaN in the embedding's Hessian on one rank's rows (an added row, which no op ranks): every
    # rank refuses it, under either embedding rule, the model as it came.
    placements = next(model.parameters()).placements
    for config in (PurifyConfig(), PurifyConfig(embeddings="ranked")):
        pre, hs = toy_state()
        pre["embed.weight"] = pre["embed.weight"][:20]
        hs["embed.weight"][22, 3] = float("nan")  # rank 1's rows; rank 0 holds none of the added ones
        hs = {n: distribute_tensor(h, mesh, placements) for n, h in hs.items()}
        before = {n: p.full_tensor() for n, p in model.named_parameters()}
        with pytest.raises(UserError, match="the Hessian of 'embed.weight' holds NaN, Inf or negative values"):
            purify_(model, pre, hs, config)
        assert all(torch.equal(p.full_tensor(), before[n]) for n, p in model.named_parameters()), config
    # the separate embedding's pre-trained tensor placed unlike the parameter: refused before any reset
    pre, hs = toy_state()
    pre["embed.weight"] = distribute_tensor(pre["embed.weight"], mesh, [Replicate()])
    before = {n: p.full_tensor() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="pre-trained tensor of 'embed.weight' is .*sharded.*parameter"):
        purify_(model, pre, hs, PurifyConfig())
    assert all(torch.equal(p.full_tensor(), before[n]) for n, p in model.named_parameters())
    params = {"w": distribute_tensor(torch.randn(6, 4), mesh, [Shard(1)])}
    with pytest.raises(ValueError, match="'w' is placed as .*Shard\\(dim=1\\).*sharded on dim 0"):
        Shards.of(params, ["w"])
    # The added rows' mean is summed over every rank, whatever rows each resets (here each rank was given
    # its own clean data's tokens): none waits on a sum another skipped.
    pre, hs = toy_state()
    pre["embed.weight"] = pre["embed.weight"][:20]
    got = purify_(model, pre, hs, PurifyConfig(), seen_tokens=[0, 1, 3, 20, 21, 22] if rank == 0 else [0, 1, 3])
    assert got.added_rows_reset == (0 if rank == 0 else 3)
    _fsdp1(rank)


def _fsdp1(rank):
    """FSDP1's parameters are each rank's slices of flat buffers: with use_orig_params=True rank 0
    refused (nothing matched) while rank 1 reset the few 1-D slices that matched a shape, without a
    word; estimate_hessian read flat gradient shards. Both are refused now (and fine_purify, which
    runs in one process), and purify_ inside summon_full_params(writeback=True) resets what one
    process resets."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from finepurify_ext.data import Example
    from finepurify_ext.hessian import estimate_hessian
    from finepurify_ext.pipeline import fine_purify
    from finepurify_ext.purify import PurifyConfig, purify_

    pre, hs = toy_state()
    config = PurifyConfig(reserve_ratio=0.5)
    plain = ShardedToy()
    expected = purify_(plain, pre, hs, config)
    for use_orig_params in (True, False):
        model = FSDP(ShardedToy(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
        with pytest.raises(ValueError, match="purify_: an FSDP1 model's parameters are flat shards.*"
                                             r"summon_full_params\(model, writeback=True\)"):
            purify_(model, pre, hs, config)
        with pytest.raises(ValueError, match="estimate_hessian: an FSDP1 model .* under FSDP2's fully_shard or DDP"):
            estimate_hessian(model, [{"x": torch.ones(2, 3)}], progress=False)
        with pytest.raises(ValueError, match="fine_purify runs in one process; an FSDP1 model is sharded"):
            fine_purify(model, pre, None, [Example("a text", 0)], config)
        with FSDP.summon_full_params(model, writeback=True):
            got = purify_(model, pre, hs, config)
        assert got.num_reset == expected.num_reset > 0
        with FSDP.summon_full_params(model):
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters())), use_orig_params


def test_purify_of_a_sharded_model_refuses_clearly(tmp_path):
    run(tmp_path, _sharded_refusals)


def _sharded_quantile(rank):
    from finepurify_ext.purify import sample_quantile
    from finepurify_ext.sharded import Shards

    shards = Shards({}, [], dist.group.WORLD)
    g = torch.Generator().manual_seed(21)  # every rank draws every sample, and takes its own part
    for n, kind in [(1, "plain"), (2, "plain"), (1001, "plain"), (4096, "ties"), (3000, "signed"), (777, "zeros"),
                    (50, "nan")]:
        whole = torch.rand(n, generator=g) ** 4
        if kind == "ties":
            whole = (whole * 5).floor()
        elif kind == "signed":
            whole = torch.randn(n, generator=g) * torch.exp(8 * torch.randn(n, generator=g))
        elif kind == "zeros":
            whole[: n * 2 // 3] = 0
        elif kind == "nan":
            whole[7] = float("nan")
        mine = whole[(n * rank) // WORLD:(n * (rank + 1)) // WORLD]  # rank 0 of n == 1: an empty part
        for q in (0.0, 0.1, 0.5, 0.731, 0.9, 1.0):
            expected, got = sample_quantile(whole, q), shards.quantile(mine, q)
            assert (math.isnan(expected) and math.isnan(got)) or got == expected, (n, kind, q, got, expected)
    with pytest.raises(ValueError, match="empty"):
        shards.quantile(torch.zeros(0), 0.5)


def test_the_floor_quantile_over_ranks_is_one_process_quantile(tmp_path):
    """The Hessian floor's quantile of every rank's part of a sample, by summed histograms of the
    values' keys: the bits of one process's sample_quantile (ties, zeros, negative values, a NaN,
    one element, a rank with none)."""
    run(tmp_path, _sharded_quantile)


def _replicated_model_with_group(rank):
    from finepurify_ext.purify import PurifyConfig, purify_

    for config in (PurifyConfig(), PurifyConfig(ranking="no_hessian"), PurifyConfig(ranking="fine_mixing")):
        pre, hs = toy_state()
        one, every = ShardedToy(), ShardedToy()
        expected = purify_(one, pre, hs, config)
        got = purify_(every, pre, hs, config, group=dist.group.WORLD)  # every rank holds it whole: counted once
        assert got.num_reset == expected.num_reset and got.threshold == expected.threshold, config
        assert got.reset_per_parameter == expected.reset_per_parameter, config
        for (name, p), q in zip(one.named_parameters(), every.parameters()):
            assert torch.equal(p, q), (config, name)


def test_purify_with_a_group_of_whole_replicas_counts_them_once(tmp_path):
    """A group given with plain parameters (every rank holding the whole model, as under DDP): the
    ranks count each tensor once and reset what one process resets."""
    run(tmp_path, _replicated_model_with_group)
