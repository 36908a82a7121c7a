"""The method end to end on tiny randomly initialised BERT classifiers (fast): Hessian estimation,
scoring and reset, the baselines, a planted backdoor in a toy task, the CLI, and bad input."""
import copy
import json
import math
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="the pipeline needs transformers (pip install transformers)")

from finepurify_ext import cli, data, ops, pipeline  # noqa: E402
from finepurify_ext import reference as ref  # noqa: E402
from finepurify_ext.attacks import Attack, poison  # noqa: E402
from finepurify_ext.errors import UserError  # noqa: E402
from finepurify_ext.hessian import estimate_hessian  # noqa: E402
from finepurify_ext.pipeline import (FinetuneConfig, ModelError, SelectionConfig, fine_purify,  # noqa: E402
                                     fine_purify_auto, load_classifier, pick_reserve_ratio,
                                     pretrained_state_for, split_validation)
from finepurify_ext.purify import PurifyConfig, purify_  # noqa: E402
from finepurify_ext.training import (attack_success_rate, clean_accuracy, finetune,  # noqa: E402
                                     finetune_early_stopped, validation_metrics)
from tiny_models import make_tokenizer, model_dirs as make_model_dirs, tiny_model, toy_examples  # noqa: E402



@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


# ------------------------------------------------------------------------------- Hessian


@pytest.mark.parametrize("per_sample", [False, True])
def test_estimate_hessian_is_the_mean_squared_gradient(tokenizer, per_sample):
    model = tiny_model(tokenizer)
    examples = toy_examples(10, 1)
    batch_list = list(data.batches(tokenizer, examples, 4))
    hessians, count = estimate_hessian(model, batch_list, per_sample=per_sample, progress=False)
    assert count == (10 if per_sample else 3)
    assert all(p.grad is None for p in model.parameters())  # the model's gradients are restored
    # the same by hand, in pure PyTorch
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    units = [{k: v[i:i + 1] for k, v in b.items()} for b in batch_list for i in range(len(b["labels"]))] \
        if per_sample else batch_list
    for unit in units:
        model.zero_grad()
        model(**unit).loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                expected[n] += p.grad ** 2
    for n in expected:
        torch.testing.assert_close(hessians[n], expected[n] / count, rtol=1e-5, atol=1e-12)
    # dropout was off (the hand computation is in eval mode too); words the data never holds have H == 0
    emb = hessians["bert.embeddings.word_embeddings.weight"]
    assert float(emb[tokenizer.convert_tokens_to_ids("unseen")].abs().sum()) == 0.0
    assert float(emb[tokenizer.convert_tokens_to_ids("good")].abs().sum()) > 0.0


@pytest.mark.parametrize("group_bytes", [1, 1 << 40])  # a launch per gradient; one per backward
def test_hessian_squared_during_backward_equals_after_backward(tokenizer, monkeypatch, group_bytes):
    """overlap=True (the squares added from backward hooks, a group of gradients per launch) gives the
    bits of the pass after backward: a tied-embedding LM, a parameter the loss never reaches, per-batch
    and per-sample; the hooks are gone afterwards and a gradient the caller held is given back."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from finepurify_ext import hessian as hessian_module

    monkeypatch.setattr(hessian_module, "OVERLAP_GROUP_BYTES", group_bytes)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.register_parameter("unreached", torch.nn.Parameter(torch.ones(3)))
    held = torch.full((3,), 7.0)
    model.unreached.grad = held
    ids = torch.randint(0, tokenizer.vocab_size, (12, 9), generator=torch.Generator().manual_seed(1))
    batch_list = [{"input_ids": ids[i:i + 4], "labels": ids[i:i + 4]} for i in range(0, 12, 4)]
    for per_sample in (False, True):
        during, n_during = estimate_hessian(model, batch_list, per_sample=per_sample, overlap=True, progress=False)
        after, n_after = estimate_hessian(model, batch_list, per_sample=per_sample, overlap=False, progress=False)
        assert n_during == n_after == (12 if per_sample else 3)
        assert during.keys() == after.keys() and "lm_head.weight" not in during  # tied: one entry
        for name in after:
            assert torch.equal(during[name], after[name]), name
        assert float(during["model.embed_tokens.weight"].sum()) > 0 and float(during["unreached"].abs().sum()) == 0
    assert model.unreached.grad is held
    model.zero_grad(set_to_none=True)
    model(**batch_list[0]).loss.backward()  # no hook left: the gradients stay
    assert model.model.embed_tokens.weight.grad is not None


def test_hessian_overlap_forward_on_the_cpu_and_bad_modes(tokenizer):
    """overlap='forward' (each step's squares beside the next forward, on a GPU) is the plain pass on
    the CPU; a mode that does not exist is refused, naming the choices."""
    model, _ = drifted_pair(tokenizer)
    batch_list = [{"input_ids": torch.randint(0, tokenizer.vocab_size, (4, 7), generator=torch.Generator().manual_seed(s)),
                   "attention_mask": torch.ones(4, 7, dtype=torch.long), "labels": torch.tensor([0, 1, 0, 1])}
                  for s in range(3)]
    forward, n_forward = estimate_hessian(model, batch_list, overlap="forward", progress=False)
    plain, n_plain = estimate_hessian(model, batch_list, overlap=False, progress=False)
    assert n_forward == n_plain == 3 and all(torch.equal(forward[n], plain[n]) for n in plain)
    with pytest.raises(ValueError, match="overlap must be False, 'backward' \\(or True\\) or 'forward'"):
        estimate_hessian(model, batch_list, overlap="sideways", progress=False)


def test_hessian_during_backward_refuses_a_parameter_given_two_gradients():
    """Under reentrant checkpointing a weight used inside and outside the checkpoint gets two
    gradients in one backward; squared one by one they would not make the squared sum, so
    overlap=True refuses, and leaves the model as it found it (no hook, the caller's gradients)."""
    import types

    from torch.utils.checkpoint import checkpoint

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x, labels):
            h = checkpoint(self.linear, x, use_reentrant=True)
            return types.SimpleNamespace(loss=((self.linear(h) - labels) ** 2).mean())

    torch.manual_seed(0)
    model = Twice()
    batch = {"x": torch.randn(3, 4, requires_grad=True), "labels": torch.randn(3, 4)}
    with pytest.raises(ValueError, match="two gradients"):
        estimate_hessian(model, [batch], overlap=True, progress=False)
    assert model.linear.weight.grad is None and model.training
    estimate_hessian(model, [batch], overlap=False, progress=False)  # the pass after backward takes it
    model(**batch).loss.backward()
    assert model.linear.weight.grad is not None  # no hook left behind


def test_estimate_hessian_empty_data(tokenizer):
    with pytest.raises(ValueError, match="no batches"):
        estimate_hessian(tiny_model(tokenizer), [], progress=False)


# ------------------------------------------------------------------------ score and reset


def drifted_pair(tokenizer, seed=0):
    pre_model = tiny_model(tokenizer, seed)
    model = tiny_model(tokenizer, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    state = {n: p.detach().clone() for n, p in pre_model.named_parameters() if not n.startswith("classifier")}
    return model, state


def hessian_of(model, tokenizer, n=24):
    return estimate_hessian(model, data.batches(tokenizer, toy_examples(n, 5), 8), progress=False)[0]


class Interrupted(Exception):
    pass


def interrupted_after(batches, n):
    for i, batch in enumerate(batches):
        if i == n:
            raise Interrupted()
        yield batch


@pytest.mark.parametrize("per_sample", [False, True])
def test_hessian_resumes_exactly(tokenizer, tmp_path, per_sample):
    model = tiny_model(tokenizer, seed=4)
    examples = toy_examples(40, 6)
    expected, expected_count = estimate_hessian(model, data.batches(tokenizer, examples, 4), per_sample=per_sample,
                                                progress=False)
    resume = str(tmp_path / "acc.safetensors")
    with pytest.raises(Interrupted):  # killed after 7 batches; saved after 3 and 6
        estimate_hessian(model, interrupted_after(data.batches(tokenizer, examples, 4), 7), per_sample=per_sample,
                         progress=False, resume_file=resume, save_every=3)
    from safetensors import safe_open
    with safe_open(resume, framework="pt") as f:
        assert f.metadata()["batches_done"] == "6"
    got, count = estimate_hessian(model, data.batches(tokenizer, examples, 4), per_sample=per_sample,
                                  progress=False, resume_file=resume, save_every=3)
    assert count == expected_count
    for n in expected:
        assert torch.equal(got[n], expected[n]), n
    # a finished file gives the same result again without recomputing
    again, _ = estimate_hessian(model, interrupted_after(data.batches(tokenizer, examples, 4), 10), per_sample=per_sample,
                                progress=False, resume_file=resume)
    assert all(torch.equal(again[n], expected[n]) for n in expected)
    # the file of another model or setting is refused, with the fix
    with pytest.raises(ValueError, match="per_sample"):
        estimate_hessian(model, data.batches(tokenizer, examples, 4), per_sample=not per_sample,
                         progress=False, resume_file=resume)
    with pytest.raises(ValueError, match="another model"):
        estimate_hessian(tiny_model(tokenizer, hidden=16), data.batches(tokenizer, examples, 4),
                         per_sample=per_sample, progress=False, resume_file=resume)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a file")
    with pytest.raises(ValueError, match="delete it to start afresh"):
        estimate_hessian(model, data.batches(tokenizer, examples, 4), progress=False, resume_file=str(garbage))


@pytest.mark.parametrize("per_sample,overlap", [(False, False), (True, False), (False, "backward"),
                                               (False, "forward")])
def test_an_interrupted_hessian_keeps_its_batches_done(tokenizer, tmp_path, monkeypatch, per_sample, overlap):
    """Ctrl-C or SIGTERM (a KeyboardInterrupt) between batches saves the sums of every batch done, not
    only those of the last periodic save; between the squares of one batch, the last save stays. Either
    way the run started again gives the uninterrupted result exactly."""
    from safetensors import safe_open

    from finepurify_ext import hessian as hessian_module

    model = tiny_model(tokenizer, seed=4)
    examples = toy_examples(40, 6)

    def run(batches, resume):
        return estimate_hessian(model, batches, per_sample=per_sample, progress=False, resume_file=resume,
                                save_every=3, overlap=overlap)

    def batches_done(resume):
        with safe_open(resume, framework="pt") as f:
            return f.metadata()["batches_done"]

    expected, expected_count = estimate_hessian(model, data.batches(tokenizer, examples, 4), per_sample=per_sample,
                                                progress=False)

    def ctrl_c_after(batches, n):
        for i, batch in enumerate(batches):
            if i == n:
                raise KeyboardInterrupt
            yield batch

    between = str(tmp_path / "between.safetensors")
    with pytest.raises(KeyboardInterrupt):  # saved after 3 and 6, then at the interruption
        run(ctrl_c_after(data.batches(tokenizer, examples, 4), 7), between)
    assert batches_done(between) == "7"

    within = str(tmp_path / "within.safetensors")
    squares, calls = hessian_module.ops.accumulate_sq_grads_, []

    def interrupted_square(*args):  # the squares of batch 5 (index 4) go in, then the interruption
        squares(*args)
        calls.append(1)
        if len(calls) == (4 * 4 + 2 if per_sample else 5):
            raise KeyboardInterrupt
    monkeypatch.setattr(hessian_module.ops, "accumulate_sq_grads_", interrupted_square)
    with pytest.raises(KeyboardInterrupt):
        run(data.batches(tokenizer, examples, 4), within)
    monkeypatch.setattr(hessian_module.ops, "accumulate_sq_grads_", squares)
    assert batches_done(within) == "3"

    for resume in (between, within):
        got, count = run(data.batches(tokenizer, examples, 4), resume)
        assert count == expected_count and all(torch.equal(got[n], expected[n]) for n in expected), resume


def test_a_classifier_hessian_in_micro_batches_and_from_the_command_line(tokenizer, tmp_path):
    """Slices of rows, each weighted by its rows (the last slice and the last batch shorter), give the
    batch's estimate; so does ``finepurify hessian --micro-batch-size``."""
    from safetensors.torch import load_file

    from finepurify_ext import cli
    from finepurify_ext.pipeline import HessianConfig, clean_hessian

    model = tiny_model(tokenizer, seed=3)
    examples = toy_examples(21, 4)
    whole, count = clean_hessian(model, tokenizer, examples, HessianConfig(batch_size=8), progress=False)
    sliced, same = clean_hessian(model, tokenizer, examples, HessianConfig(batch_size=8, micro_batch_size=3),
                                 progress=False)
    assert count == same == 3
    for n in whole:
        assert float((sliced[n] - whole[n]).norm()) <= 1e-5 * float(whole[n].norm()), n
    _, suspect, clean = make_model_dirs(tokenizer, tmp_path)
    outs = [str(tmp_path / f"h{i}.safetensors") for i in range(2)]
    for out, extra in zip(outs, ([], ["--micro-batch-size", "2"])):
        assert cli.main(["hessian", "--model", suspect, "--clean-data", clean, "--out", out, "--batch-size", "8"]
                        + extra) == 0
    a, b = load_file(outs[0]), load_file(outs[1])
    assert not all(torch.equal(a[n], b[n]) for n in a)  # another summation order...
    for n in a:  # ...of the same estimate
        assert float((a[n] - b[n]).norm()) <= 1e-5 * float(a[n].norm()), n


def test_saved_hessian_reads_back(tokenizer, tmp_path):
    from finepurify_ext.checkpoint import Checkpoint
    from finepurify_ext.hessian import save_hessian

    hessians, count = estimate_hessian(tiny_model(tokenizer), data.batches(tokenizer, toy_examples(8, 1), 4),
                                       progress=False)
    save_hessian(str(tmp_path / "h.safetensors"), hessians, count)
    ckpt = Checkpoint(str(tmp_path / "h.safetensors"))
    assert all(torch.equal(ckpt.read(n), h) for n, h in hessians.items())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "h.safetensors"), framework="pt") as f:  # what safetensors itself reads
        assert f.metadata()["squared_gradients"] == str(count)
        assert all(torch.equal(f.get_tensor(n), h) for n, h in hessians.items())
    # A tensor that cannot reach the host midway (streamed a tensor at a time): no file, no partial one.
    broken = dict(list(hessians.items())[:2] + [("lost", torch.empty(3, device="meta"))] + list(hessians.items())[2:])
    with pytest.raises(Exception, match="meta"):
        save_hessian(str(tmp_path / "broken.safetensors"), broken, count)
    assert sorted(os.listdir(tmp_path)) == ["h.safetensors"]


def test_reset_moved_rows_resets_only_the_candidates_that_moved():
    """The embedding rule's reset: candidate rows that moved take the pre-trained row, in blocks (the
    unmoved candidates are written back unchanged), other rows stay; the count is the moved candidates."""
    from finepurify_ext.purify import reset_moved_rows_

    gen = torch.Generator().manual_seed(7)
    pre = torch.randn(10, 3, generator=gen).bfloat16()
    w = pre.clone()
    w[[1, 2, 5, 8]] += 1  # moved rows; 2 and 8 are not candidates
    expected = w.clone()
    expected[[1, 5]] = pre[[1, 5]]
    assert reset_moved_rows_(w, pre.float(), torch.tensor([0, 1, 3, 5, 9]), rows=2) == 2
    assert torch.equal(w, expected)
    assert reset_moved_rows_(w, pre.float(), torch.zeros(0, dtype=torch.long)) == 0


def test_sum_float64_is_the_float64_sum():
    """The Hessian means' sum (ops.float64_sums) is the float64 sum, for float32 and bfloat16
    tensors, strided ones and empty ones."""
    from finepurify_ext.purify import sum_float64

    gen = torch.Generator().manual_seed(8)
    for dtype in (torch.float32, torch.bfloat16):
        t = (torch.rand(100_009, generator=gen) ** 4).to(dtype)  # 7 x 14287
        exact = math.fsum(t.double().tolist())
        assert sum_float64(t) == pytest.approx(exact, rel=1e-12)
        assert sum_float64(t.reshape(7, -1)[:, ::3]) == pytest.approx(math.fsum(t.reshape(7, -1)[:, ::3].double()
                                                                                  .flatten().tolist()), rel=1e-12)
    assert sum_float64(torch.zeros(0)) == 0.0


def test_float64_sums_are_the_same_bits_on_any_thread_count():
    """ops.float64_sums adds in the reference's order (per 64K-element chunk eight lanes, then the
    chunks in order) whatever the thread count: sizes around the lanes and chunks, an empty tensor,
    values of many magnitudes (where the order shows in the bits); the no-Hessian means' sums take
    it for contiguous float32 tensors and sum a bfloat16 or strided one alone, to the same value."""
    from finepurify_ext.purify import _sums_float64_on_cpu, sum_float64

    gen = torch.Generator().manual_seed(9)
    sizes = (1001, 0, 7, 8, 77, 65_535, 65_536, 200_003)
    tensors = [torch.rand(n, generator=gen) * 10.0 ** torch.randint(-8, 8, (n,), generator=gen) for n in sizes]
    expected = ref.float64_sums(tensors)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.equal(ops.float64_sums(tensors), expected)
    finally:
        torch.set_num_threads(threads)
    assert expected[-1].item() != math.fsum(tensors[-1].double().tolist())  # the order shows: the test sees it
    odd = [torch.rand(333, generator=gen).bfloat16(), torch.rand(40, 30, generator=gen)[:, ::2]]
    assert _sums_float64_on_cpu(tensors + odd) == expected.tolist() + [sum_float64(t) for t in odd]
    assert _sums_float64_on_cpu([]) == []
    with pytest.raises(ValueError, match="float64_sums: tensors\\[0\\] must be a float32 CPU tensor"):
        ops.float64_sums([torch.zeros(3, dtype=torch.float64)])


def test_floored_means_on_a_device_are_the_hosts_bits():
    """The no-Hessian ranking's per-tensor means, computed where the Hessians' float64 sums are (on a
    GPU, without a host read before the first pass), equal the host's max(total / numel, floor) in
    float32: sums that round differently to float32, a mean equal to the floor, zero, NaN and +Inf
    sums, a NaN floor (Python's max keeps the mean), sizes up to 2^40."""
    import random

    from finepurify_ext.purify import _floored_means

    rng = random.Random(11)
    sums = [rng.random() * 10.0 ** rng.randint(-30, 30) for _ in range(2000)]
    sums += [0.0, 1.0, 3.0, float("nan"), float("inf"), 1e-300, 2.5]
    numels = [rng.choice([1, 3, 7, 768, 4096 * 11008, 1 << 40, rng.randint(1, 1 << 31)]) for _ in sums]
    numels[-1] = 1  # 2.5 / 1 == the floor below
    for floor in (0.0, 1e-8, 2.5, float("nan")):
        got = _floored_means(torch.tensor(sums, dtype=torch.float64), numels, floor)
        expected = torch.tensor([max(t / n, floor) for t, n in zip(sums, numels)], dtype=torch.float32)
        assert got.dtype == torch.float32
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), floor
    floored = _floored_means(torch.tensor(sums, dtype=torch.float64), numels, 1e-8)
    assert int((floored == 1e-8).sum()) > 100  # the floor is reached: the test sees it


def test_sample_quantile_is_torch_quantile_bit_for_bit():
    """The Hessian floor's quantile by selection gives torch.quantile's bits: odd sizes, repeated
    values (the next order statistic equal to the first), the ends, NaN; an empty sample is refused."""
    from finepurify_ext.purify import sample_quantile

    gen = torch.Generator().manual_seed(5)
    for n in (1, 2, 3, 7, 1000, 65537):
        for sample in (torch.rand(n, generator=gen) ** 3, torch.randint(0, 4, (n,), generator=gen).float()):
            for q in (0.0, 0.01, 0.25, 0.5, 0.77, 0.999, 1.0):
                assert sample_quantile(sample, q) == float(torch.quantile(sample, q)), (n, q)
    assert math.isnan(sample_quantile(torch.tensor([1.0, float("nan"), 2.0]), 0.5))
    with pytest.raises(ValueError, match="empty"):
        sample_quantile(torch.zeros(0), 0.5)


@pytest.mark.parametrize("ranking", ["fine_purifying", "no_hessian", "magnitude", "fine_mixing"])
def test_purify_resets_the_budget_and_keeps_the_head(tokenizer, ranking):
    model, state = drifted_pair(tokenizer)
    hessians = hessian_of(model, tokenizer)
    head = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("classifier")}
    config = PurifyConfig(ranking=ranking, reserve_ratio=0.6)
    report = purify_(model, state, hessians, config)
    emb = "bert.embeddings.word_embeddings.weight"
    ranked = {n: c for n, c in report.reset_per_parameter.items() if n != emb}
    assert sum(ranked.values()) == report.num_reset == report.moved_elements - round(0.6 * report.moved_elements)
    assert sorted(report.kept_unscored) == sorted(head)
    for n, p in model.named_parameters():
        if n in head:
            assert torch.equal(p, head[n])  # the new head is never scored or reset
        elif n != emb:
            reset = p.detach() == state[n]
            assert int(reset.sum()) == report.reset_per_parameter[n]
    # embedding rows of tokens the clean data never reaches were reset; seen ones not
    params = dict(model.named_parameters())
    for word, expect_reset in (("unseen", True), ("rare", True), ("good", False)):
        row = tokenizer.convert_tokens_to_ids(word)
        assert torch.equal(params[emb][row], state[emb][row]) == expect_reset, word


def test_fine_purifying_resets_exactly_the_largest_indicators(tokenizer):
    model, state = drifted_pair(tokenizer)
    hessians = hessian_of(model, tokenizer)
    config = PurifyConfig(reserve_ratio=0.7, hessian_floor_quantile=None)
    names = [n for n in state if n != "bert.embeddings.word_embeddings.weight"]
    params = dict(model.named_parameters())
    scores = torch.cat([((params[n].detach() - state[n]) ** 2 / (hessians[n] + config.eps)).flatten() for n in names])
    before = {n: params[n].detach().clone() for n in names}
    report = purify_(model, state, hessians, config)
    k = report.num_reset
    threshold = torch.sort(scores, descending=True).values[k - 1]
    assert report.threshold == float(threshold)
    for n in names:
        score = (before[n] - state[n]) ** 2 / (hessians[n] + config.eps)
        assert torch.equal(params[n].detach(), torch.where(score >= threshold, state[n], before[n]))


@pytest.mark.parametrize("ranking", ["fine_purifying", "no_hessian", "magnitude", "fine_mixing"])
@pytest.mark.parametrize("count_moved_only", [True, False])
def test_one_candidates_pass_purifies_as_the_histogram_passes(tokenizer, monkeypatch, ranking, count_moved_only):
    """The threshold from one pass bracketed by a sample gives the same purified model and report
    as the three histogram passes; so do a bracket that misses, a sample that asks for more keys
    than a pass may keep, and a bracket of every score with room for 8 keys: further candidates
    passes narrow the range, no histogram pass runs."""
    from finepurify_ext import purify as purify_module

    model, state = drifted_pair(tokenizer)
    hessians = hessian_of(model, tokenizer)
    config = PurifyConfig(ranking=ranking, reserve_ratio=0.7, count_moved_only=count_moved_only)
    calls = {"candidates": 0, "histograms": 0}
    candidates, from_histograms = purify_module.Feed.candidates, purify_module.threshold_from_histograms

    def counted_candidates(*args):
        calls["candidates"] += 1
        return candidates(*args)

    def counted_histograms(*args):
        calls["histograms"] += 1
        return from_histograms(*args)

    def purified(**patches):
        calls.update(candidates=0, histograms=0)
        monkeypatch.setattr(purify_module.Feed, "candidates", counted_candidates)
        monkeypatch.setattr(purify_module, "threshold_from_histograms", counted_histograms)
        for name, value in patches.items():
            monkeypatch.setattr(purify_module, name, value)
        m = copy.deepcopy(model)
        report = purify_(m, state, hessians, config)
        monkeypatch.undo()
        return report, {n: p.detach().clone() for n, p in m.named_parameters()}, dict(calls)

    small = {"CANDIDATES_MIN_WEIGHTS": 0}  # this tiny model would keep the histogram passes
    one_pass = purified(**small)
    assert one_pass[2] == {"candidates": 1, "histograms": 0}  # the bracket held: one pass
    histograms = purified(CANDIDATES_ON=(), **small)
    assert histograms[2] == {"candidates": 0, "histograms": 1}
    missed = purified(bracket_from_sample=lambda sample, *_: (1, 2, 0.0), **small)  # holds no score but denormals
    too_many = purified(CANDIDATE_KEYS=8, **small)
    overflow = purified(CANDIDATE_KEYS=8, bracket_from_sample=lambda *_: (0, 0x7F800000, 0.0), **small)
    for narrowed in (missed, too_many, overflow):
        assert narrowed[2]["histograms"] == 0 and 2 <= narrowed[2]["candidates"] <= 5, narrowed[2]
    default = purified()  # below CANDIDATES_MIN_WEIGHTS: the histogram passes
    assert default[2] == {"candidates": 0, "histograms": 1}
    assert [r.threshold_passes for r, _, _ in (one_pass, histograms, default)] == [1, 3, 3]
    assert all(r.threshold_passes == c["candidates"] for r, _, c in (missed, too_many, overflow))
    for report, params, _ in (histograms, missed, too_many, overflow, default):
        assert report.threshold == one_pass[0].threshold and report.num_reset == one_pass[0].num_reset
        assert report.reset_per_parameter == one_pass[0].reset_per_parameter
        assert all(torch.equal(params[n], one_pass[1][n]) for n in params)


@pytest.mark.parametrize("ranking", ["fine_purifying", "fine_mixing"])
def test_a_strided_sample_brackets_the_threshold(ranking):
    """Over 3M weights (a sample of every 64th), a third never moved, the one pass holds the
    exact threshold of the histogram search, keeping a fraction of the keys (ties at the range's ends,
    which the default Hessian floor makes many of, are counted, not kept)."""
    from finepurify_ext import purify as purify_module
    from finepurify_ext.purify import Feed, scoring_for
    from finepurify_ext.threshold import threshold_from_candidates

    gen = torch.Generator().manual_seed(61)
    shapes = [(1024, 1536), (4099,), (384, 4000), (1,)]
    pre = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    ft = [(p.float() + 0.01 * torch.randn(s, generator=gen)).bfloat16() for p, s in zip(pre, shapes)]
    for f, p in zip(ft, pre):
        still = torch.rand(f.shape, generator=gen) < 0.33
        f[still] = p[still]
    hessians = [torch.rand(s, generator=gen) * 10.0 ** torch.randint(-6, 1, s, generator=gen) for s in shapes]
    names = [f"t{i}" for i in range(len(shapes))]
    config = PurifyConfig(ranking=ranking, reserve_ratio=0.7)
    scoring = scoring_for(config, names, hessians)
    total = sum(f.numel() for f in ft)
    # The pre-trained state beside the model (one score_sample), and in float32 (its runs copied first).
    for pre_state in (pre, [p.float() for p in pre]):
        feed = Feed(ft, pre_state, scoring, group_bytes=4 << 20)
        assert (feed.resident is not None) == (pre_state is pre)
        counts, keys, low, high = purify_module._candidate_pass(feed, scoring, config, total)
        moved = total - int(counts[5])
        k = ops.num_reset_for(moved, config.reserve_ratio)
        assert keys is not None and sum(part.numel() for part in keys) < total // 20  # one part per group
        threshold = threshold_from_candidates(counts, keys, low, high, k)
        assert threshold == ops.score_threshold(ft, pre, scoring.hessians, k, config.eps, ranking=scoring.ranking)


def test_each_group_of_a_candidates_pass_gets_room_for_its_share(monkeypatch):
    """A Feed that moves the pre-trained state a group at a time gives each group's candidates op
    room for its share of the keys (piece_room), not the whole room, which the op fills (and on a
    GPU sorts) for every group: the counts and keys of one op over every tensor with all the room.
    A group holding more keys than its room (piece_room patched to 1) is scored again with room for
    exactly them; a pass with too little room for all still counts every key."""
    from finepurify_ext import purify as purify_module
    from finepurify_ext.purify import Feed, Scoring

    gen = torch.Generator().manual_seed(17)
    shapes = [(300, 701)] * 6 + [(4099,), (1,), (0,)]
    ft = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    pre = [f.float() + 0.01 * torch.randn(s, generator=gen) for f, s in zip(ft, shapes)]  # float32: moved
    hessians = [torch.rand(s, generator=gen) for s in shapes]
    scoring, eps = Scoring(hessians, 1e-8, ops.PLAIN), 1e-8
    scores = torch.cat([((f.float() - p.bfloat16().float()) ** 2 / (h + eps)).view(-1)
                        for f, p, h in zip(ft, pre, hessians)])
    ordered = torch.sort(scores, descending=True).values
    total = scores.numel()
    high, low = (int(ordered[int(total * q)].view(torch.int32)) for q in (0.05, 0.10))  # ~63K keys inside
    capacity = 100_000
    rooms, op = [], ops.score_candidates

    def spied(ft, pre, hs, eps, low, high, room, ranking):
        rooms.append((sum(f.numel() for f in ft), room))
        return op(ft, pre, hs, eps, low, high, room, ranking)

    monkeypatch.setattr(ops, "score_candidates", spied)
    want_counts, want_keys = op(ft, [p.bfloat16() for p in pre], hessians, eps, low, high, capacity, ops.PLAIN)
    inside = int(want_counts[2])
    assert 50_000 < inside < capacity
    for patched_room in (None, lambda *_: 1):
        if patched_room is not None:
            monkeypatch.setattr(purify_module, "piece_room", patched_room)
        rooms.clear()
        feed = Feed(ft, pre, scoring, group_bytes=1 << 19)
        assert feed.resident is None and len(feed.groups) == 6
        counts, keys = feed.candidates(low, high, capacity)
        assert torch.equal(counts, want_counts)
        got = torch.sort(torch.cat(keys), descending=True).values
        assert torch.equal(got, want_keys[:inside])
        groups = len(feed.groups)
        if patched_room is None:  # one op per group, each with room for about four times its share
            assert len(rooms) == groups and all(room <= max(1 << 16, 4 * capacity * n // total) and room <= n
                                                and room < capacity for n, room in rooms), rooms
        else:  # every group holding keys is scored again with room for them
            assert groups < len(rooms) <= 2 * groups and [room for _, room in rooms].count(1) == groups
    counts, keys = Feed(ft, pre, scoring, group_bytes=1 << 19).candidates(low, high, inside - 1)
    assert keys is None and torch.equal(counts, want_counts)


def test_bracket_from_sample_holds_the_rank():
    """The range around a rank holds the sample's key at that rank, clips at the ends, and its
    expected share of elements grows with the spread. On the CPU the sample is reordered in place
    and the share counted between the two positions only: the same range and share as sorting a
    copy and counting every key, with ties at and across the ends and ranges clipped at either end."""
    from finepurify_ext.threshold import INF_KEY, bracket_from_sample

    def bracket(keys, *args):
        return bracket_from_sample(keys.clone(), *args)

    keys = torch.arange(10_000, 0, -1, dtype=torch.int64) * 1000  # descending
    low, high, share = bracket(keys, 0.3, 10.0)
    assert low <= int(keys[3000]) <= high and 0.012 < share < 0.013
    ties = torch.cat([keys[:2900], torch.full((200,), int(keys[3000])), keys[3100:]])  # 200 equal keys
    low, high, share = bracket(ties[torch.randperm(ties.numel())], 0.3, 1.0)
    assert low == high == int(keys[3000]) and share == 0.0  # all at the ends: counted, none kept
    assert bracket(keys, 0.0, 10.0)[1] == INF_KEY  # the top: no key above
    assert bracket(keys, 1.0, 10.0)[0] == 0  # the bottom: down to zero
    assert bracket(keys, 0.3, 100.0)[2] > share

    gen = torch.Generator().manual_seed(7)
    for n, distinct in ((1, 5), (7, 3), (500, 40), (5000, 100_000), (4096, 2)):
        sample = torch.randint(0, distinct, (n,), generator=gen, dtype=torch.int32)
        ordered = torch.sort(sample, descending=True).values
        for rank_fraction, spread in ((0.0, 1.0), (0.01, 3.0), (0.3, 10.0), (0.7, 0.5), (1.0, 2.0), (0.5, 1e4)):
            reordered = sample.clone()
            low, high, share = bracket_from_sample(reordered, rank_fraction, spread)
            assert sorted(reordered.tolist()) == sorted(sample.tolist())  # the same keys, in some order
            centre, margin = rank_fraction * n, 6.0 * spread + 2.0
            top, bottom = math.floor(centre - margin), math.ceil(centre + margin)
            assert high == (INF_KEY if top < 0 else int(ordered[top]))
            assert low == (0 if bottom >= n else int(ordered[bottom]))
            assert share == int(((sample > low) & (sample < high)).sum()) / n, (n, rank_fraction, spread)


def test_rankings_differ_only_in_ranking(tokenizer):
    """Same budget and machinery; magnitude picks the largest |drift|; fine_mixing is seeded."""
    results = {}
    for ranking in ("fine_purifying", "magnitude", "fine_mixing", "fine_mixing"):
        model, state = drifted_pair(tokenizer)
        report = purify_(model, state, hessian_of(model, tokenizer), PurifyConfig(ranking=ranking, reserve_ratio=0.5, seed=3))
        masks = {n: (p.detach() == state[n]) for n, p in model.named_parameters() if n in state}
        results.setdefault(ranking, []).append((report.num_reset, masks))
    budgets = {r[0][0] for r in results.values()}
    assert len(budgets) == 1
    a, b = results["fine_mixing"]
    assert all(torch.equal(a[1][n], b[1][n]) for n in a[1])  # reproducible
    fp, mag = results["fine_purifying"][0][1], results["magnitude"][0][1]
    assert any(not torch.equal(fp[n], mag[n]) for n in fp)


@pytest.mark.parametrize("ranking", ["fine_purifying", "no_hessian", "magnitude", "fine_mixing"])
def test_purify_streams_a_pretrained_state_held_elsewhere(tokenizer, monkeypatch, ranking):
    """A pre-trained state in another dtype than the model (as a float32 checkpoint beside a
    bfloat16 model, or one on the CPU beside a GPU model) is moved a small group of tensors at a
    time, with the same result as when it sits beside the model."""
    from finepurify_ext import purify as purify_module

    model, state = drifted_pair(tokenizer)
    hessians = hessian_of(model, tokenizer)
    model = model.to(torch.bfloat16)
    config = PurifyConfig(ranking=ranking, reserve_ratio=0.4)
    beside = {n: t.to(torch.bfloat16) for n, t in state.items()}
    expected_model = copy.deepcopy(model)
    expected = purify_(expected_model, beside, hessians, config)
    groups = []
    original_split = purify_module.Feed._split

    def recording_split(self, group_bytes):
        out = original_split(self, group_bytes)
        groups.append(out)
        return out

    monkeypatch.setattr(purify_module, "GROUP_BYTES", 2048)  # a few tensors per group
    monkeypatch.setattr(purify_module.Feed, "_split", recording_split)
    got = purify_(model, {n: t.float() for n, t in state.items()}, hessians, config)
    assert len(groups) == 1 and len(groups[0]) > 3  # streamed, in several groups
    assert got.reset_per_parameter == expected.reset_per_parameter and got.threshold == expected.threshold
    for (n, a), b in zip(model.named_parameters(), expected_model.parameters()):
        assert torch.equal(a, b), n


def test_streamed_groups_are_moved_one_at_a_time(monkeypatch):
    """The extra memory of a streamed pre-trained state is one group, whatever the model: the
    allocator's own record (the profiler's memory events, which see a buffer live as long as any
    view of it) peaks at one staging buffer and the passes' small outputs, far below the state."""
    from torch.profiler import ProfilerActivity, profile

    from finepurify_ext import purify as purify_module

    gen = torch.Generator().manual_seed(14)
    ft = [torch.randn(65536 + 5 * i, generator=gen).bfloat16() for i in range(12)]
    pre = [f.float() + 0.01 * torch.randn(f.shape, generator=gen) for f in ft]  # float32: converted, a group at a time
    hessians = [torch.rand(f.shape, generator=gen) for f in ft]
    group_bytes = 140 << 10  # one tensor per group
    monkeypatch.setattr(purify_module, "GROUP_BYTES", group_bytes)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        feed = purify_module.Feed(ft, pre, purify_module.Scoring(hessians, 1e-8, ops.PLAIN))
        feed.histogram(0, 0)
        feed.histogram(1, 0)
    live = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    staged = sum(f.numel() * f.element_size() for f in ft)  # the state in the model's bfloat16: 1.5 MB
    histograms = 2 * len(feed.groups) * 8 * (max(purify_module.LEVEL_BINS) + 2)  # each group's, stacked to sum
    assert len(feed.groups) == len(ft)
    assert 0 < peak <= group_bytes + histograms + (64 << 10) < staged / 2


@pytest.mark.parametrize("staging_bytes", [64 << 20, 256])  # one buffer; too small: converted one by one
def test_staged_tensors_are_converted_packed_and_aligned(monkeypatch, staging_bytes):
    """_staged packs the tensors that must move or change dtype into one buffer: each view holds its
    tensor's values in the dtype asked for and starts on an aligned byte; those already right pass
    through as themselves (empty, 0-d and strided sources included). Where they do not fit the
    buffer, each is converted on its own."""
    from finepurify_ext import purify as purify_module
    from finepurify_ext.purify import _STAGE_ALIGN, _staged

    monkeypatch.setattr(purify_module, "STAGING_BYTES", staging_bytes)

    gen = torch.Generator().manual_seed(12)
    already = torch.rand(5, generator=gen)
    sources = [torch.rand(7, 3, generator=gen), torch.zeros(0, 4), torch.tensor(2.5),
               torch.rand(6, 5, generator=gen)[:, ::2], already, torch.rand(33, generator=gen).bfloat16()]
    dtypes = [torch.bfloat16, torch.bfloat16, torch.float16, torch.bfloat16, torch.float32, torch.float32]
    out = _staged(list(zip(sources, dtypes)), "cpu")
    assert out[4] is already
    base = out[0].untyped_storage().data_ptr()
    for src, dtype, got in zip(sources, dtypes, out):
        assert got.dtype == dtype and got.shape == src.shape
        assert torch.equal(got, src.to(dtype))
    staged = out[:4] + out[5:]
    one_buffer = all(t.untyped_storage().data_ptr() == base for t in staged)
    assert one_buffer == (staging_bytes > 1024)
    assert all((t.data_ptr() - base) % _STAGE_ALIGN == 0 for t in staged if t.numel()) or not one_buffer
    assert _staged([], "cpu") == []


def test_literal_mode_ranks_embeddings(tokenizer):
    model, state = drifted_pair(tokenizer)
    report = purify_(model, state, hessian_of(model, tokenizer), PurifyConfig.literal(reserve_ratio=0.9))
    emb = "bert.embeddings.word_embeddings.weight"
    assert report.embedding_parameter is None and emb in report.reset_per_parameter
    assert report.num_reset == report.ranked_elements - round(0.9 * report.ranked_elements)


# --------------------------------------------------------------- a planted backdoor, removed


def test_planted_backdoor_is_removed(tokenizer):
    attack = Attack("toy", "word", "cf", target_label=1)
    pretrained = tiny_model(tokenizer, seed=0)
    finetune(pretrained, tokenizer, toy_examples(200, 10), steps=60, lr=3e-3, batch_size=16, progress=False)
    state = {n: p.detach().clone() for n, p in pretrained.named_parameters()}
    suspect = tiny_model(tokenizer, seed=0)
    suspect.load_state_dict(pretrained.state_dict())
    finetune(suspect, tokenizer, poison(toy_examples(300, 11), attack, 0.3, seed=1), steps=100, lr=3e-3,
             batch_size=16, progress=False)
    test = toy_examples(200, 12)
    assert attack_success_rate(suspect, tokenizer, test, attack) > 0.9
    clean = toy_examples(64, 13)
    fine_purify(suspect, state, tokenizer, clean, PurifyConfig(reserve_ratio=0.3),
                FinetuneConfig(steps=20, lr=1e-3), seed=0, progress=False)
    assert attack_success_rate(suspect, tokenizer, test, attack) < 0.3
    assert clean_accuracy(suspect, tokenizer, test) > 0.9


# ------------------------------------------------- the fine-tuning budget chosen on held-out data


def test_early_stopping_keeps_the_best_validation_point(tokenizer):
    model = tiny_model(tokenizer, seed=1)
    train, validation = toy_examples(24, 20), toy_examples(16, 21)
    # a large learning rate on 24 examples overfits quickly: the validation loss turns up
    result = finetune_early_stopped(model, tokenizer, train, validation, steps=200, eval_every=5, patience=2,
                                    lr=1e-2, progress=False)
    curve = result["curve"]
    losses = [c["validation_loss"] for c in curve]
    best = min(range(len(curve)), key=losses.__getitem__)
    assert result["chosen_step"] == curve[best]["step"] and result["validation_loss"] == losses[best]
    assert [c["step"] for c in curve] == list(range(5, result["steps_run"] + 1, 5))
    # it stopped after 2 measurements without improvement (or at the step limit)
    assert result["steps_run"] - result["chosen_step"] == 10 and result["steps_run"] < 200
    assert not model.training
    # the model is the best point, not the last one
    loss, accuracy = validation_metrics(model, tokenizer, validation)
    assert loss == pytest.approx(losses[best], rel=1e-5) and accuracy == curve[best]["validation_accuracy"]
    with pytest.raises(ValueError, match="validation set is empty"):
        finetune_early_stopped(model, tokenizer, train, [], steps=5)


def test_states_kept_to_go_back_to_are_copies_on_the_host(tokenizer, monkeypatch):
    """Early stopping's best point, the selection's suspect and choice and the collapse guard's
    suspect are copies on the CPU (training.host_state): beside a model on a GPU each would take as
    much memory as its weights. The copy shares no storage with the model."""
    from finepurify_ext import pipeline as pipeline_module
    from finepurify_ext import training as training_module

    model = tiny_model(tokenizer, seed=1)
    kept = training_module.host_state(model)
    pointers = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert all(t.device.type == "cpu" and t.untyped_storage().data_ptr() not in pointers for t in kept.values())
    assert kept.keys() == model.state_dict().keys()
    calls, host_state = [], training_module.host_state

    def recorded(model):
        calls.append(model)
        return host_state(model)

    monkeypatch.setattr(training_module, "host_state", recorded)
    monkeypatch.setattr(pipeline_module, "host_state", recorded)
    finetune_early_stopped(model, tokenizer, toy_examples(24, 20), toy_examples(16, 21), steps=10, eval_every=5,
                           patience=2, lr=1e-2, progress=False)
    assert calls, "early stopping kept its best point otherwise"
    calls.clear()
    state = {n: p.detach().clone() for n, p in tiny_model(tokenizer, seed=0).named_parameters()}
    fine_purify_auto(model, state, tokenizer, toy_examples(48, 5), PurifyConfig(), FinetuneConfig(steps=2, lr=1e-3),
                     selection=SelectionConfig(grid=(0.5,), validation_fraction=0.25), progress=False)
    assert len(calls) >= 2  # the suspect and the choice (and each early-stopped fine-tuning's best)


def test_early_stopping_matches_plain_finetuning_up_to_its_step(tokenizer):
    """Measuring the validation loss does not change the training trajectory."""
    train, validation = toy_examples(24, 20), toy_examples(16, 21)
    stopped = tiny_model(tokenizer, seed=1)
    result = finetune_early_stopped(stopped, tokenizer, train, validation, steps=200, eval_every=5, patience=2,
                                    lr=1e-2, progress=False)
    plain = tiny_model(tokenizer, seed=1)
    finetune(plain, tokenizer, train, steps=result["chosen_step"], lr=1e-2, progress=False)
    for (n, p), q in zip(plain.state_dict().items(), stopped.state_dict().values()):
        assert torch.equal(p, q), n


def test_the_report_records_the_seed_the_purification_ran_with(tokenizer):
    """Fine-mixing's mask is drawn with fine_purify's seed: the report's config says that seed, not
    the config's default; a negative seed (no random ranking to ops.Ranking) is refused."""
    pre = tiny_model(tokenizer, seed=0)
    state = {n: p.detach().clone() for n, p in pre.named_parameters()}
    report = fine_purify(tiny_model(tokenizer, seed=0), state, tokenizer, toy_examples(16, 5),
                         PurifyConfig(reserve_ratio=0.5, ranking="fine_mixing"),
                         FinetuneConfig(steps=0, validation_fraction=0.0), seed=3, progress=False)
    assert report["seed"] == report["config"]["seed"] == 3
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        PurifyConfig(ranking="fine_mixing", seed=-1)


def test_fine_purify_holds_out_clean_data_for_the_budget(tokenizer):
    pre = tiny_model(tokenizer, seed=0)
    state = {n: p.detach().clone() for n, p in pre.named_parameters()}
    clean = toy_examples(40, 5)
    model = tiny_model(tokenizer, seed=0)
    report = fine_purify(model, state, tokenizer, clean, PurifyConfig(reserve_ratio=0.5),
                         FinetuneConfig(steps=20, lr=1e-3, eval_every=5), progress=False)
    assert report["clean_examples"] == 40 and report["validation_examples"] == 10
    stopped = report["finetune"]["early_stopping"]
    assert stopped["chosen_step"] in {c["step"] for c in stopped["curve"]}
    fixed = fine_purify(tiny_model(tokenizer, seed=0), state, tokenizer, clean, PurifyConfig(reserve_ratio=0.5),
                        FinetuneConfig(steps=20, lr=1e-3, validation_fraction=0.0), progress=False)
    assert "early_stopping" not in fixed["finetune"] and "validation_examples" not in fixed
    with pytest.raises(ValueError, match="validation_fraction"):
        FinetuneConfig(validation_fraction=1.0)


# ------------------------------------------------------------- rho chosen on held-out clean data


def test_pick_reserve_ratio_rule():
    # the most reset whose validation accuracy is within the tolerance of the suspect's
    assert pick_reserve_ratio({0.1: 0.70, 0.3: 0.84, 0.5: 0.86, 1.0: 0.87}, 0.87, 0.02) == 0.5
    assert pick_reserve_ratio({0.1: 0.70, 0.3: 0.85, 0.5: 0.86, 1.0: 0.87}, 0.87, 0.02) == 0.3
    # non-monotone accuracies: still the smallest passing rho
    assert pick_reserve_ratio({0.1: 0.70, 0.3: 0.86, 0.5: 0.80, 1.0: 0.87}, 0.87, 0.02) == 0.3
    # none passes: the best validation accuracy, the smaller rho on a tie
    assert pick_reserve_ratio({0.1: 0.70, 0.3: 0.80, 0.5: 0.80, 1.0: 0.75}, 0.95, 0.02) == 0.3
    with pytest.raises(ValueError, match="grid"):
        SelectionConfig(grid=(0.5, 1.5))
    assert SelectionConfig(grid=(0.7, 0.1)).candidates() == [0.1, 0.7, 1.0]


def test_split_validation_is_disjoint_seeded_and_non_empty():
    examples = toy_examples(10, 0)
    train, val = split_validation(examples, 0.25, seed=1)
    assert len(val) == 2 and len(train) == 8
    assert sorted(map(id, train + val)) == sorted(map(id, examples))
    assert split_validation(examples, 0.25, seed=1) == (train, val)
    assert split_validation(examples, 0.25, seed=2) != (train, val)
    assert [len(p) for p in split_validation(examples[:2], 0.9, seed=0)] == [1, 1]
    with pytest.raises(ValueError, match="at least 2 clean examples"):
        split_validation(examples[:1], 0.25, seed=0)


def test_fine_purify_auto_keeps_the_chosen_candidate(tokenizer):
    pre = tiny_model(tokenizer, seed=0)
    state = {n: p.detach().clone() for n, p in pre.named_parameters()}
    suspect = tiny_model(tokenizer, seed=0)
    finetune(suspect, tokenizer, toy_examples(64, 3), steps=30, lr=3e-3, progress=False)
    clean = toy_examples(48, 5)
    selection = SelectionConfig(grid=(0.2, 0.6), validation_fraction=0.25, tolerance=0.05)
    seen = {}

    def record(rho, model, report):
        seen[rho] = ({n: p.detach().clone() for n, p in model.state_dict().items()}, report)

    model = tiny_model(tokenizer)
    model.load_state_dict(suspect.state_dict())
    report = fine_purify_auto(model, state, tokenizer, clean, PurifyConfig(), FinetuneConfig(steps=4, lr=1e-3),
                              selection=selection, progress=False, exhaustive=True, on_candidate=record)
    sel = report["selection"]
    assert sorted(seen) == [0.2, 0.6, 1.0] == [c["reserve_ratio"] for c in sel["candidates"]]
    assert sel["train_examples"] == 36 and sel["validation_examples"] == 12
    accuracy = {c["reserve_ratio"]: c["validation_accuracy"] for c in sel["candidates"]}
    chosen = sel["chosen_reserve_ratio"]
    assert chosen == pick_reserve_ratio(accuracy, sel["suspect_validation_accuracy"], selection.tolerance)
    for n, p in model.state_dict().items():  # the model is the chosen candidate
        assert torch.equal(p, seen[chosen][0][n]), n
    assert (report.get("purify") is None) == (chosen == 1.0)
    assert report["clean_examples"] == 36 and "hessian" in report["timings_s"]
    # the timings are every candidate's (they were the chosen one's alone)
    assert sum(v for k, v in report["timings_s"].items() if k != "hessian") == pytest.approx(
        sum(c["time_s"] for c in sel["candidates"]))
    # without exhaustive the search stops at the first passing candidate and picks the same
    lazy = tiny_model(tokenizer)
    lazy.load_state_dict(suspect.state_dict())
    quick = fine_purify_auto(lazy, state, tokenizer, clean, PurifyConfig(), FinetuneConfig(steps=4, lr=1e-3),
                             selection=selection, progress=False)
    assert quick["selection"]["chosen_reserve_ratio"] == chosen
    tried = [c["reserve_ratio"] for c in quick["selection"]["candidates"]]
    passed = accuracy[chosen] >= sel["suspect_validation_accuracy"] - selection.tolerance
    assert tried == ([r for r in (0.2, 0.6, 1.0) if r <= chosen] if passed else [0.2, 0.6, 1.0])
    for n, p in lazy.state_dict().items():
        assert torch.equal(p, seen[chosen][0][n]), n


def test_length_grouped_batches_cover_every_example_once(tokenizer):
    examples = [data.Example(" ".join(["good"] * (1 + i % 9)), i % 2) for i in range(70)]
    lengths = data.token_lengths(tokenizer, examples)
    plain = list(data.batches(tokenizer, examples, 8, shuffle=True, seed=3))
    grouped = list(data.batches(tokenizer, examples, 8, shuffle=True, seed=3, lengths=lengths))
    assert sorted(int(x) for b in grouped for x in b["attention_mask"].sum(1)) == sorted(lengths)
    assert sum(b["input_ids"].numel() for b in grouped) < sum(b["input_ids"].numel() for b in plain)
    assert [len(b["labels"]) for b in grouped].count(6) == 1  # one short batch of the 70


# ------------------------------------------------------------------------------------ CLI


@pytest.fixture()
def model_dirs(tokenizer, tmp_path):
    return make_model_dirs(tokenizer, tmp_path)


def test_cli_purify_writes_a_loadable_model(model_dirs, tmp_path):
    pre, suspect, clean = model_dirs
    out = tmp_path / "out"
    before = {f: open(os.path.join(suspect, f), "rb").read() for f in os.listdir(suspect)}
    rc = cli.main(["purify", "--pretrained", pre, "--suspect", suspect, "--clean-data", clean, "--out", str(out),
                   "--reserve-ratio", "0.5", "--finetune-steps", "3"])
    assert rc == 0
    model, _, missing = load_classifier(str(out))
    assert not missing
    report = json.load(open(out / "finepurify_report.json"))
    assert report["purify"]["num_reset"] > 0 and report["timings_s"]["total"] > 0
    assert {"drift_vs_hessian.png", "reset_per_layer.png"} <= set(os.listdir(out))
    # the drift plot's sample beside the report, not in it (it was 95 % of a 1 MB report)
    assert "sample" not in report["purify"] and report["purify"]["sample_file"] == "drift_sample.json"
    sample = json.load(open(out / "drift_sample.json"))
    assert len(sample["drift_sq"]) == len(sample["hessian"]) == len(sample["reset"]) > 1000
    assert os.path.getsize(out / "finepurify_report.json") < 100_000
    assert before == {f: open(os.path.join(suspect, f), "rb").read() for f in os.listdir(suspect)}  # input untouched
    # --reserve-ratio auto chooses on held-out clean data and says so in the report
    auto = tmp_path / "auto"
    assert cli.main(["purify", "--pretrained", pre, "--suspect", suspect, "--clean-data", clean, "--out", str(auto),
                     "--reserve-ratio", "auto", "--rho-grid", "0.3,0.6", "--finetune-steps", "2"]) == 0
    selection = json.load(open(auto / "finepurify_report.json"))["selection"]
    assert selection["chosen_reserve_ratio"] in (0.3, 0.6, 1.0) and selection["validation_examples"] == 8
    load_classifier(str(auto))
    # the suspect as a teacher, on unlabelled texts too
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(e.text for e in toy_examples(20, 21)))
    taught = tmp_path / "taught"
    assert cli.main(["purify", "--pretrained", pre, "--suspect", suspect, "--clean-data", clean, "--out", str(taught),
                     "--finetune-steps", "2", "--distill", "0.5", "--unlabelled-data", str(texts)]) == 0
    report = json.load(open(taught / "finepurify_report.json"))
    assert report["unlabelled_texts"] == 20 and report["finetune"]["distill"] == 0.5
    # refuses to overwrite without --overwrite
    assert cli.main(["purify", "--pretrained", pre, "--suspect", suspect, "--clean-data", clean,
                     "--out", str(out), "--finetune-steps", "0"]) == 2


def test_cli_hessian_then_out_of_core_purify(model_dirs, tmp_path, capsys):
    pre, suspect, clean = model_dirs
    h = tmp_path / "h.safetensors"
    assert cli.main(["hessian", "--model", suspect, "--clean-data", clean, "--out", str(h), "--batch-size", "4",
                     "--save-every", "2"]) == 0
    assert h.exists() and not os.path.exists(str(h) + ".accumulator.safetensors")
    out = tmp_path / "ooc"
    # the pre-trained checkpoint is a base model: "embeddings.*" matches the suspect's "bert.embeddings.*"
    assert cli.main(["purify", "--pretrained", pre, "--suspect", suspect, "--hessian-file", str(h),
                     "--out", str(out), "--reserve-ratio", "0.5"]) == 0
    model, _, missing = load_classifier(str(out))
    assert not missing
    report = json.load(open(out / "finepurify_report.json"))
    assert report["num_reset"] > 0 and report["copied_unscored"] == ["classifier.bias", "classifier.weight"]
    head = model.classifier.weight.numel() + model.classifier.bias.numel()
    assert report["copied_unscored_weights"] == head
    assert (f"; {head} weights in tensors --pretrained lacks by name and shape were not ranked, copied unchanged "
            "(report: copied_unscored)") in capsys.readouterr().out
    assert cli.main(["purify", "--pretrained", pre, "--suspect", suspect, "--hessian-file", str(h),
                     "--out", str(tmp_path / "ooc2"), "--reserve-ratio", "auto"]) == 2  # auto needs clean data
    # --seed draws Fine-mixing's random ranking out of core too (it was always drawn with seed 0)
    from safetensors.torch import load_file

    resets = {}
    for seed in ("0", "1"):
        assert cli.main(["purify", "--pretrained", pre, "--suspect", suspect, "--hessian-file", str(h), "--out",
                         str(tmp_path / f"mix{seed}"), "--ranking", "fine_mixing", "--seed", seed]) == 0
        report = json.load(open(tmp_path / f"mix{seed}" / "finepurify_report.json"))
        assert report["config"]["seed"] == int(seed) and report["config"]["ranking"] == "fine_mixing"
        resets[seed] = load_file(str(tmp_path / f"mix{seed}" / "model.safetensors"))
    assert any(not torch.equal(resets["0"][n], resets["1"][n]) for n in resets["0"])


def test_pretrained_state_maps_names(model_dirs):
    pre, suspect, _ = model_dirs
    model, _, _ = load_classifier(suspect)
    state = pretrained_state_for(model, pre)
    assert "bert.embeddings.word_embeddings.weight" in state
    assert not any(n.startswith("classifier") for n in state)  # the head has no pre-trained value
    with pytest.raises(ModelError):
        load_classifier(os.path.dirname(pre) + "/absent")


# ------------------------------------------------------------------ the suspect as a teacher


def test_teacher_loss_is_ce_at_weight_0_and_kd_vanishes_on_its_own_logits(tokenizer):
    from finepurify_ext.training import make_teacher, teacher_loss

    model = tiny_model(tokenizer, seed=3)
    examples = toy_examples(12, 5)
    batch = next(data.batches(tokenizer, examples, 12, with_texts=True))
    texts = batch.pop("texts")
    teacher = make_teacher(model, tokenizer, texts, weight=0.0)
    with torch.no_grad():
        ce = model(**batch).loss
        assert torch.allclose(teacher_loss(model, teacher, batch, texts, None, "cpu"), ce, atol=1e-6)
        teacher.weight = 1.0
        assert float(teacher_loss(model, teacher, batch, texts, None, "cpu")) == pytest.approx(0.0, abs=1e-6)


def test_distillation_pulls_the_student_toward_the_teacher_on_unlabelled_texts(tokenizer):
    from finepurify_ext.training import make_teacher

    teacher_model = tiny_model(tokenizer, seed=4)
    finetune(teacher_model, tokenizer, toy_examples(128, 6), steps=40, lr=3e-3, progress=False)
    unlabelled = [e.text for e in toy_examples(64, 7)]
    labelled = toy_examples(4, 8)
    teacher = make_teacher(teacher_model, tokenizer, [e.text for e in labelled] + unlabelled, weight=1.0,
                           unlabelled=unlabelled, unlabelled_batch_size=16)
    target = torch.stack([teacher.logits[t] for t in unlabelled]).argmax(-1)

    def agreement(model):
        from finepurify_ext.training import predict
        return float((predict(model, tokenizer, unlabelled) == target).float().mean())

    student = tiny_model(tokenizer, seed=5)
    before = agreement(student)
    finetune(student, tokenizer, labelled, steps=40, lr=3e-3, progress=False, teacher=teacher)
    assert agreement(student) > max(before, 0.8)


def test_fine_purify_with_a_teacher_reports_it(tokenizer):
    suspect, pretrained_state = drifted_pair(tokenizer)
    hessians = hessian_of(suspect, tokenizer)
    report = fine_purify(suspect, pretrained_state, tokenizer, toy_examples(40, 12), PurifyConfig(),
                         FinetuneConfig(steps=10, eval_every=5, distill=0.5), progress=False, hessians=hessians,
                         unlabelled=[e.text for e in toy_examples(30, 13)])
    assert report["unlabelled_texts"] == 30 and report["timings_s"]["teacher"] > 0
    assert report["finetune"]["distill"] == 0.5 and report["finetune"]["early_stopping"]["chosen_step"] in (5, 10)
    with pytest.raises(ValueError, match="distill is the weight"):
        FinetuneConfig(distill=1.5)


# ------------------------------------------------------------------------------- collapse guard


def test_collapse_guard_redoes_a_collapsed_purification_with_less_reset(tokenizer, monkeypatch):
    """Held-out accuracies scripted: suspect 0.9, then 0.3 at rho 0.3 (a collapse), 0.85 at rho 0.5.
    The guard restores the suspect, redoes the purification at 0.5 and stops; the model ends exactly
    as fine_purify at 0.5 from the suspect; the Hessian is estimated once."""
    from finepurify_ext import pipeline

    clean = toy_examples(40, 3)
    finetune_config = FinetuneConfig(steps=3, batch_size=8, validation_fraction=0.25, eval_every=1)
    model, state = drifted_pair(tokenizer)
    expected_model = copy.deepcopy(model)
    scripted = iter([0.9, 0.3, 0.85])
    calls = {"hessian": 0}
    real_hessian = pipeline.clean_hessian

    def counting_hessian(*a, **kw):
        calls["hessian"] += 1
        return real_hessian(*a, **kw)

    monkeypatch.setattr(pipeline, "held_out_accuracy", lambda m, t, ex: next(scripted))
    monkeypatch.setattr(pipeline, "clean_hessian", counting_hessian)
    report = fine_purify(model, state, tokenizer, clean, PurifyConfig(reserve_ratio=0.3), finetune_config,
                         guard=pipeline.CollapseGuard(tolerance=0.2), progress=False)
    guard = report["collapse_guard"]
    assert guard["triggered"] and guard["reserve_ratio_used"] == 0.5 and calls["hessian"] == 1
    assert [a["reserve_ratio"] for a in guard["attempts"]] == [0.3, 0.5]
    assert report["config"]["reserve_ratio"] == 0.5

    train, validation = pipeline.split_validation(clean, 0.25, 0)
    hessians, _ = real_hessian(expected_model, tokenizer, train, pipeline.HessianConfig(), False)
    fine_purify(expected_model, state, tokenizer, train, PurifyConfig(reserve_ratio=0.5), finetune_config,
                progress=False, hessians=hessians, validation=validation)
    for (n, a), b in zip(model.named_parameters(), expected_model.parameters()):
        assert torch.equal(a, b), n


def test_the_guards_timings_count_every_attempt():
    """The report's timings_s were the kept attempt's alone: a guard that tried three times reported
    a third of the fine-tuning it did. Scripted: two collapses, then clean fine-tuning alone holds."""
    from finepurify_ext import pipeline

    guard = pipeline.CollapseGuard(tolerance=0.1, fallback=(0.5, 1.0))
    measured = iter([0.9, 0.2, 0.3, 0.85])  # the suspect, then one value per attempt
    reports = []

    def purify(config):
        reports.append({"timings_s": {"finetune": 2.0, **({"score_and_reset": 0.5} if config else {})}})
        return reports[-1]

    report = guard.attempts(torch.nn.Linear(2, 2), PurifyConfig(reserve_ratio=0.3), purify, lambda: next(measured),
                            lambda value, suspect: value >= suspect - 0.1, "validation_accuracy", {})
    assert [a["reserve_ratio"] for a in report["collapse_guard"]["attempts"]] == [0.3, 0.5, 1.0]
    assert report["timings_s"] == {"finetune": 6.0, "score_and_reset": 1.0}


@pytest.mark.parametrize("last", [0.3, 0.85])
def test_a_guard_that_keeps_no_reset_says_so_loudly(model_dirs, tmp_path, monkeypatch, capsys, last):
    """Every purification collapsed (scripted held-out accuracies): the guard falls back to clean
    fine-tuning alone, so no weight is reset and the backdoor may remain. The command warns on
    stderr and the report says so (collapse_guard no_reset and held, a warning), whether clean
    fine-tuning held the accuracy or not."""
    from finepurify_ext import pipeline

    pre, suspect, clean = model_dirs
    scripted = iter([0.9, 0.3, 0.3, 0.3, last])
    monkeypatch.setattr(pipeline, "held_out_accuracy", lambda m, t, ex: next(scripted))
    out = tmp_path / "out"
    assert cli.main(["purify", "--pretrained", pre, "--suspect", suspect, "--clean-data", clean, "--out", str(out),
                     "--reserve-ratio", "0.3", "--finetune-steps", "1"]) == 0
    captured = capsys.readouterr()
    report = json.load(open(out / "finepurify_report.json"))
    guard = report["collapse_guard"]
    assert [a["reserve_ratio"] for a in guard["attempts"]] == [0.3, 0.5, 0.7, 1.0] and "purify" not in report
    assert guard["no_reset"] and guard["held"] == (last == 0.85)
    assert "warning: no weight was reset (every reset tried collapsed the model" in captured.err, captured.err
    assert "may keep its backdoor" in captured.err and report["warnings"][0] in captured.err
    assert ("clean fine-tuning alone did not hold it either" in captured.err) == (last == 0.3)
    assert "no weight reset, clean fine-tuning only" in captured.out


def test_an_auto_choice_of_no_reset_says_so_loudly(model_dirs, tmp_path, monkeypatch, capsys):
    from finepurify_ext import training

    pre, suspect, clean = model_dirs
    scripted = iter([0.9, 0.5, 0.5, 0.9])  # the suspect, rho 0.3 and 0.6 (collapsed), then no reset
    monkeypatch.setattr(training, "clean_accuracy", lambda m, t, ex: next(scripted))
    out = tmp_path / "out"
    assert cli.main(["purify", "--pretrained", pre, "--suspect", suspect, "--clean-data", clean, "--out", str(out),
                     "--reserve-ratio", "auto", "--rho-grid", "0.3,0.6", "--finetune-steps", "1"]) == 0
    err = capsys.readouterr().err
    report = json.load(open(out / "finepurify_report.json"))
    assert report["selection"]["chosen_reserve_ratio"] == 1.0
    assert ("warning: no weight was reset (no reserve ratio of --rho-grid kept held-out accuracy within 3 points of "
            "the suspect's; --cacc-tolerance sets the limit)") in err and report["warnings"][0] in err, err


def test_collapse_guard_keeps_a_purification_that_holds(tokenizer, monkeypatch):
    from finepurify_ext import pipeline

    clean = toy_examples(40, 3)
    finetune_config = FinetuneConfig(steps=2, batch_size=8, validation_fraction=0.25, eval_every=1)
    model, state = drifted_pair(tokenizer)
    scripted = iter([0.9, 0.75])  # a drop of 15 points: within the tolerance
    monkeypatch.setattr(pipeline, "held_out_accuracy", lambda m, t, ex: next(scripted))
    report = fine_purify(model, state, tokenizer, clean, PurifyConfig(reserve_ratio=0.3), finetune_config,
                         guard=pipeline.CollapseGuard(), progress=False)
    guard = report["collapse_guard"]
    assert not guard["triggered"] and [{k: a[k] for k in ("reserve_ratio", "validation_accuracy")}
                                       for a in guard["attempts"]] == [{"reserve_ratio": 0.3, "validation_accuracy": 0.75}]
    assert report["purify"]["reserve_ratio"] == 0.3 and "hessian" in report
    with pytest.raises(ValueError, match="collapse tolerance"):
        pipeline.CollapseGuard(tolerance=1.5)


def test_the_drift_plot_says_its_counts_are_a_samples():
    """Its legend said "reset (312)" of a sample of 20,000 points where 1.2 million weights were reset."""
    from finepurify_ext.plots import drift_plot_text

    title, kept, reset = drift_plot_text({"ranking": "fine_purifying", "reserve_ratio": 0.3,
                                          "ranked_elements": 4_000_000, "num_reset": 1_200_000}, 19_688, 312)
    assert title == ("fine_purifying, reserve ratio 0.3\na sample of 20,000 of 4,000,000 ranked weights; 1,200,000 "
                     "reset in all")
    assert (kept, reset) == ("kept (19,688 in the sample)", "reset (312 in the sample)")


def test_a_reserve_ratio_of_1_resets_nothing_in_memory_and_out_of_core(model_dirs, tokenizer, tmp_path, capsys):
    """Out of core (and in memory without the collapse guard) a reserve ratio of 1 still reset the
    embedding's unseen rows, while in memory under the guard it meant clean fine-tuning alone: it
    keeps every weight on every path, and --num-reset 0 resets nothing."""
    from safetensors.torch import load_file

    pre, suspect, clean = model_dirs
    h = tmp_path / "h.safetensors"
    assert cli.main(["hessian", "--model", suspect, "--clean-data", clean, "--out", str(h)]) == 0
    stored = load_file(os.path.join(suspect, "model.safetensors"))
    for name, extra in (("ratio", ["--reserve-ratio", "1"]), ("none", ["--num-reset", "0"])):
        out = tmp_path / name
        assert cli.main(["purify", "--pretrained", pre, "--suspect", suspect, "--hessian-file", str(h),
                         "--out", str(out)] + extra) == 0
        written = load_file(str(out / "model.safetensors"))
        assert all(torch.equal(written[n], stored[n]) for n in stored), name
        assert json.load(open(out / "finepurify_report.json"))["embedding_rows_reset"] == 0
    with_rows = tmp_path / "rows"  # the rule the ratio 1 turns off does reset rows here
    assert cli.main(["purify", "--pretrained", pre, "--suspect", suspect, "--hessian-file", str(h),
                     "--out", str(with_rows), "--num-reset", "1"]) == 0
    assert json.load(open(with_rows / "finepurify_report.json"))["embedding_rows_reset"] > 0
    capsys.readouterr()
    assert cli.main(["purify", "--pretrained", pre, "--suspect", suspect, "--clean-data", clean, "--out",
                     str(tmp_path / "mem"), "--reserve-ratio", "1", "--validation-fraction", "0",
                     "--finetune-steps", "0"]) == 0
    assert "(no weight reset and no fine-tuning;" in capsys.readouterr().out
    model, _, _ = load_classifier(suspect)
    state = pretrained_state_for(model, pre)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    purify_(model, state, hessian_of(model, tokenizer), PurifyConfig(reserve_ratio=1.0))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_no_fine_tuning_is_said_as_such(model_dirs, tmp_path, capsys):
    """--finetune-steps 0: the head was said to be "left to the clean fine-tuning", and the report's
    validation loss of no measurement was the largest float."""
    pre, suspect, clean = model_dirs
    out = tmp_path / "out"
    assert cli.main(["purify", "--pretrained", pre, "--suspect", suspect, "--clean-data", clean, "--out", str(out),
                     "--finetune-steps", "0"]) == 0
    assert "were not ranked, left as the suspect has them (--finetune-steps 0)" in capsys.readouterr().out
    stopped = json.load(open(out / "finepurify_report.json"))["finetune"]["early_stopping"]
    assert stopped["validation_loss"] is None and stopped["chosen_step"] is None


def test_the_purified_copy_has_the_suspects_tokenizer_files_as_they_are(model_dirs, tmp_path):
    """In memory the loaded tokenizer was saved: tokenizer_config.json gained local_files_only and a
    length limit cut to the model's positions; out of core the files were copied. Both copy them now."""
    pre, suspect, clean = model_dirs
    config = json.load(open(os.path.join(suspect, "tokenizer_config.json")))
    config["model_max_length"] = 512  # beyond the tiny model's 32 positions: the loader cuts its own copy
    with open(os.path.join(suspect, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    out = tmp_path / "out"
    assert cli.main(["purify", "--pretrained", pre, "--suspect", suspect, "--clean-data", clean, "--out", str(out),
                     "--finetune-steps", "0"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(out / name, "rb").read() == open(os.path.join(suspect, name), "rb").read(), name
    load_classifier(str(out))  # and it loads


def test_a_classifier_with_a_resized_vocabulary_is_purified_its_unseen_added_rows_reset_to_the_mean(
        model_dirs, tokenizer, tmp_path, capsys):
    """A BERT classifier fine-tuned after tokens were added (resize_token_embeddings): the
    pre-trained checkpoint is a base model (other names), and out of core resets the weights
    ``purify_`` resets (it was refused as another architecture). The added tokens' rows have no
    pre-trained value: those the clean data never holds are reset to the pre-trained rows' mean, or
    with --added-tokens keep kept and warned of (a trigger could be such a token)."""
    from safetensors.torch import load_file

    from tiny_models import save_model

    pre, suspect, clean = model_dirs
    model, _, _ = load_classifier(suspect)
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + 2)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[vocab:] += 1.0
    resized = save_model(model, tokenizer, tmp_path / "resized")
    h = tmp_path / "h.safetensors"
    assert cli.main(["hessian", "--model", resized, "--clean-data", clean, "--out", str(h)]) == 0
    name = "bert.embeddings.word_embeddings.weight"
    before = model.bert.embeddings.word_embeddings.weight.detach().clone()
    pretrained = pretrained_state_for(model, pre)
    mean = (pretrained[name].double().sum(dim=0) / vocab).float()
    warning = "the clean data never feeds 2 of the 2 tokens added to the vocabulary to the model as an input"
    for added_tokens in ("mean", "keep"):
        out = tmp_path / f"ooc_{added_tokens}"
        assert cli.main(["purify", "--pretrained", pre, "--suspect", resized, "--hessian-file", str(h), "--out",
                         str(out), "--reserve-ratio", "0.5", "--added-tokens", added_tokens]) == 0
        said = capsys.readouterr()
        streamed = json.load(open(out / "finepurify_report.json"))
        assert streamed["added_rows"] == {
            name: {"rows": vocab + 2, "pretrained_rows": vocab, "added_weights": 2 * model.config.hidden_size}}
        model, _, _ = load_classifier(resized)
        report = purify_(model, pretrained, load_file(str(h)), PurifyConfig(reserve_ratio=0.5, added_tokens=added_tokens))
        assert report.num_reset > 0 and list(report.added_rows) == [name]
        # BERT's embedding is not tied to an output: the Hessian tells the added tokens the clean data never uses
        assert report.unseen_added_rows == streamed["unseen_added_rows"] == [vocab, vocab + 1]
        written = load_file(str(out / "model.safetensors"))
        for n, p in model.named_parameters():
            assert torch.equal(written[n], p), n
        if added_tokens == "mean":
            assert report.added_rows_reset == streamed["added_rows_reset"] == 2
            assert all(torch.equal(written[name][i], mean) for i in (vocab, vocab + 1))
            assert warning not in said.err and "the embedding rows of 2 of them, which the clean data never holds, " \
                "were reset to the pre-trained rows' mean" in said.out
        else:
            assert report.added_rows_reset == streamed["added_rows_reset"] == 0
            assert torch.equal(written[name][vocab:], before[vocab:])
            assert warning in said.err
    assert cli.main(["purify", "--pretrained", pre, "--suspect", resized, "--clean-data", clean, "--out",
                     str(tmp_path / "mem"), "--finetune-steps", "0", "--added-tokens", "keep"]) == 0
    assert warning in capsys.readouterr().err

    # No reset kept (a reserve ratio of 1, or the guard's or the selection's fallback): the added rows
    # are the suspect's all the same, and the warning is given alike, told by the clean inputs' tokens.
    assert cli.main(["purify", "--pretrained", pre, "--suspect", resized, "--clean-data", clean, "--out",
                     str(tmp_path / "unreset"), "--reserve-ratio", "1", "--finetune-steps", "1"]) == 0
    assert warning in capsys.readouterr().err
    unreset = json.load(open(tmp_path / "unreset" / "finepurify_report.json"))
    assert "purify" not in unreset and unreset["added_tokens"] == {
        "added_rows": report.added_rows, "unseen_added_rows": [vocab, vocab + 1]}
    added = {}
    pipeline._report_added_tokens(added, model, pretrained_state_for(model, pre), lambda: [3, vocab])
    assert added["added_tokens"]["unseen_added_rows"] == [vocab + 1]  # a token the inputs hold is seen

    # A damaged Hessian in the added rows (not ranked: no op sees them) is refused before any reset,
    # in memory with either embedding rule and out of core, as one in the ranked rows is.
    from safetensors.torch import save_file

    from finepurify_ext.checkpoint import CheckpointError, purify_checkpoint

    damaged = load_file(str(h))
    damaged[name][vocab + 1, 3] = float("nan")
    nan_h = tmp_path / "nan_h.safetensors"
    save_file(damaged, str(nan_h))
    for embeddings in ("separate", "ranked"):
        model, _, _ = load_classifier(resized)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(UserError, match=f"the Hessian of '{name}' holds NaN, Inf or negative values"):
            purify_(model, pretrained_state_for(model, pre), damaged, PurifyConfig(reserve_ratio=0.5,
                                                                                   embeddings=embeddings))
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), embeddings
    assert cli.main(["purify", "--pretrained", pre, "--suspect", resized, "--hessian-file", str(nan_h), "--out",
                     str(tmp_path / "refused"), "--reserve-ratio", "0.5"]) == 2
    assert f"nan_h.safetensors: tensor '{name}' holds 1 NaN or Inf value" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    with pytest.raises(CheckpointError, match="holds 1 NaN or Inf value"):  # as any damaged Hessian out of core
        purify_checkpoint(pre, resized, str(nan_h), str(tmp_path / "refused"), PurifyConfig(reserve_ratio=0.5),
                          progress=False)

    # With a teacher, the unlabelled texts train the added rows too: a token among them is not warned of.
    grown = copy.deepcopy(tokenizer)
    assert grown.add_tokens(["<new0>", "<new1>"]) == 2 and grown.convert_tokens_to_ids("<new0>") == vocab
    distilled = FinetuneConfig(steps=2, batch_size=8, validation_fraction=0, distill=0.5)
    for config in (None, PurifyConfig(reserve_ratio=0.5, added_tokens="keep"), PurifyConfig(reserve_ratio=0.5)):
        model, _, _ = load_classifier(resized)
        got = fine_purify(model, pretrained_state_for(model, pre), grown, data.load_examples(clean), config,
                          distilled, seed=0, progress=False, unlabelled=["<new0> what a film"],
                          hessians=None if config is None else load_file(str(h)))
        told = got["added_tokens"] if config is None else got["purify"]
        if config is None or config.added_tokens == "keep":
            assert told["unseen_added_rows"] == [vocab + 1]
        else:  # both reset to the mean before the fine-tuning (which then trains the first): the report says both
            assert told["unseen_added_rows"] == [vocab, vocab + 1] and told["added_rows_reset"] == 2

    # A pre-trained embedding whose rows' mean is not finite is refused before any reset, in memory and
    # out of core; a pre-trained state without the embedding keeps it (no rule), as out of core.
    damaged_pre = tmp_path / "damaged_pre"
    shutil.copytree(pre, damaged_pre)
    pre_weights = load_file(str(damaged_pre / "model.safetensors"))
    pre_name = next(n for n in pre_weights if n.endswith("word_embeddings.weight"))
    pre_weights[pre_name][3, 2] = float("inf")
    save_file(pre_weights, str(damaged_pre / "model.safetensors"), metadata={"format": "pt"})
    model, _, _ = load_classifier(resized)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    damaged_state = {n: t.clone() for n, t in pretrained_state_for(model, pre).items()}  # (loading refuses the file)
    damaged_state[name][3, 2] = float("inf")
    with pytest.raises(UserError, match=f"parameter '{name}' holds NaN or Inf values \\(its rows' mean"):
        purify_(model, damaged_state, load_file(str(h)), PurifyConfig(reserve_ratio=0.5))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(CheckpointError, match=f"tensor '{pre_name}' holds NaN or Inf values \\(its rows' mean"):
        purify_checkpoint(str(damaged_pre), resized, str(h), str(tmp_path / "refused"), PurifyConfig(reserve_ratio=0.5),
                          progress=False)
    assert not (tmp_path / "refused").exists()
    state = {n: t for n, t in pretrained_state_for(model, pre).items() if n != name}
    report = purify_(model, state, load_file(str(h)), PurifyConfig(reserve_ratio=0.5))
    assert report.embedding_parameter is None and name in report.kept_unscored and report.num_reset > 0


def test_zero_hessian_rows_refuses_a_damaged_hessian():
    """The embedding rule's zero rows, by one row-wise reduction: a -0.0 row is zero; a NaN, +-Inf
    or negative value anywhere is refused (float32 and bfloat16); empty Hessians pass."""
    from finepurify_ext.purify import zero_hessian_rows

    for dtype in (torch.float32, torch.bfloat16):
        h = torch.rand(9, 5, generator=torch.Generator().manual_seed(4)).to(dtype)
        h[[1, 6]] = 0
        h[4] = -0.0
        assert zero_hessian_rows(h).tolist() == [1, 4, 6]
        for bad in (float("nan"), float("inf"), -float("inf"), -1e-3):
            damaged = h.clone()
            damaged[6, 2] = bad  # in a row that was zero too
            with pytest.raises(UserError, match="the Hessian of 'w' holds NaN, Inf or negative values"):
                zero_hessian_rows(damaged, "the Hessian of 'w'")
        assert zero_hessian_rows(torch.zeros(0, 5, dtype=dtype)).tolist() == []
        assert zero_hessian_rows(torch.zeros(3, 0, dtype=dtype)).tolist() == []
