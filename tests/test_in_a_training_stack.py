"""The Python API as a training stack calls it: a compiled or DDP-wrapped model, the caller's own
random generators, train/eval modes, gradients, grad mode and frozen parameters, a process that is
not offline. What a call finds it leaves as it was, and a wrapper does not turn it into a no-op."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from finepurify_ext import data
from finepurify_ext.errors import UserError
from finepurify_ext.hessian import estimate_hessian, every_parameter_estimated
from finepurify_ext.pipeline import FinetuneConfig, fine_purify
from finepurify_ext.purify import PurifyConfig, purify_

from tiny_models import make_tokenizer, tiny_model, toy_examples


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def drifted(tokenizer):
    """A 'suspect' moved from its 'pre-trained' model, and that model's state (no classifier head)."""
    pre, model = tiny_model(tokenizer, 0), tiny_model(tokenizer, 0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    return model, {n: p.detach().clone() for n, p in pre.named_parameters() if not n.startswith("classifier")}


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "layers"])
def test_a_wrapped_model_is_purified_by_its_modules_names(tokenizer, wrap):
    """torch.compile names a parameter "_orig_mod.<name>" and DDP/DataParallel "module.<name>": no
    pre-trained tensor matched, and purify_ reset nothing without a word. Estimated and purified
    through the wrapper now, the weights are the plain model's to the bit. A wrapper around a layer
    (activation checkpointing, a compiled layer) renamed that layer's weights alone: left unranked."""
    model, state = drifted(tokenizer)
    plain = copy.deepcopy(model)
    if wrap == "compile":
        wrapper = torch.compile(model, backend="eager")  # the names are what count, not the compiler
    elif wrap == "data_parallel":
        wrapper = torch.nn.DataParallel(model)
    else:  # wrappers around layers: activation checkpointing's, a compiled layer
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        layers = model.bert.encoder.layer
        layers[0] = checkpoint_wrapper(layers[0])
        layers[1] = torch.compile(layers[1], backend="eager")
        wrapper = model
    batches = list(data.batches(tokenizer, toy_examples(16, 5), 8))
    hessians, _ = estimate_hessian(wrapper, batches, progress=False)
    expected_hessians, _ = estimate_hessian(plain, batches, progress=False)
    assert hessians.keys() == expected_hessians.keys()
    config = PurifyConfig(reserve_ratio=0.5)
    report = purify_(wrapper, state, hessians, config)
    expected = purify_(plain, state, expected_hessians, config)
    assert report.num_reset == expected.num_reset > 0
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name


def test_a_pre_trained_state_that_names_no_parameter_is_refused(tokenizer):
    """A base model's state (no "bert." prefix) for a classifier, or an empty one: nothing matched,
    and purify_ returned having reset nothing."""
    model, state = drifted(tokenizer)
    hessians, _ = estimate_hessian(model, data.batches(tokenizer, toy_examples(8, 5), 8), progress=False)
    before = copy.deepcopy(model.state_dict())
    for given in ({n.removeprefix("bert."): t for n, t in state.items()}, {}):
        with pytest.raises(UserError, match="no parameter of the model has a pre-trained tensor of its name and "
                                            "shape"):
            purify_(model, given, hessians, PurifyConfig())
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_fine_purify_leaves_the_callers_generators_modes_gradients_and_grad_mode(tokenizer):
    """fine_purify reseeded the global torch generator (callers seeded 1 and 2 drew alike after it),
    left the model in eval mode (dropout off in the caller's training loop), added a pending gradient
    into its first step and dropped it; under torch.no_grad() it failed in autograd."""
    clean = toy_examples(24, 3)
    finetune_config = FinetuneConfig(steps=3, validation_fraction=0.25, eval_every=1)

    def purified(prepare=lambda model: None, around=None, seed=None):
        model, state = drifted(tokenizer)  # (tiny_model seeds the generator itself)
        prepare(model)
        if seed is not None:
            torch.manual_seed(seed)
        with around or torch.enable_grad():
            fine_purify(model, state, tokenizer, clean, PurifyConfig(), finetune_config, progress=False)
        return model

    reference = purified()
    for seed in (1, 2):
        model = purified(seed=seed)
        after = torch.rand(4)
        torch.manual_seed(seed)
        assert torch.equal(after, torch.rand(4)), "the caller's generator was reseeded"
        # and the fine-tuning's own draws do not follow the caller's seed
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    pending = {}

    def in_training_with_a_pending_gradient(model):
        model.train()
        model.bert.embeddings.eval()  # a caller's mixed modes (a frozen norm, say)
        p = model.classifier.weight
        p.grad = pending["grad"] = torch.ones_like(p)

    model = purified(in_training_with_a_pending_gradient)
    assert model.training and not model.bert.embeddings.training and model.bert.encoder.training
    assert model.classifier.weight.grad is pending["grad"] and torch.equal(pending["grad"], torch.ones(1, 1).expand_as(
        pending["grad"]))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name  # neither the modes nor the pending gradient changed the result
    under_no_grad = purified(around=torch.no_grad())
    assert all(torch.equal(p, q) for p, q in zip(under_no_grad.parameters(), reference.parameters()))
    with pytest.raises(ValueError, match="inference_mode"):
        purified(around=torch.inference_mode())


def test_estimate_hessian_refusing_its_arguments_leaves_the_model_as_found(tokenizer):
    """Its argument checks came after it had set eval mode and dropped the gradients."""
    model = tiny_model(tokenizer)
    model.train()
    pending = model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    with pytest.raises(ValueError, match="micro_batch_size must be at least 1"):
        estimate_hessian(model, data.batches(tokenizer, toy_examples(8, 5), 8), micro_batch_size=0, progress=False)
    assert model.training and model.classifier.weight.grad is pending


def test_fine_purify_refuses_a_ddp_replica(tokenizer, tmp_path):
    """Its module would be fine-tuned on each rank alone: the replicas drift apart (a helper's two
    gloo ranks: 0.016 apart after one call)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, state = drifted(tokenizer)
        replica = torch.nn.parallel.DistributedDataParallel(model)
        with pytest.raises(ValueError, match="a DDP replica would be fine-tuned on each rank alone"):
            fine_purify(replica, state, tokenizer, toy_examples(16, 3), PurifyConfig(),
                        FinetuneConfig(steps=1, validation_fraction=0), progress=False)
    finally:
        dist.destroy_process_group()


def test_a_frozen_parameter_is_estimated_and_ranked_and_stays_frozen(tokenizer):
    """A parameter frozen in the caller's stack (a fine-tune that froze the embeddings) got no
    Hessian, and fine_purify failed: "no Hessian for parameter ...; estimate it on this model"."""
    model, state = drifted(tokenizer)
    frozen = model.bert.embeddings.word_embeddings.weight
    frozen.requires_grad_(False)
    report = fine_purify(model, state, tokenizer, toy_examples(16, 3), PurifyConfig(embeddings="ranked"),
                         FinetuneConfig(steps=1, validation_fraction=0), progress=False)
    assert not frozen.requires_grad
    assert report["purify"]["reset_per_parameter"]["bert.embeddings.word_embeddings.weight"] > 0
    # purify_ itself names the cause where the caller's Hessians leave a frozen parameter out
    hessians, _ = estimate_hessian(model, data.batches(tokenizer, toy_examples(8, 5), 8), progress=False)
    with pytest.raises(ValueError, match="it has requires_grad=False"):
        purify_(model, state, hessians, PurifyConfig(embeddings="ranked"))


def test_importing_the_library_leaves_the_hub_online():
    """The library set HF_HUB_OFFLINE=1 for the whole process on import: a caller's own downloads
    failed afterwards. Only the command line (and make demo) is offline; the loaders read local
    directories only (local_files_only)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = ("import os, finepurify_ext.pipeline, finepurify_ext.demo, finepurify_ext.demo_llm, "
            "finepurify_ext.checkpoint; print(os.environ.get('HF_HUB_OFFLINE'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None"


def test_a_cached_demo_model_is_its_keys_alone(tokenizer, tmp_path, monkeypatch):
    """The demo's models are cached by a key; a new head drawn from the global generator was drawn
    from wherever earlier work had left it (before this change, a fine-tuning's leftover state), so
    the same key built another model in another run's history. Seeded by the key now."""
    from transformers import BertForSequenceClassification

    from finepurify_ext.demo import cached_model
    from finepurify_ext.pipeline import load_classifier

    unseeded = tiny_model(tokenizer).config

    def base():  # a classifier head drawn from the global generator, as the demo's base is
        return BertForSequenceClassification(unseeded).eval(), tokenizer

    built = []
    for history in (1, 2):
        monkeypatch.setenv("FINEPURIFY_CACHE", str(tmp_path / f"cache{history}"))
        torch.manual_seed(history)
        model, _ = cached_model({"test": "key"}, lambda m, t: None, "test", load=lambda path: load_classifier(path)[:2],
                                base=base)
        built.append(model)
    assert all(torch.equal(p, q) for p, q in zip(built[0].parameters(), built[1].parameters()))


def test_loads_in_two_threads_leave_the_callers_transformers_verbosity():
    """Loads silence transformers' reports through its global verbosity. Two loads that overlap
    (threads), the first to end before the second: the caller's verbosity comes back, not "error"
    (each saving and restoring its own copy left it at "error")."""
    import threading

    from transformers.utils import logging as transformers_logging

    from finepurify_ext.pipeline import _transformers_quiet

    before = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()
    try:
        first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def first():
            with _transformers_quiet():
                first_in.set()
                second_in.wait(10)
            first_out.set()

        def second():
            first_in.wait(10)
            with _transformers_quiet():
                second_in.set()
                first_out.wait(10)
                seen["inside, the first out"] = transformers_logging.get_verbosity()

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert seen == {"inside, the first out": transformers_logging.ERROR}  # still quiet for the second
        assert transformers_logging.get_verbosity() == transformers_logging.WARNING
    finally:
        transformers_logging.set_verbosity(before)


def test_a_peft_model_is_refused_with_the_merge_named(tokenizer):
    """A PEFT model names its base weights "base_model.model.<name>.base_layer.weight", beside its
    adapters: no pre-trained tensor matches, and the refusal pointed to pretrained_state_for, which
    cannot help. It names the merge now."""
    peft = pytest.importorskip("peft", reason="peft (a test extra) is not installed")
    model, state = drifted(tokenizer)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query", "value"]))
    hessians, _ = estimate_hessian(wrapped, data.batches(tokenizer, toy_examples(8, 5), 8), progress=False)
    with pytest.raises(UserError, match=r"a PEFT model .* merge them first \(model = model.merge_and_unload\(\)\)"):
        purify_(wrapped, state, hessians, PurifyConfig())
    merged = wrapped.merge_and_unload()  # then purified by its own names; PEFT left its weights frozen
    batches = list(data.batches(tokenizer, toy_examples(8, 5), 8))
    with pytest.raises(ValueError, match="estimate_hessian: no parameter of the model requires grad"):
        estimate_hessian(merged, batches, progress=False)  # was autograd's "element 0 of tensors does not ..."
    with every_parameter_estimated(merged):
        hessians, _ = estimate_hessian(merged, batches, progress=False)
    assert purify_(merged, state, hessians, PurifyConfig(reserve_ratio=0.5)).num_reset > 0
