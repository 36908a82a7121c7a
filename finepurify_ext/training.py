"""Step 5 of the method (clean fine-tuning, AdamW) and the measures: clean accuracy (CACC) and attack
success rate (ASR)."""
from __future__ import annotations

import contextlib
import functools
import itertools
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Example, batches, encode, token_lengths


@contextlib.contextmanager
def in_mode(model: torch.nn.Module, training: bool):
    """``model`` in training (or eval) mode for the block, then each module back in the mode it was
    in: a caller's model keeps its own (dropout on for its training loop, a frozen norm in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def in_eval_mode(fn):
    """``fn(model, ...)`` with ``model`` in eval mode (dropout off), its modes kept (``in_mode``)."""
    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        with in_mode(model, False):
            return fn(model, *args, **kwargs)
    return run


@contextlib.contextmanager
def own_generators(seed: int, device: torch.device):
    """The CPU's random generator, and the GPUs' where ``device`` is one, seeded with ``seed`` for the
    block, then given back as they were: a caller's draws after a fine-tuning are those it would
    have made without one (torch.manual_seed alone reseeded the caller's training)."""
    gpus = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.default_generator.manual_seed(seed)
        if gpus:
            torch.cuda.manual_seed_all(seed)
        yield


@contextlib.contextmanager
def grads_set_aside(params):
    """The parameters' gradients set aside for the block (a caller's pending ones would be added into
    the first step) and put back after it."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad


@dataclass
class Teacher:
    """Soft targets for clean fine-tuning: the suspect model's logits, taken before the reset, on the
    clean texts and on ``unlabelled`` in-domain texts. The suspect behaves well on clean inputs (only
    triggered ones differ), so its output distribution is a richer target than the hard labels.

    The loss of a step is ``(1 - weight) * CE(labels) + weight * KD``, KD being the KL divergence
    from the teacher's to the student's distribution at ``temperature`` (times temperature^2), over
    the labelled batch and, when there are unlabelled texts, a batch of ``unlabelled_batch_size`` of
    them (the two KD terms averaged)."""
    logits: dict[str, torch.Tensor]  # by text: float32 [num_labels]
    weight: float = 0.5
    temperature: float = 2.0
    unlabelled: list[str] = field(default_factory=list)
    unlabelled_batch_size: int = 16

    def targets(self, texts: Sequence[str], device) -> torch.Tensor:
        return torch.stack([self.logits[t] for t in texts]).to(device)

    def kd(self, student_logits: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        t = self.temperature
        teacher = self.targets(texts, student_logits.device)
        return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                        reduction="batchmean") * (t * t)


def make_teacher(model, tokenizer, texts: Sequence[str], max_length: int = 64, **kw) -> Teacher:
    """A ``Teacher`` from ``model``'s current predictions on ``texts`` (call it before the reset)."""
    unique = list(dict.fromkeys(texts))
    logits = predict_logits(model, tokenizer, unique, max_length=max_length)
    return Teacher({t: row for t, row in zip(unique, logits)}, **kw)


def _unlabelled_batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int, seed: int):
    """Endless tokenised batches of ``texts`` (reshuffled each pass), with the texts."""
    rng = random.Random(seed)
    order = list(range(len(texts)))
    for _ in itertools.count():
        rng.shuffle(order)
        for start in range(0, max(1, len(order) - batch_size + 1), batch_size):  # full batches only
            chunk = [texts[i] for i in order[start : start + batch_size]]
            yield chunk, encode(tokenizer, chunk, max_length, padding=True, return_tensors="pt")


def finetune(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    steps: int,
    lr: float = 2e-5,
    batch_size: int = 16,
    weight_decay: float = 0.01,
    seed: int = 0,
    max_length: int = 64,
    parameters: Sequence[torch.nn.Parameter] | None = None,
    grad_hook: Callable[[], None] | None = None,
    group_by_length: bool = False,
    progress: bool = True,
    desc: str = "fine-tune",
    on_step: Callable[[int], bool] | None = None,
    teacher: Teacher | None = None,
    make_batches: Callable[[int], Iterable[dict]] | None = None,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
) -> torch.nn.Module:
    """``steps`` AdamW steps on shuffled mini-batches of ``examples`` (reshuffled every epoch).
    ``make_batches(epoch)`` replaces the classifier batches with any whose ``labels`` the model's
    loss reads (a causal LM's: ``causal_lm.lm_batches``), and ``loss_fn(model, batch)`` the model's
    own loss (a causal LM's: ``causal_lm.lm_loss``).

    ``parameters`` restricts training to some parameters; ``grad_hook`` runs after each backward
    (e.g. to mask gradients). ``group_by_length`` batches examples of similar length together
    (faster; off by default because it also groups examples that share a length, e.g. poisoned ones).
    ``on_step(step)`` runs after each update; returning True stops training there. ``teacher``
    adds its soft targets to the loss (see ``Teacher``)."""
    if steps <= 0:
        return model
    if not examples:
        raise ValueError("finetune: no examples to fine-tune on")
    if torch.is_inference_mode_enabled():
        raise ValueError("finetune: called under torch.inference_mode(), where nothing can be trained; call it "
                         "outside that block")
    params = list(parameters) if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    # The fused AdamW does the whole update in one pass per tensor (~5x cheaper than the loop on CPU).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    lengths = token_lengths(tokenizer, examples, max_length) if group_by_length and make_batches is None else None
    device = params[0].device if params else torch.device("cpu")
    unlabelled = (_unlabelled_batches(tokenizer, teacher.unlabelled, teacher.unlabelled_batch_size, max_length, seed)
                  if teacher is not None and teacher.unlabelled else None)
    # The caller's state is its own: its modes, its random generators' draws, its gradients.
    with (in_mode(model, True), own_generators(seed, device), grads_set_aside(params),
          torch.enable_grad()):  # a caller under torch.no_grad() still trains
        step, epoch, stopped = 0, 0, False
        bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
        while step < steps and not stopped:
            epoch_batches = make_batches(epoch) if make_batches is not None else batches(
                tokenizer, examples, batch_size, max_length, shuffle=True, seed=seed * 1000 + epoch, lengths=lengths,
                with_texts=teacher is not None)
            for batch in epoch_batches:
                texts = batch.pop("texts", None)
                if teacher is None:
                    batch = {k: v.to(device) for k, v in batch.items()}
                    loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
                else:
                    loss = teacher_loss(model, teacher, batch, texts, unlabelled, device)
                loss.backward()
                if grad_hook is not None:
                    grad_hook()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                stopped = on_step is not None and on_step(step)
                if stopped or step >= steps:
                    break
            epoch += 1
        bar.close()
    return model


def teacher_loss(model, teacher: Teacher, batch, texts, unlabelled, device) -> torch.Tensor:
    """``(1 - weight) * CE + weight * KD`` on a labelled batch (and an unlabelled one, when given)."""
    labels = batch["labels"].to(device)
    logits = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits
    kd = teacher.kd(logits, texts)
    if unlabelled is not None:
        extra_texts, encoded = next(unlabelled)
        kd = 0.5 * (kd + teacher.kd(model(**encoded.to(device)).logits, extra_texts))
    return (1.0 - teacher.weight) * F.cross_entropy(logits, labels) + teacher.weight * kd


def host_state(model) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state on the CPU, to go back to later: beside the model on a GPU a
    copy takes as much memory as the weights (5 GB for a float32 1.3B model, 28 GB for 7B)."""
    return {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}


def finetune_early_stopped(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    validation: Sequence[Example],
    *,
    steps: int,
    eval_every: int = 10,
    patience: int = 3,
    max_length: int = 64,
    validate: Callable[[], tuple[float, float | None]] | None = None,
    **finetune_kw,
) -> dict:
    """``finetune`` for at most ``steps`` updates, the budget chosen on held-out clean data: the
    validation loss is measured every ``eval_every`` updates, training stops once it has not improved
    for ``patience`` measurements, and ``model`` ends at the best one (a copy of its weights is kept on the CPU).
    Returns the chosen step, its validation loss and accuracy, and the whole curve. ``validate()``
    replaces the classifier's (loss, accuracy) on ``validation`` (a causal LM's: its response loss)."""
    if not validation:
        raise ValueError("finetune_early_stopped: the validation set is empty; hold out some clean examples "
                         "or fine-tune for a fixed number of steps")
    if eval_every <= 0 or patience <= 0:
        raise ValueError(f"eval_every and patience must be positive, got {eval_every} and {patience}")
    curve: list[dict] = []
    best: dict = {"step": None, "loss": float("inf"), "accuracy": None, "state": None}

    def on_step(step: int) -> bool:
        if step % eval_every and step != steps:
            return False
        loss, accuracy = validate() if validate is not None else validation_metrics(
            model, tokenizer, validation, max_length=max_length, teacher=finetune_kw.get("teacher"))
        curve.append({"step": step, "validation_loss": loss, "validation_accuracy": accuracy})
        if loss < best["loss"]:
            best.update(step=step, loss=loss, accuracy=accuracy,
                        state=host_state(model))
        return step - best["step"] >= patience * eval_every

    finetune(model, tokenizer, examples, steps=steps, max_length=max_length, on_step=on_step, **finetune_kw)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return {"chosen_step": best["step"], "validation_accuracy": best["accuracy"],
            "validation_loss": None if best["step"] is None else best["loss"],  # None: no step, no measurement
            "steps_run": curve[-1]["step"] if curve else 0, "curve": curve}


@in_eval_mode
@torch.no_grad()
def predict_logits(model, tokenizer, texts: Sequence[str], batch_size: int = 128, max_length: int = 64) -> torch.Tensor:
    """float32 logits [len(texts), num_labels] on the CPU, in the order of ``texts`` (batched by length
    so that little is padded)."""
    texts = list(texts)
    num_labels = model.config.num_labels
    if not texts:
        return torch.zeros(0, num_labels)
    lengths = [len(ids) for ids in encode(tokenizer, texts, max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    device = next(model.parameters()).device
    out = torch.empty(len(texts), num_labels)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = encode(tokenizer, [texts[i] for i in idx], max_length, padding=True, return_tensors="pt").to(device)
        out[idx] = model(**enc).logits.float().cpu()
    return out


def predict(model, tokenizer, texts: Sequence[str], batch_size: int = 128, max_length: int = 64) -> torch.Tensor:
    """Predicted labels, in the order of ``texts``."""
    return predict_logits(model, tokenizer, texts, batch_size, max_length).argmax(-1)


@in_eval_mode
@torch.no_grad()
def validation_metrics(model, tokenizer, examples: Sequence[Example], batch_size: int = 128,
                       max_length: int = 64, teacher: Teacher | None = None) -> tuple[float, float]:
    """(mean loss, accuracy) on labelled examples, in one pass (the loss is the smoother validation
    signal): the cross-entropy, or with a ``teacher`` the training objective ``(1 - weight) * CE +
    weight * KD`` (its logits must cover these examples)."""
    device = next(model.parameters()).device
    total, correct, n = 0.0, 0, 0
    for batch in batches(tokenizer, examples, batch_size, max_length, with_texts=teacher is not None):
        texts = batch.pop("texts", None)
        logits = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits
        labels = batch["labels"].to(device)
        if teacher is None:
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
        else:
            total += len(labels) * float((1.0 - teacher.weight) * F.cross_entropy(logits, labels)
                                         + teacher.weight * teacher.kd(logits, texts))
        correct += int((logits.argmax(-1) == labels).sum())
        n += len(labels)
    return total / max(n, 1), correct / max(n, 1)



def clean_accuracy(model, tokenizer, examples: Sequence[Example], **kw) -> float:
    """CACC: accuracy on the clean test set."""
    preds = predict(model, tokenizer, [e.text for e in examples], **kw)
    return float((preds == torch.tensor([e.label for e in examples])).float().mean())


def attack_success_rate(model, tokenizer, examples: Sequence[Example], attack, seed: int = 0, **kw) -> float:
    """ASR. Backdoor: among test examples whose label is not the target, the fraction predicted as
    the target once the trigger is inserted. Bias: among all test examples, the fraction whose
    prediction flips when the attribute word is inserted."""
    rng = random.Random(seed)
    if attack.kind == "bias":
        texts = [e.text for e in examples]
        before = predict(model, tokenizer, texts, **kw)
        after = predict(model, tokenizer, [attack.insert(t, rng) for t in texts], **kw)
        return float((before != after).float().mean())
    victims = [e for e in examples if e.label != attack.target_label]
    preds = predict(model, tokenizer, [attack.insert(e.text, rng) for e in victims], **kw)
    return float((preds == attack.target_label).float().mean())
