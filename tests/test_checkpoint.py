"""Out-of-core purification of sharded safetensors checkpoints: the result equals the in-memory
method exactly, shards need not line up, inputs stay untouched, bad input fails clearly, and
nothing half-written is left behind."""
import hashlib
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from finepurify_ext import ops
from finepurify_ext.checkpoint import Checkpoint, CheckpointError, ShardWriter, purify_checkpoint
from finepurify_ext.purify import PurifyConfig, purify_

SHAPES = {"embed_tokens.weight": (50, 16), "layer0.weight": (16, 16), "layer0.bias": (16,), "layer1.weight": (33, 16),
          "layer1.bias": (33,), "norm.weight": (33,), "empty.weight": (0, 4)}


def make_states(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {n: torch.randn(s, generator=g).to(dtype) for n, s in SHAPES.items()}
    suspect = {}
    for n, t in pre.items():
        drift = torch.randn(t.shape, generator=g) * torch.rand(t.shape, generator=g)
        moved = torch.rand(t.shape, generator=g) < 0.7  # some weights never move
        suspect[n] = torch.where(moved, (t.float() + 0.1 * drift).to(dtype), t)
    suspect["head.weight"] = torch.randn(2, 33, generator=g).to(dtype)  # no pre-trained value
    suspect["position_ids"] = torch.arange(7)  # an integer buffer
    hessian = {n: torch.rand(s, generator=g) ** 3 for n, s in SHAPES.items()}
    hessian["layer0.bias"][:5] = 0  # zero curvature
    hessian["embed_tokens.weight"][3:9] = 0  # tokens the clean data never reaches
    return pre, suspect, hessian


class StateModule(torch.nn.Module):
    """The floating tensors of a state dict as parameters under the same dotted names, with
    ``embed_tokens`` as the input embedding (what purify_ looks for)."""

    def __init__(self, state):
        super().__init__()
        for name, t in state.items():
            if not t.is_floating_point():
                continue
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(t.clone()))

    def get_input_embeddings(self):
        return self.embed_tokens


def save_sharded(state, directory, groups):
    """``groups``: lists of names, one shard each, with an index."""
    os.makedirs(directory, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: state[n].contiguous() for n in names}, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write("{}")
    return str(directory)


@pytest.fixture()
def checkpoints(tmp_path):
    pre, suspect, hessian = make_states()
    names = list(suspect)
    # the two checkpoints are sharded differently: tensors are matched by name
    sus_dir = save_sharded(suspect, tmp_path / "suspect", [names[:3], names[3:6], names[6:]])
    pre_dir = save_sharded(pre, tmp_path / "pre", [list(pre)[4:], list(pre)[:4]])
    h_file = str(tmp_path / "hessian.safetensors")
    save_file(hessian, h_file)
    return pre, suspect, hessian, pre_dir, sus_dir, h_file


def digest(directory):
    return {f: hashlib.sha256(open(os.path.join(directory, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(directory))}


def read_dir(directory):
    out = {}
    for f in os.listdir(directory):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, f)))
    return out


@pytest.mark.parametrize("chunk_bytes", [32 << 20, 64, 100])  # whole tensors; pieces of 16 and 25 elements
def test_literal_equals_the_in_memory_op(checkpoints, tmp_path, chunk_bytes):
    pre, suspect, hessian, pre_dir, sus_dir, h_file = checkpoints
    before = digest(sus_dir), digest(pre_dir)
    config = PurifyConfig.literal(reserve_ratio=0.6, eps=1e-6)
    report = purify_checkpoint(pre_dir, sus_dir, h_file, str(tmp_path / "out"), config, progress=False,
                               chunk_bytes=chunk_bytes)
    names = list(SHAPES)
    expected = {n: t.clone() for n, t in suspect.items()}
    counts = ops.reset_most_abnormal_([expected[n] for n in names], [pre[n] for n in names],
                                      [hessian[n] for n in names], 0.6, 1e-6)
    got = read_dir(tmp_path / "out")
    assert set(got) == set(suspect)
    for n in suspect:
        assert torch.equal(got[n], expected[n]), n
    assert report.reset_per_tensor == {n: int(c) for n, c in zip(names, counts)}
    assert set(report.copied_unscored) == {"head.weight", "position_ids"}
    # same shard names and index as the suspect; the inputs untouched
    assert sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")) == \
        sorted(f for f in os.listdir(sus_dir) if f.endswith(".safetensors"))
    assert json.load(open(tmp_path / "out" / "model.safetensors.index.json")) == \
        json.load(open(os.path.join(sus_dir, "model.safetensors.index.json")))
    assert (digest(sus_dir), digest(pre_dir)) == before
    assert json.load(open(tmp_path / "out" / "finepurify_report.json"))["num_reset"] == report.num_reset


@pytest.mark.parametrize("failing", ["score_histogram", "masked_reset_"])
def test_a_pass_that_fails_leaves_no_reader_thread_and_no_output(checkpoints, tmp_path, monkeypatch, failing):
    """A pass that fails midway (here the op, on its third piece) stops the read-ahead: no reader
    thread outlives the call, and no output directory is left."""
    import threading

    from finepurify_ext import checkpoint as checkpoint_module

    _, _, _, pre_dir, sus_dir, h_file = checkpoints
    calls, op = [0], getattr(ops, failing)

    def fails_on_the_third_piece(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("the device went away")
        return op(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module.ops, failing, fails_on_the_third_piece)
    with pytest.raises(RuntimeError, match="went away") as raised:
        purify_checkpoint(pre_dir, sus_dir, h_file, str(tmp_path / "out"), PurifyConfig.literal(reserve_ratio=0.6),
                          progress=False, chunk_bytes=64)
    assert calls[0] == 3
    assert not [t for t in threading.enumerate() if t.name.startswith("finepurify-read")]
    assert not os.path.exists(tmp_path / "out")
    del raised  # kept until here: a traceback alive must not keep the readers alive either


@pytest.mark.parametrize("embeddings", ["ranked", "separate"])
@pytest.mark.parametrize("ranking", ["fine_purifying", "no_hessian", "magnitude", "fine_mixing"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_configs_equal_purify_in_memory(tmp_path, ranking, dtype, embeddings):
    """One scoring spec: every ranking and budget option out of core equals purify_ in memory,
    Fine-mixing's random mask included (pieces of 25 elements draw the whole tensor's values)."""
    pre, suspect, hessian = make_states(dtype, seed=1)
    names = list(suspect)
    sus_dir = save_sharded(suspect, tmp_path / "suspect", [names[::2], names[1::2]])
    pre_dir = save_sharded(pre, tmp_path / "pre", [list(pre)])
    h_file = str(tmp_path / "h.safetensors")
    save_file(hessian, h_file)
    config = PurifyConfig(ranking=ranking, reserve_ratio=0.3, embeddings=embeddings)  # moved-only, median floor
    report = purify_checkpoint(pre_dir, sus_dir, h_file, str(tmp_path / "out"), config, progress=False,
                               chunk_bytes=100)

    module = StateModule(suspect)
    expected = purify_(module, {n: pre[n] for n in SHAPES}, {n: hessian[n] for n in SHAPES}, config)
    got = read_dir(tmp_path / "out")
    for n, p in module.named_parameters():
        assert torch.equal(got[n], p.data), n
    assert report.moved_elements == expected.moved_elements and report.threshold == expected.threshold
    if embeddings == "separate":
        assert report.embedding_tensor == "embed_tokens.weight"
        assert report.embedding_rows_reset == expected.embedding_rows_reset == 6


@pytest.mark.parametrize("ranking", ["fine_purifying", "no_hessian", "magnitude", "fine_mixing", "literal"])
def test_one_pass_out_of_core_equals_the_histogram_passes(tmp_path, monkeypatch, ranking):
    """Every ranking (the paper's literal setting too: no floor) takes its sample in a pre-pass and
    finds the threshold in one pass (no histogram pass runs), with the purified shards and report
    of the histogram passes and of purify_ in memory; so do a range that misses and one that holds
    more keys than a pass may keep (more candidates passes narrow them)."""
    from finepurify_ext import checkpoint as checkpoint_module
    from finepurify_ext import purify as purify_module

    pre, suspect, hessian = make_states(torch.bfloat16, seed=3)
    for name in ("layer0.weight", "layer0.bias"):  # the first pieces read never moved: no key inside any range
        suspect[name] = pre[name].clone()
    names = list(suspect)
    sus_dir = save_sharded(suspect, tmp_path / "suspect", [names[::2], names[1::2]])
    pre_dir = save_sharded(pre, tmp_path / "pre", [list(pre)])
    h_file = str(tmp_path / "h.safetensors")
    save_file(hessian, h_file)
    # literal counts the weights that never moved too: reserve 0.7 puts its threshold among the moved ones
    config = (PurifyConfig.literal(reserve_ratio=0.7) if ranking == "literal"
              else PurifyConfig(ranking=ranking, reserve_ratio=0.3))

    def run(out, **patches):
        for name, value in patches.items():  # where each module reads it
            for module in (purify_module, checkpoint_module):
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, value)
        if "CANDIDATES_ON" not in patches:
            monkeypatch.setattr(checkpoint_module, "threshold_from_histograms", no_histograms)
            monkeypatch.setattr(checkpoint_module, "search_ranges", counted_search)
        report = purify_checkpoint(pre_dir, sus_dir, h_file, str(tmp_path / out), config, progress=False,
                                   chunk_bytes=100)
        monkeypatch.undo()
        return report, read_dir(tmp_path / out)

    def no_histograms(*_):
        raise AssertionError("a histogram pass ran")

    narrowing = []  # the passes after the first, per run
    search_ranges = checkpoint_module.search_ranges

    def counted_search(first, candidates_of, *args):
        narrowing.append(0)

        def counted(*range_args):
            narrowing[-1] += 1
            return candidates_of(*range_args)
        return search_ranges(first, counted, *args)

    small = {"CANDIDATES_MIN_WEIGHTS": 0}  # these tiny checkpoints would keep the histogram passes
    one_pass = run("one", **small)
    histograms = run("histograms", CANDIDATES_ON=(), **small)
    missed = run("missed", bracket_from_sample=lambda *_: (1, 2, 0.0), **small)
    too_many = run("too_many", OUT_OF_CORE_KEYS=8, bracket_from_sample=lambda *_: (0, 0x7F800000, 0.0), **small)
    no_room = run("no_room", OUT_OF_CORE_KEYS=8, **small)  # the sample's bracket, expected to hold too many: room 0
    assert narrowing[0] == 0 and all(n > 0 for n in narrowing[1:]), narrowing  # one; missed, too_many, no_room
    assert [r.threshold_passes for r, _ in (one_pass, missed, too_many, no_room)] == [1 + n for n in narrowing]
    assert histograms[0].threshold_passes == 3
    # A piece holding more keys than piece_room gives it is scored again with room for them: still one pass.
    score_candidates, rooms = ops.score_candidates, []

    def spied(*args):
        rooms.append(args[6])
        return score_candidates(*args)

    def run_spied(out, **patches):
        rooms.clear()
        monkeypatch.setattr(ops, "score_candidates", spied)  # run() undoes it
        return run(out, **patches), list(rooms)

    plain, plain_rooms = run_spied("plain", **small)
    scored_again, again_rooms = run_spied("scored_again", piece_room=lambda *_: 1, **small)
    assert len(again_rooms) > len(plain_rooms) and scored_again[0].threshold_passes == 1
    assert scored_again[0].threshold == one_pass[0].threshold
    assert all(torch.equal(got, one_pass[1][n]) for n, got in scored_again[1].items())
    module = StateModule(suspect)
    expected = purify_(module, {n: pre[n] for n in SHAPES}, {n: hessian[n] for n in SHAPES}, config)
    assert one_pass[0].threshold == expected.threshold
    assert all(torch.equal(one_pass[1][n], p.data) for n, p in module.named_parameters())
    for report, got in (histograms, missed, too_many, no_room):
        assert report.threshold == one_pass[0].threshold and report.reset_per_tensor == one_pass[0].reset_per_tensor
        assert all(torch.equal(got[n], one_pass[1][n]) for n in got)


def test_the_pre_pass_brackets_from_a_denser_sample_than_the_floor(tmp_path, monkeypatch):
    """Out of core the sample that brackets the threshold takes one weight of every
    OUT_OF_CORE_SAMPLE_EVERY (the pre-pass reads them all), not the floor's sample: the floor, the
    threshold and the purified weights stay purify_'s."""
    from finepurify_ext import checkpoint as checkpoint_module
    from finepurify_ext import purify as purify_module

    pre, suspect, hessian = make_states(seed=4)
    sus_dir = save_sharded(suspect, tmp_path / "suspect", [list(suspect)])
    pre_dir = save_sharded(pre, tmp_path / "pre", [list(pre)])
    h_file = str(tmp_path / "h.safetensors")
    save_file(hessian, h_file)
    for module in (purify_module, checkpoint_module):
        monkeypatch.setattr(module, "FLOOR_SAMPLES", 16)  # the floor from every 104th Hessian value
        monkeypatch.setattr(module, "CANDIDATES_MIN_WEIGHTS", 0)
    monkeypatch.setattr(checkpoint_module, "OUT_OF_CORE_SAMPLE_EVERY", 4)
    sizes, score_sample = [], ops.score_sample

    def spied(finetuned, *args):
        sizes.append(sorted(t.numel() for t in finetuned))
        return score_sample(finetuned, *args)

    monkeypatch.setattr(ops, "score_sample", spied)
    config = PurifyConfig(reserve_ratio=0.3)
    report = purify_checkpoint(pre_dir, sus_dir, h_file, str(tmp_path / "out"), config, progress=False,
                               chunk_bytes=64)
    ranked = [math.prod(s) for n, s in SHAPES.items() if n != "embed_tokens.weight" and math.prod(s)]
    stride = sum(ranked) // (sum(ranked) // 4)
    assert sizes == [sorted(-(-n // stride) for n in ranked)]  # every 4th weight of each tensor
    module = StateModule(suspect)
    expected = purify_(module, {n: pre[n] for n in SHAPES}, {n: hessian[n] for n in SHAPES}, config)
    assert report.hessian_floor == expected.hessian_floor and report.threshold == expected.threshold
    got = read_dir(tmp_path / "out")
    assert all(torch.equal(got[n], p.data) for n, p in module.named_parameters())


def test_explicit_reset_count(checkpoints, tmp_path):
    _, _, _, pre_dir, sus_dir, h_file = checkpoints
    report = purify_checkpoint(pre_dir, sus_dir, h_file, str(tmp_path / "out"), PurifyConfig.literal(),
                               num_reset=17, progress=False)
    assert sum(report.reset_per_tensor.values()) >= 17 and report.num_reset == 17 and report.reserve_ratio is None
    # nothing to reset: the suspect comes out unchanged
    none = purify_checkpoint(pre_dir, sus_dir, h_file, str(tmp_path / "none"), PurifyConfig.literal(), num_reset=0,
                             progress=False)
    assert none.threshold is None and set(none.reset_per_tensor.values()) == {0}
    assert set(none.reset_per_tensor) == set(SHAPES)
    got, suspect = read_dir(tmp_path / "none"), read_dir(sus_dir)
    assert all(torch.equal(got[n], suspect[n]) for n in suspect)


def test_a_reset_count_out_of_range_is_refused_before_any_read(checkpoints, tmp_path, monkeypatch):
    """The count of scored weights comes from the headers: a --num-reset beyond it is refused
    before the pre-pass reads anything (on a large model that pass takes minutes)."""
    from finepurify_ext import checkpoint as checkpoint_module

    _, _, _, pre_dir, sus_dir, h_file = checkpoints
    passes, tqdm = [], checkpoint_module.tqdm
    monkeypatch.setattr(checkpoint_module, "tqdm", lambda *a, **kw: passes.append(kw.get("desc")) or tqdm(*a, **kw))
    reads, read = [], checkpoint_module.Checkpoint.read
    monkeypatch.setattr(checkpoint_module.Checkpoint, "read",
                        lambda self, name, *a, **kw: reads.append(name) or read(self, name, *a, **kw))
    # The default config reads in a pre-pass, no-Hessian its per-tensor means first, the literal one
    # in its histogram passes: none reads a tensor before the refusal.
    configs = (PurifyConfig(), PurifyConfig(ranking="no_hessian"), PurifyConfig.literal())
    for config in configs:
        with pytest.raises(CheckpointError, match=r"the reset count 10000000 is out of range \[0, \d+\]"):
            purify_checkpoint(pre_dir, sus_dir, h_file, str(tmp_path / "out"), config, num_reset=10_000_000,
                              progress=False)
    assert passes == [] and reads == [] and not os.path.exists(tmp_path / "out")
    for config in configs:  # the spies see the passes and reads where they run
        passes.clear(), reads.clear()
        purify_checkpoint(pre_dir, sus_dir, h_file, str(tmp_path / "out"), config, num_reset=3, progress=False,
                          overwrite=True)
        assert reads and passes


def test_streaming_writer_matches_the_safetensors_format(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(4, dtype=torch.int64), "c": torch.randn(7).bfloat16(),
               "d": torch.zeros(0, 2)}
    path = str(tmp_path / "x.safetensors")
    writer = ShardWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], {"format": "pt"})
    for n, t in tensors.items():
        writer.write(n, t)
    writer.close()
    loaded = load_file(path)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    ckpt = Checkpoint(path)
    assert all(torch.equal(ckpt.read(n), t) for n, t in tensors.items())
    assert torch.equal(ckpt.read("a", 4, 7), tensors["a"].reshape(-1)[4:11])
    # written in pieces, the same file
    pieces = str(tmp_path / "y.safetensors")
    writer = ShardWriter(pieces, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], {"format": "pt"})
    for n, t in tensors.items():
        for piece in t.reshape(-1).split(4):
            writer.write_part(n, piece)
    writer.close()
    assert open(pieces, "rb").read() == open(path, "rb").read()
    writer = ShardWriter(str(tmp_path / "z.safetensors"), [("a", torch.float32, (3, 5))], {})
    with pytest.raises(AssertionError, match="out of order"):
        writer.write_part("b", torch.zeros(3))
    with pytest.raises(AssertionError, match="never written completely"):
        writer.close()


def test_bad_checkpoints_fail_clearly_and_leave_nothing(checkpoints, tmp_path):
    pre, suspect, hessian, pre_dir, sus_dir, h_file = checkpoints
    out = tmp_path / "out"

    def fails(message, *args, **kw):
        with pytest.raises((CheckpointError, ValueError, FileExistsError), match=message):
            purify_checkpoint(*args, str(out), progress=False, **kw)
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".partial-" in p]

    fails("does not exist", str(tmp_path / "nope"), sus_dir, h_file)
    partial_h = str(tmp_path / "partial_h.safetensors")
    save_file({n: h for n, h in hessian.items() if n != "layer1.weight"}, partial_h)
    fails("has no tensor 'layer1.weight'", pre_dir, sus_dir, partial_h)
    truncated = str(tmp_path / "truncated.safetensors")
    with open(h_file, "rb") as f:
        raw = f.read()
    with open(truncated, "wb") as f:
        f.write(raw[: len(raw) // 2])
    fails("truncated or corrupt", pre_dir, sus_dir, truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04\x95not safetensors at all")
    fails("not a safetensors file", pre_dir, sus_dir, str(garbage))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({}, pickled / "pytorch_model.bin")
    fails("holds no .safetensors file", pre_dir, str(pickled), h_file)
    # pre-trained tensors in another floating dtype are read rounded to the suspect's (float64 here:
    # exact); they were refused
    other = save_sharded({n: t.double() for n, t in pre.items()}, tmp_path / "other", [list(pre)])
    purify_checkpoint(other, sus_dir, h_file, str(tmp_path / "from_double"), progress=False)
    purify_checkpoint(pre_dir, sus_dir, h_file, str(tmp_path / "from_float"), progress=False)
    got, want = read_dir(tmp_path / "from_double"), read_dir(tmp_path / "from_float")
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)
    integer = save_sharded({n: t.to(torch.int32) for n, t in pre.items()}, tmp_path / "integer", [list(pre)])
    fails("is torch.int32, where the suspect's", integer, sus_dir, h_file)
    renamed = save_sharded({"model." + n: t for n, t in pre.items()}, tmp_path / "renamed", [["model." + n for n in pre]])
    fails("mismatched architectures", renamed, sus_dir, h_file)  # no name matches
    nan_h = str(tmp_path / "nan.safetensors")
    save_file({**hessian, "norm.weight": torch.full((33,), float("nan"))}, nan_h)
    fails("NaN or Inf", pre_dir, sus_dir, nan_h)
    os.makedirs(out)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        purify_checkpoint(pre_dir, sus_dir, h_file, str(out), PurifyConfig.literal(), progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_value_checks_catch_every_bad_value():
    """The one-reduction checks of the pieces (min and max) refuse NaN, +-Inf and, in a Hessian, a
    negative value, in float32 and bfloat16, and let clean pieces, -0.0 and empty ones pass."""
    from finepurify_ext.checkpoint import CheckpointError, _check_finite, _check_hessian

    for dtype in (torch.float32, torch.bfloat16):
        clean = torch.rand(1001, generator=torch.Generator().manual_seed(9)).to(dtype)
        _check_finite(clean, "f", "t")
        _check_hessian(clean, "the Hessian f: tensor 't'")
        _check_hessian(torch.tensor([0.0, -0.0, 1.0], dtype=dtype), "h")
        _check_hessian(torch.zeros(0, dtype=dtype), "h")
        for bad in (float("nan"), float("inf"), -float("inf")):
            piece = clean.clone()
            piece[500] = bad
            with pytest.raises(CheckpointError, match="NaN or Inf"):
                _check_finite(piece, "f", "t")
            with pytest.raises(CheckpointError, match="the Hessian f"):
                _check_hessian(piece, "the Hessian f: tensor 't'")
        negative = clean.clone()
        negative[3] = -1e-3
        with pytest.raises(CheckpointError, match="negative"):
            _check_hessian(negative, "the Hessian f: tensor 't'")


def test_the_search_scores_on_the_cpu_where_the_device_lacks_a_run_candidates_kernel(monkeypatch):
    """Out of core on a device outside CANDIDATES_ON, the sample's one-pass search scores its
    pieces on the CPU (tests/test_cuda.py runs it with --device cuda against the CPU's files); the
    histogram passes on the device only where the CPU lacks it too."""
    from finepurify_ext import checkpoint as checkpoint_module

    search_device = checkpoint_module.search_device
    monkeypatch.setattr(checkpoint_module, "CANDIDATES_ON", ("cpu",))
    assert search_device("cuda") == search_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(checkpoint_module, "CANDIDATES_ON", ("cpu", "cuda"))
    assert search_device("cuda:1") == torch.device("cuda:1") and search_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(checkpoint_module, "CANDIDATES_ON", ())
    assert search_device("cuda") is None and search_device("cpu") is None


def _model_checkpoints(model, tmp_path, embedding, extra=None):
    """``model`` saved as the pre-trained checkpoint, a drifted copy as the suspect (both with their
    config, the suspect with ``extra`` tensors added to its file), and a random Hessian of its
    parameters."""
    from finepurify_ext.hessian import save_hessian

    model.save_pretrained(tmp_path / "pre", safe_serialization=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "suspect", safe_serialization=True)
    if extra:
        state = load_file(tmp_path / "suspect" / "model.safetensors")
        save_file({**state, **extra}, tmp_path / "suspect" / "model.safetensors", metadata={"format": "pt"})
    state = load_file(tmp_path / "suspect" / "model.safetensors")
    hessian = {n: torch.rand(t.shape, generator=g) ** 3 for n, t in state.items() if n not in (extra or {})}
    hessian[embedding][:4] = 0  # tokens the clean data never reaches
    save_hessian(str(tmp_path / "h.safetensors"), hessian, 1)
    return tmp_path / "pre", tmp_path / "suspect", tmp_path / "h.safetensors"


def test_the_input_embedding_is_the_models_and_tensors_it_never_loads_are_copied(tmp_path):
    """Out of core finds the input embedding as in memory (get_input_embeddings of the model the
    config describes: BART's model.shared, which no usual suffix names), and copies tensors of an
    old GPT-2 file that transformers does not load (attention-mask buffers; the Hessian has no
    values for them) instead of refusing the checkpoint."""
    from transformers import BartConfig, BartForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    bart = BartForSequenceClassification(BartConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=16, decoder_ffn_dim=16, vocab_size=24, max_position_embeddings=32, num_labels=2,
        bos_token_id=0, eos_token_id=2, pad_token_id=1, decoder_start_token_id=2))
    pre, suspect, h = _model_checkpoints(bart, tmp_path / "bart", "model.shared.weight")
    report = purify_checkpoint(str(pre), str(suspect), str(h), str(tmp_path / "bart_out"), PurifyConfig(),
                               progress=False)
    assert report.embedding_tensor == "model.shared.weight" and report.embedding_rows_reset == 4

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=24, n_positions=16))
    buffers = {f"transformer.h.{i}.attn.{b}": t for i in range(2) for b, t in
               (("bias", torch.tril(torch.ones(1, 1, 16, 16))), ("masked_bias", torch.tensor(-1e4)))}
    pre, suspect, h = _model_checkpoints(gpt2, tmp_path / "gpt2", "transformer.wte.weight", extra=buffers)
    state = load_file(pre / "model.safetensors")
    save_file({**state, **buffers}, pre / "model.safetensors", metadata={"format": "pt"})
    report = purify_checkpoint(str(pre), str(suspect), str(h), str(tmp_path / "gpt2_out"), PurifyConfig(),
                               progress=False)
    out = load_file(tmp_path / "gpt2_out" / "model.safetensors")
    assert all(torch.equal(out[n], t) for n, t in buffers.items()) and set(buffers) <= set(report.copied_unscored)
    assert report.copied_unscored_weights == 0 and report.embedding_tensor == "transformer.wte.weight"
    # Without the config, a tensor the Hessian lacks is still refused (it may be a weight).
    os.remove(suspect / "config.json")
    with pytest.raises(CheckpointError, match="has no tensor 'transformer.h.0.attn."):
        purify_checkpoint(str(pre), str(suspect), str(h), str(tmp_path / "gpt2_out2"), PurifyConfig(), progress=False)
