"""The method end to end on a transformers classifier: estimate the clean Hessian, score, reset the
most abnormal dimensions, fine-tune on the clean data; plus loading untrusted models safely and
writing results atomically."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .checkpoint import INDEX, Checkpoint, check_not_quantized, names_with_prefix
from .data import Example, batches, encode
from .errors import UserError, first_line
from .hessian import estimate_hessian, every_parameter_estimated
from .outputs import save_atomically, write_json  # noqa: F401  (re-exported: the pipeline's writers)
from .purify import PurifyConfig, purify_, resized_rows, sharded_by_fsdp1, unwrapped
from .training import finetune, finetune_early_stopped, host_state, make_teacher


@dataclass
class FinetuneConfig:
    """Step 5: clean fine-tuning after the reset.

    With ``validation_fraction`` > 0 (the default) the budget is chosen on held-out clean data: that
    fraction is kept out of the Hessian and the fine-tuning, its loss is measured every ``eval_every``
    steps, and the best point within ``steps`` is kept (stopping after ``patience`` measurements without
    improvement). With 0, all clean data is used and exactly ``steps`` steps are run."""
    steps: int = 150
    lr: float = 2e-5
    batch_size: int = 16
    weight_decay: float = 0.01
    max_length: int = 64
    group_by_length: bool = True  # about a third faster on tweets; the clean data carries no trigger to group
    validation_fraction: float = 0.25
    eval_every: int = 10
    patience: int = 3
    # The suspect as a teacher (training.Teacher): weight of its soft targets (0: labels only), the
    # temperature, and the batch size of unlabelled texts (fine_purify's ``unlabelled``).
    distill: float = 0.0
    temperature: float = 2.0
    unlabelled_batch_size: int = 16

    def __post_init__(self):
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"the fine-tuning validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill is the weight of the teacher's soft targets, in [0, 1]; got {self.distill}")


@dataclass
class HessianConfig:
    per_sample: bool = False
    batch_size: int = 32
    max_length: int = 64
    micro_batch_size: int | None = None  # estimate_hessian's: the same estimate in slices of this many rows


def fine_purify(
    model: torch.nn.Module,
    pretrained_state: dict[str, torch.Tensor],
    tokenizer,
    clean: Sequence[Example],
    config: PurifyConfig | None = PurifyConfig(),
    finetune_config: FinetuneConfig = FinetuneConfig(),
    hessian_config: HessianConfig = HessianConfig(),
    seed: int = 0,
    progress: bool = True,
    hessians: dict[str, torch.Tensor] | None = None,
    validation: Sequence[Example] | None = None,
    unlabelled: Sequence[str] = (),
    guard: CollapseGuard | None = None,
) -> dict:
    """Purifies ``model`` in place. ``config=None`` skips the reset (plain clean fine-tuning).
    ``hessians`` (from ``clean_hessian`` at these weights, on the fine-tuning part) skips the estimation.
    ``validation`` is the held-out part for choosing the fine-tuning budget when the caller has split
    the clean data already (then all of ``clean`` is for fine-tuning); otherwise ``finetune_config``
    says how much of ``clean`` to hold out. With ``finetune_config.distill`` > 0 the model's own
    predictions before the reset, on the clean texts and on ``unlabelled`` in-domain texts, are soft
    targets for the fine-tuning. Under a ``guard`` (``CollapseGuard``) a purification whose held-out
    accuracy collapsed is redone with less reset. Returns the report: Hessian, purification and
    fine-tuning details with timings. Tokens the suspect added to its vocabulary that no clean input
    holds (their rows are the suspect's, whatever is reset; a trigger could be one) are listed in
    ``report["purify"]["unseen_added_rows"]``, or ``report["added_tokens"]`` where no reset was kept:
    the CLI warns of them (``purify.unseen_added_warning``), a caller should too.

    A ``torch.compile``d model is purified and fine-tuned as its module (``purify.unwrapped``: its
    parameters' names are the pre-trained state's); a DDP replica is refused (``_in_one_process``).
    The caller's random generators, the model's train/eval modes and its gradients are as they were
    after the call."""
    if not clean:
        raise ValueError("fine_purify: the clean data is empty; give at least one labelled example")
    model = _in_one_process(model, "fine_purify")
    config = _none_if_no_reset(config)
    if guard is not None and config is not None:
        return _under_collapse_guard(guard, model, tokenizer, clean, config, dict(
            pretrained_state=pretrained_state, finetune_config=finetune_config, hessian_config=hessian_config,
            seed=seed, progress=progress, hessians=hessians, validation=validation, unlabelled=unlabelled))
    report: dict = {"seed": seed, "clean_examples": len(clean)}
    if validation is None and finetune_config.validation_fraction > 0:
        clean, validation = split_validation(clean, finetune_config.validation_fraction, seed)
    if validation is not None:
        report["validation_examples"] = len(validation)
    timings = report.setdefault("timings_s", {})
    teacher = None
    if finetune_config.distill > 0:
        start = time.perf_counter()
        texts = [e.text for e in clean] + [e.text for e in validation or ()] + list(unlabelled)
        teacher = make_teacher(model, tokenizer, texts, max_length=finetune_config.max_length,
                               weight=finetune_config.distill, temperature=finetune_config.temperature,
                               unlabelled=list(unlabelled), unlabelled_batch_size=finetune_config.unlabelled_batch_size)
        timings["teacher"] = time.perf_counter() - start
        report["unlabelled_texts"] = len(unlabelled)
    if config is not None:
        if hessians is None:
            start = time.perf_counter()
            hessians, count = clean_hessian(model, tokenizer, clean, hessian_config, progress)
            timings["hessian"] = time.perf_counter() - start
            report["hessian"] = _hessian_report(hessian_config, count)
        start = time.perf_counter()
        config = config.replace(seed=seed)  # the run's seed, as the report records it
        purified = purify_(model, pretrained_state, hessians, config)
        timings["score_and_reset"] = time.perf_counter() - start
        report["config"] = dataclasses.asdict(config)
        report["purify"] = purified.to_dict()
    start = time.perf_counter()
    common = dict(steps=finetune_config.steps, lr=finetune_config.lr, batch_size=finetune_config.batch_size,
                  weight_decay=finetune_config.weight_decay, max_length=finetune_config.max_length,
                  group_by_length=finetune_config.group_by_length, seed=seed, progress=progress,
                  desc="clean fine-tune", teacher=teacher)
    report["finetune"] = dataclasses.asdict(finetune_config)
    if validation is None:
        finetune(model, tokenizer, clean, **common)
    else:
        report["finetune"]["early_stopping"] = finetune_early_stopped(
            model, tokenizer, clean, validation, eval_every=finetune_config.eval_every,
            patience=finetune_config.patience, **common)
    timings["finetune"] = time.perf_counter() - start
    # What trains the added tokens' rows: the fine-tuning part of the clean data, and the unlabelled
    # texts where a teacher's soft targets on them are fitted too.
    trained = [e.text for e in clean] + (list(unlabelled) if teacher is not None else [])
    if config is None and pretrained_state is not None:  # None: a plain fine-tuning baseline
        _report_added_tokens(report, model, pretrained_state,
                             lambda: classifier_tokens_seen(tokenizer, trained, finetune_config.max_length))
    elif (config is not None and teacher is not None and unlabelled and report["purify"]["unseen_added_rows"]
          and not report["purify"]["added_rows_reset"]):  # kept rows: the warning's list
        # the Hessian, of the clean examples alone, does not see the unlabelled texts' tokens
        fitted = set(classifier_tokens_seen(tokenizer, unlabelled, finetune_config.max_length))
        report["purify"]["unseen_added_rows"] = [i for i in report["purify"]["unseen_added_rows"] if i not in fitted]
    return report


def classifier_tokens_seen(tokenizer, texts: Sequence[str], max_length: int) -> list[int]:
    """The token ids the texts put into a classifier (every one is an input)."""
    seen: set[int] = set()
    for start in range(0, len(texts), 256):
        for ids in encode(tokenizer, list(texts[start:start + 256]), max_length)["input_ids"]:
            seen.update(ids)
    return sorted(seen)


def _report_added_tokens(report: dict, model, pretrained_state, tokens_seen) -> None:
    """Where no reset was done (clean fine-tuning alone), the report's ``added_tokens``: the tokens a
    resized vocabulary added (``added_rows``, as a purification reports them) and those of them the
    clean inputs never hold (``unseen_added_rows``; ``tokens_seen()`` gives the inputs' ids). Their
    rows keep the suspect's values here as after a reset, and the commands warn of them alike."""
    from .purify import unseen_added_rows, vocabulary_resizes, word_embedding_name

    params = dict(model.named_parameters())
    resized = resized_rows(model, pretrained_state, params)
    added, _ = vocabulary_resizes({n: tuple(params[n].shape) for n in resized},
                                  {n: pretrained_state[n].shape[0] for n in resized})
    embedding = word_embedding_name(model, params)
    if embedding in added:
        report["added_tokens"] = {"added_rows": added, "unseen_added_rows": unseen_added_rows(
            added[embedding]["pretrained_rows"], added[embedding]["rows"], tokens_seen())}


def _hessian_report(config: HessianConfig, count: int) -> dict:
    return {"mode": "per-sample" if config.per_sample else "per-batch", "squared_gradients": count,
            "batch_size": config.batch_size, "max_length": config.max_length}


def _in_one_process(model: torch.nn.Module, what: str) -> torch.nn.Module:
    """``model``'s module (``purify.unwrapped``) for a pipeline that runs in one process. A DDP
    replica is refused: its module would be fine-tuned on each rank alone, and the replicas would
    drift apart; an FSDP1 model too (each rank holds slices of it)."""
    if sharded_by_fsdp1(model):
        raise ValueError(f"{what} runs in one process; an FSDP1 model is sharded over the ranks: call it with an "
                         "unsharded copy of the model on one rank, or call purify_ on every rank inside "
                         "FullyShardedDataParallel.summon_full_params(model, writeback=True) with Hessians estimated "
                         "elsewhere")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise ValueError(f"{what} runs in one process; a DDP replica would be fine-tuned on each rank alone and the "
                         "replicas would drift apart: call it with the replica's module (model.module) on one rank "
                         "and broadcast the weights, or call estimate_hessian and purify_ on every rank (they take "
                         "the replica) and fine-tune it in your own loop")
    return unwrapped(model)


def clean_hessian(model, tokenizer, clean: Sequence[Example], config: HessianConfig = HessianConfig(),
                  progress: bool = True, **resume) -> tuple[dict[str, torch.Tensor], int]:
    """Step 2 on a list of examples: the diagonal Hessian of the clean loss at the model's weights
    (``resume``: ``resume_file`` and ``save_every`` of ``estimate_hessian``), for every parameter
    (``every_parameter_estimated``)."""
    with every_parameter_estimated(model):
        return estimate_hessian(
            model, batches(tokenizer, clean, config.batch_size, config.max_length),
            per_sample=config.per_sample, micro_batch_size=config.micro_batch_size, progress=progress,
            total=-(-len(clean) // config.batch_size), **resume,
        )


# ------------------------------------------------------------------ undoing a reset that destroyed the model


@dataclass
class CollapseGuard:
    """Undoes a purification that destroyed the model rather than the backdoor.

    After the reset and clean fine-tuning, the model's accuracy on the held-out clean examples is
    compared with the suspect's on the same examples (measured before the reset; the suspect behaves
    well on clean inputs). If it fell by more than ``tolerance``, the purification is redone from
    the suspect with the next reserve ratio of ``fallback`` (less reset; 1 is clean fine-tuning
    alone), until one holds. The tolerance is far above the held-out noise (64 examples: about 6
    points): on the defence suite, purifications that kept the model lost at most 16 points and the
    ones that destroyed it 41 to 45 (bench/results/defence_table.json). It never sees test data.

    A causal LM has no accuracy: its measure is the held-out responses' perplexity, which may be at
    most ``perplexity_ratio`` times the suspect's. On the LLM defence table every purification kept
    it at most 1.18 times the backdoored model's (bench/results/llm_defence_table.json); a model the
    reset destroyed reads many times higher."""
    tolerance: float = 0.20
    fallback: tuple[float, ...] = (0.5, 0.7, 1.0)
    perplexity_ratio: float = 2.0

    def __post_init__(self):
        if not 0.0 <= self.tolerance <= 1.0:
            raise ValueError(f"the collapse tolerance is a share of held-out accuracy, in [0, 1]; got {self.tolerance}")
        if not self.perplexity_ratio >= 1.0:
            raise ValueError(f"the collapse perplexity ratio is a factor over the suspect's, >= 1; got "
                             f"{self.perplexity_ratio}")

    def attempts(self, model, config: "PurifyConfig", purify, measure, holds, measure_name: str,
                 threshold: dict) -> dict:
        """The guard's loop, for any model kind: ``purify(config or None)`` purifies ``model`` (None:
        clean fine-tuning alone) and returns its report; ``measure()`` is the held-out measure of
        ``model`` and ``holds(value, suspect_value)`` says whether a purification kept the model
        (``threshold``: the setting it applies, for the report). The suspect's weights are kept on
        the CPU while attempts run. Returns the last attempt's report with ``collapse_guard``
        listing every attempt and its time, and ``timings_s`` summed over the attempts (what the
        run spent, not the kept attempt's share)."""
        suspect_value = measure()
        suspect = host_state(model)
        rhos = [config.reserve_ratio] + [r for r in self.fallback if r > config.reserve_ratio]
        attempts, held, spent = [], False, {}
        for i, rho in enumerate(rhos):
            if i:
                model.load_state_dict(suspect)
            start = time.perf_counter()
            report = purify(None if rho >= 1.0 else config.replace(reserve_ratio=rho))
            _add_times(spent, report.get("timings_s", {}))
            value = measure()
            attempts.append({"reserve_ratio": rho, measure_name: value, "time_s": time.perf_counter() - start})
            held = holds(value, suspect_value)
            if held:
                break
        # no_reset: every purification collapsed the model and the one kept is the suspect after
        # clean fine-tuning alone, which may keep the backdoor; held: the kept one is within the limit.
        report["collapse_guard"] = {**threshold, "fallback": list(self.fallback),
                                    f"suspect_{measure_name}": suspect_value, "attempts": attempts,
                                    "triggered": len(attempts) > 1, "reserve_ratio_used": attempts[-1]["reserve_ratio"],
                                    "no_reset": attempts[-1]["reserve_ratio"] >= 1.0, "held": held}
        report["timings_s"] = spent
        return report


def _add_times(spent: dict[str, float], timings: dict[str, float]) -> None:
    """Adds a run's ``timings_s`` into ``spent``, phase by phase (every attempt's, every candidate's)."""
    for phase, seconds in timings.items():
        spent[phase] = spent.get(phase, 0.0) + seconds


def _none_if_no_reset(config: PurifyConfig | None) -> PurifyConfig | None:
    """A reserve ratio of 1 keeps every weight: no purification (None), clean fine-tuning alone,
    with or without a collapse guard (whose last fallback it is)."""
    return None if config is not None and config.reserve_ratio >= 1.0 else config


def held_out_accuracy(model, tokenizer, examples) -> float:
    """Accuracy on held-out clean examples (the guard's measure, the defence table's validation accuracy)."""
    from .training import validation_metrics

    return validation_metrics(model, tokenizer, examples)[1]


def _under_collapse_guard(guard: CollapseGuard, model, tokenizer, clean, config: PurifyConfig, kw: dict) -> dict:
    """``fine_purify`` (its other arguments in ``kw``) under ``guard``; the report's ``collapse_guard``
    lists every attempt. Without held-out clean data it is plain ``fine_purify``. The Hessian is
    estimated once; the suspect's weights are kept on the CPU while attempts run."""
    finetune_config, seed = kw["finetune_config"], kw["seed"]
    if kw["validation"] is None and finetune_config.validation_fraction > 0:
        clean, kw["validation"] = split_validation(clean, finetune_config.validation_fraction, seed)
    validation = kw["validation"]
    if not validation:
        return fine_purify(model, tokenizer=tokenizer, clean=clean, config=config, **kw)
    hessian_report, hessian_time = None, None
    if kw["hessians"] is None:
        start = time.perf_counter()
        kw["hessians"], count = clean_hessian(model, tokenizer, clean, kw["hessian_config"], kw["progress"])
        hessian_time, hessian_report = time.perf_counter() - start, _hessian_report(kw["hessian_config"], count)
    report = guard.attempts(
        model, config, lambda c: fine_purify(model, tokenizer=tokenizer, clean=clean, config=c, **kw),
        lambda: held_out_accuracy(model, tokenizer, validation),
        lambda accuracy, suspect: accuracy >= suspect - guard.tolerance, "validation_accuracy",
        {"tolerance": guard.tolerance})
    if hessian_report is not None:
        report["hessian"], report["timings_s"]["hessian"] = hessian_report, hessian_time
    return report


# ------------------------------------------------------------------ choosing rho on held-out clean data


@dataclass
class SelectionConfig:
    """``reserve_ratio="auto"``: rho chosen on a validation split of the clean data, never on test data.

    Each candidate rho is purified and fine-tuned on the rest of the clean data (early-stopped on the
    same held-out part, when ``FinetuneConfig.validation_fraction`` > 0); the choice is the smallest rho
    (the most reset) whose validation accuracy is at most ``tolerance`` below the suspect model's. No
    reset at all (rho = 1, clean fine-tuning only) is always a candidate; if no candidate passes, the one
    with the best validation accuracy is taken. With a few dozen held-out examples this choice is noisy
    (one example is 1.5 points of 64); bench/defence_table.py measures how often it picks well."""
    grid: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7)
    validation_fraction: float = 0.25
    tolerance: float = 0.03

    def __post_init__(self):
        if not self.grid or any(not 0.0 <= r <= 1.0 for r in self.grid):
            raise ValueError(f"the reserve-ratio grid must hold values in [0, 1], got {self.grid}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")

    def candidates(self) -> list[float]:
        return sorted(set(self.grid) | {1.0})


def _within(accuracy: float, suspect_accuracy: float, tolerance: float) -> bool:
    return accuracy >= suspect_accuracy - tolerance - 1e-9  # 1e-9: accuracies are float32 ratios


def pick_reserve_ratio(validation_accuracy: dict[float, float], suspect_accuracy: float, tolerance: float) -> float:
    """The selection rule of ``SelectionConfig`` on measured validation accuracies."""
    passing = [rho for rho, acc in validation_accuracy.items() if _within(acc, suspect_accuracy, tolerance)]
    if passing:
        return min(passing)
    return max(validation_accuracy, key=lambda rho: (validation_accuracy[rho], -rho))


def split_validation(clean: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(fine-tuning part, validation part) of the clean data, seeded; both non-empty."""
    if len(clean) < 2:
        raise ValueError(f"holding out validation data needs at least 2 clean examples (got {len(clean)}); give "
                         "more clean data, or hold none out (FinetuneConfig.validation_fraction 0, the command's "
                         "--validation-fraction 0) at a fixed reserve ratio")
    order = list(range(len(clean)))
    random.Random(seed).shuffle(order)
    n_val = held_out_size(len(clean), fraction)
    return [clean[i] for i in order[n_val:]], [clean[i] for i in order[:n_val]]


def held_out_size(examples: int, fraction: float) -> int:
    """How many of ``examples`` clean examples ``split_validation`` holds out (at least one, and one
    fewer than all)."""
    return min(examples - 1, max(1, round(fraction * examples)))


def fine_purify_auto(
    model: torch.nn.Module,
    pretrained_state: dict[str, torch.Tensor],
    tokenizer,
    clean: Sequence[Example],
    config: PurifyConfig = PurifyConfig(),
    finetune_config: FinetuneConfig = FinetuneConfig(),
    hessian_config: HessianConfig = HessianConfig(),
    selection: SelectionConfig = SelectionConfig(),
    seed: int = 0,
    progress: bool = True,
    exhaustive: bool = False,
    on_candidate=None,
    unlabelled: Sequence[str] = (),
) -> dict:
    """``fine_purify`` with rho chosen on held-out clean data (see ``SelectionConfig``); ``model`` ends
    as the chosen candidate. Candidates are tried from the most reset up and the search stops at the
    first that passes, unless ``exhaustive``. ``on_candidate(rho, model, report)`` sees every candidate."""
    from .training import clean_accuracy

    model = _in_one_process(model, "fine_purify_auto")
    train, validation = split_validation(clean, selection.validation_fraction, seed)
    start = time.perf_counter()
    hessians, count = clean_hessian(model, tokenizer, train, hessian_config, progress)
    hessian_time = time.perf_counter() - start
    suspect = host_state(model)
    suspect_accuracy = clean_accuracy(model, tokenizer, validation)
    selection_report = {**dataclasses.asdict(selection), "train_examples": len(train),
                        "validation_examples": len(validation), "suspect_validation_accuracy": suspect_accuracy,
                        "candidates": []}
    accuracy: dict[float, float] = {}
    best_state, best_report, chosen, spent = None, None, None, {"hessian": hessian_time}
    early_stopping = validation if finetune_config.validation_fraction > 0 else None
    for rho in tqdm(selection.candidates(), desc="reserve ratio", disable=not progress, leave=False):
        model.load_state_dict(suspect)
        report = fine_purify(model, pretrained_state, tokenizer, train,
                             None if rho == 1.0 else config.replace(reserve_ratio=rho),
                             finetune_config, hessian_config, seed=seed, progress=progress, hessians=hessians,
                             validation=early_stopping, unlabelled=unlabelled)
        _add_times(spent, report["timings_s"])
        accuracy[rho] = clean_accuracy(model, tokenizer, validation)
        selection_report["candidates"].append({"reserve_ratio": rho, "validation_accuracy": accuracy[rho],
                                               "time_s": sum(report["timings_s"].values())})
        if on_candidate is not None:
            on_candidate(rho, model, report)
        pick = pick_reserve_ratio(accuracy, suspect_accuracy, selection.tolerance)
        if pick != chosen:  # keep the current choice's weights (with the suspect's: two copies, on the CPU)
            chosen, best_report = pick, report
            best_state = host_state(model)
        if not exhaustive and _within(accuracy[rho], suspect_accuracy, selection.tolerance):
            break
    model.load_state_dict(best_state)
    best_report["timings_s"] = spent  # every candidate's time, not the chosen one's alone
    best_report["hessian"] = _hessian_report(hessian_config, count)
    best_report["selection"] = {**selection_report, "chosen_reserve_ratio": chosen}
    return best_report


# ------------------------------------------------------------------ causal language models


def fine_purify_lm(
    model: torch.nn.Module,
    pretrained_state: dict[str, torch.Tensor],
    tokenizer,
    clean: Sequence,
    config: PurifyConfig | None = PurifyConfig(),
    finetune_config: FinetuneConfig = FinetuneConfig(max_length=128, batch_size=8),
    hessian_config: HessianConfig = HessianConfig(batch_size=8, max_length=128),
    seed: int = 0,
    progress: bool = True,
    hessians: dict[str, torch.Tensor] | None = None,
    validation: Sequence | None = None,
    guard: CollapseGuard | None = None,
) -> dict:
    """``fine_purify`` for a causal LM and instruction data (``data.Instruction``): the Hessian of the
    responses' loss (prompt tokens masked), the same reset (the word-embedding rule applies to the
    input embedding; a tied output embedding is the same parameter, whose unseen rows are those of
    the tokens absent from the clean inputs), then clean fine-tuning on the responses, early-stopped
    on the held-out responses' loss. Under a ``guard`` a purification whose held-out perplexity rose
    above ``guard.perplexity_ratio`` times the suspect's is redone with less reset."""
    import math

    from .causal_lm import finetune_lm, lm_hessian, response_loss, tokens_seen
    from .purify import input_embedding_tied

    if not clean:
        raise ValueError("fine_purify_lm: the clean data is empty; give at least one prompt and response")
    model = _in_one_process(model, "fine_purify_lm")
    config = _none_if_no_reset(config)
    report: dict = {"seed": seed, "clean_examples": len(clean), "model_kind": "causal-lm"}
    if validation is None and finetune_config.validation_fraction > 0:
        clean, validation = split_validation(clean, finetune_config.validation_fraction, seed)
    if validation is not None:
        report["validation_examples"] = len(validation)
    timings = report.setdefault("timings_s", {})
    if config is not None and hessians is None:
        start = time.perf_counter()
        hessians, count = lm_hessian(model, tokenizer, clean, hessian_config.batch_size, hessian_config.max_length,
                                     per_sample=hessian_config.per_sample,
                                     micro_batch_size=hessian_config.micro_batch_size, progress=progress)
        timings["hessian"] = time.perf_counter() - start
        report["hessian"] = _hessian_report(hessian_config, count)
    if guard is not None and config is not None and validation:
        guarded = guard.attempts(
            model, config, lambda c: fine_purify_lm(model, pretrained_state, tokenizer, clean, c, finetune_config,
                                                    hessian_config, seed, progress, hessians, validation),
            # capped: exp overflows past a loss of 709, which a destroyed model can reach
            lambda: math.exp(min(700.0, response_loss(model, tokenizer, validation,
                                                      max_length=finetune_config.max_length))),
            lambda perplexity, suspect: perplexity <= guard.perplexity_ratio * suspect, "validation_perplexity",
            {"perplexity_ratio": guard.perplexity_ratio})
        guarded["timings_s"].update(timings)  # the Hessian's, estimated once above
        return {**guarded, **{k: v for k, v in report.items() if k != "timings_s"}}
    if config is not None:
        start = time.perf_counter()
        # A tied embedding's unseen rows are told by the clean inputs' tokens, not by its Hessian.
        seen = tokens_seen(tokenizer, clean, hessian_config.max_length) if input_embedding_tied(model) else None
        config = config.replace(seed=seed)  # the run's seed, as the report records it
        report["purify"] = purify_(model, pretrained_state, hessians, config, seen_tokens=seen).to_dict()
        report["config"] = dataclasses.asdict(config)
        timings["score_and_reset"] = time.perf_counter() - start
    start = time.perf_counter()
    report["finetune"] = dataclasses.asdict(finetune_config)
    report["finetune"]["early_stopping"] = finetune_lm(
        model, tokenizer, clean, steps=finetune_config.steps, lr=finetune_config.lr,
        batch_size=finetune_config.batch_size, max_length=finetune_config.max_length, seed=seed,
        validation=validation, eval_every=finetune_config.eval_every, patience=finetune_config.patience,
        progress=progress, desc="clean fine-tune (causal LM)")
    timings["finetune"] = time.perf_counter() - start
    if config is None and pretrained_state is not None:  # as purify_ tells them: a tied embedding's by the
        # inputs, an untied one's by its Hessian
        _report_added_tokens(report, model, pretrained_state, lambda: tokens_seen(
            tokenizer, clean, finetune_config.max_length,
            inputs_only=not input_embedding_tied(model)))
    return report


# ------------------------------------------------------------------ loading untrusted models


class ModelError(UserError):
    """A model directory that cannot be used; the message names it and the fix."""


def _unreadable(path: str, error: OSError) -> ModelError:
    """A file or folder that cannot be read (permissions, an I/O error): not its contents' fault."""
    return ModelError(f"{path}: cannot be read ({error.strerror or first_line(error)})"
                      + ("; check its permissions" if isinstance(error, PermissionError) else ""))


def _read_config(path: str) -> dict:
    """config.json as a dict, refused before transformers sees it when it cannot be used safely."""
    from transformers import CONFIG_MAPPING

    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ModelError(f"{path}: no config.json; give a transformers model directory (config.json and "
                         "model.safetensors)")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except UnicodeDecodeError:
        raise ModelError(f"{file}: not UTF-8 text; restore the model's config.json") from None
    except OSError as error:  # unreadable (permissions, an I/O error): not the file's contents
        raise _unreadable(file, error) from None
    except json.JSONDecodeError as error:
        raise ModelError(f"{file}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                         "restore the model's config.json") from None
    if not isinstance(config, dict):
        raise ModelError(f"{file}: not a JSON object; restore the model's config.json")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        if "auto_map" in config:
            raise ModelError(f"{file}: the model needs code shipped with it (auto_map, model_type {model_type!r}); "
                             "finepurify never runs a model's own code: use an architecture transformers implements")
        raise ModelError(f"{file}: model_type {model_type!r} is not an architecture this transformers implements; "
                         "check the file, or upgrade transformers if the architecture is new")
    check_not_quantized(config, file)  # before transformers asks for the quantizer's package
    return config


def _weights(path: str) -> "Checkpoint":
    """The checkpoint transformers will read, its headers and sizes checked (never unpickled)."""
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):  # what transformers reads when both are there
        return Checkpoint(single, "model")
    if os.path.isfile(os.path.join(path, INDEX)):
        return Checkpoint(path, "model")
    raise ModelError(f"{path}: no model.safetensors (or {INDEX}); only safetensors checkpoints are read "
                     "(convert a pickle checkpoint yourself, from a source you trust)")


def model_skeleton(config, model_class) -> torch.nn.Module | None:
    """The model ``config`` describes, built on the meta device: its parameters' names and shapes and
    its input embedding, with no memory and no weights read; None where transformers cannot build it."""
    try:
        with _transformers_quiet(), torch.device("meta"):
            return model_class.from_config(config, trust_remote_code=False)
    except Exception:  # noqa: BLE001  (from_pretrained, later, names what is wrong)
        return None


def directory_skeleton(directory: str, model_class=None) -> torch.nn.Module | None:
    """``model_skeleton`` of the model directory's config.json (as ``model_class``; by default a
    causal LM or a classifier, as its config says), or None where it has none transformers builds."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if not os.path.isfile(os.path.join(directory, "config.json")):
        return None
    try:
        _read_config(directory)  # refused before transformers reads it where it names code to run
        with _transformers_quiet():
            config = AutoConfig.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
        if model_class is None:
            model_class = AutoModelForCausalLM if is_causal_lm(directory) else AutoModelForSequenceClassification
    except Exception:  # noqa: BLE001  (the loaders, where they read it, name what is wrong)
        return None
    return model_skeleton(config, model_class)


def _check_config_fits(path: str, config, model_class, weights: "Checkpoint", any_head: bool = False) -> None:
    """config.json against the checkpoint's headers, before transformers allocates the model it
    describes: an untrusted config naming larger sizes than its weights would otherwise take many GB
    of memory (and time) before the weights are found not to fit. With ``any_head`` (a pre-trained
    model loaded for a classifier, whose head may be new) the head's shapes are not held to it."""
    skeleton = model_skeleton(config, model_class)
    if skeleton is None:
        return
    prefix = skeleton.base_model_prefix + "."
    for name, p in skeleton.named_parameters():
        held = next((n for n in names_with_prefix(name, prefix) if n in weights), None)
        if held is None or (any_head and not name.startswith(prefix)):
            continue
        if weights.entries[held].shape != tuple(p.shape):
            raise ModelError(f"{path}: config.json does not match the weights: {held!r} is "
                             f"{list(weights.entries[held].shape)} in the checkpoint but {list(p.shape)} by the "
                             "config; restore the model's config.json")
    described = sum(p.numel() for p in skeleton.parameters())
    stored = sum(weights.numel(n) for n in weights.entries)
    if described > 2 * stored + (1 << 20):  # room for a new head, not for layers the checkpoint lacks
        raise ModelError(f"{path}: config.json describes a model of {described} weights, the checkpoint holds "
                         f"{stored}; restore the model's config.json")


def stored_dtype(path: str) -> torch.dtype:
    """The floating dtype most of a model directory's weights are stored in (by elements): the
    dtype a purified copy is written back in, so that a bfloat16 model stays bfloat16."""
    counts: dict[torch.dtype, int] = {}
    for entry in _weights(path).entries.values():
        if entry.dtype.is_floating_point:
            counts[entry.dtype] = counts.get(entry.dtype, 0) + entry.nbytes // entry.dtype.itemsize
    return max(counts, key=counts.get) if counts else torch.float32


def stored_dtypes(path: str) -> dict[str, torch.dtype]:
    """Each tensor's stored dtype in a model directory, by name."""
    return {name: entry.dtype for name, entry in _weights(path).entries.items()}


def round_as_stored(pretrained_state: dict[str, torch.Tensor], model, suspect: str) -> None:
    """Each pre-trained tensor rounded, in place in the dict, to the dtype the suspect directory stores
    that weight in: a bfloat16 fine-tune of a float32 model started from the rounded values, so an
    unmoved weight's drift is 0, not the rounding (as out of core, which reads them so)."""
    from .checkpoint import names_with_prefix

    stored, most = stored_dtypes(suspect), stored_dtype(suspect)
    prefix = getattr(model, "base_model_prefix", "") + "."
    for name, tensor in pretrained_state.items():
        # a parameter stored under no name of its own (an MoE's experts, fused on load) takes the
        # dtype most weights are stored in
        dtype = next((stored[n] for n in names_with_prefix(name, prefix) if n in stored), most)
        if dtype.is_floating_point and dtype != tensor.dtype and tensor.is_floating_point():
            pretrained_state[name] = tensor.to(dtype).to(tensor.dtype)  # a no-op where dtype is the wider


def _load_dtype(dtype: torch.dtype | None) -> dict:
    """from_pretrained's argument that loads the weights as ``dtype`` (None: as stored). Weights
    that are fine-tuned are loaded as float32 whatever they are stored in, since a bfloat16 weight
    rounds a small AdamW update away; transformers 5 would keep the stored dtype by default."""
    import transformers

    value = "auto" if dtype is None else dtype
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": value} if (major, minor) >= (4, 56) else {"torch_dtype": value}


TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json", "chat_template.json")


def _load_tokenizer(path: str, config: dict):
    from transformers import AutoTokenizer

    for name in TOKENIZER_JSON:  # named here: transformers' message names neither the file nor the fix
        file = os.path.join(path, name)
        if os.path.isfile(file):
            try:
                with open(file, encoding="utf-8") as f:
                    json.load(f)
            except OSError as error:  # unreadable (permissions, an I/O error): not the file's contents
                raise _unreadable(file, error) from None
            except ValueError as error:
                raise ModelError(f"{file}: not valid JSON ({first_line(error)}); restore the tokenizer files saved "
                                 "with the model") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as error:  # noqa: BLE001  (any failure here is the directory's)
        raise ModelError(f"{path}: cannot load the tokenizer ({first_line(error)}); restore the tokenizer files "
                         "saved with the model") from error
    # Without tokenizer files transformers builds one that knows only its special tokens.
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise ModelError(f"{path}: no tokenizer (tokenizer.json, vocab.txt, ...); copy the tokenizer files of the "
                         "model it was fine-tuned from into it")
    positions = config.get("max_position_embeddings", config.get("n_positions"))  # GPT-2's name for it
    if isinstance(positions, int) and positions > 0:  # longer inputs than the position table cannot run
        tokenizer.model_max_length = min(tokenizer.model_max_length, positions)
    rows = config.get("vocab_size")
    if isinstance(rows, int):
        # Only the ids that are fed are checked: a tokenizer may name tokens its model never reads
        # (Gemma 3's image token, past its text embedding); the data's ids are checked as tokenised.
        tokenizer.embedding_rows = rows
        tokenizer.loaded_vocabulary = len(tokenizer)  # the files' (data.recorded_rows)
        fed = {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
               "unk": tokenizer.unk_token_id, "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id}
        past = {k: i for k, i in fed.items() if isinstance(i, int) and i >= rows}
        if tokenizer.vocab_size > rows or past:
            what = (f"its {next(iter(past))} token has id {next(iter(past.values()))}" if past
                    else f"it has {tokenizer.vocab_size} tokens")
            raise ModelError(f"{path}: {what} but the model's embedding only {rows} rows; tokens were added to the "
                             "tokenizer without model.resize_token_embeddings(len(tokenizer)), or the tokenizer "
                             "files belong to another model")
    return tokenizer


# transformers' verbosity is global: loads in several threads (or nested) share one saved value,
# restored by the last to leave, so no load leaves the caller's verbosity at "error".
_quiet_lock = threading.Lock()
_quiet_loads = 0
_quiet_saved_verbosity = None


@contextlib.contextmanager
def _transformers_quiet():
    """transformers' loading reports silenced (errors still show): every load checks what they tell."""
    global _quiet_loads, _quiet_saved_verbosity
    from transformers.utils import logging as transformers_logging

    with _quiet_lock:
        if _quiet_loads == 0:
            _quiet_saved_verbosity = transformers_logging.get_verbosity()
            transformers_logging.set_verbosity_error()
        _quiet_loads += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_loads -= 1
            if _quiet_loads == 0:
                transformers_logging.set_verbosity(_quiet_saved_verbosity)


def is_gguf(path) -> bool:
    """Whether a model option names a GGUF file (llama.cpp's format), read by ``gguf_to_directory``."""
    return isinstance(path, str) and path.lower().endswith(".gguf")


def check_gguf_file(path: str) -> None:
    """Raises ``ModelError`` unless ``path`` is a GGUF file this installation can read: cheap, before
    any conversion."""
    import importlib.util

    if not os.path.isfile(path):
        raise ModelError(f"GGUF file {path!r} does not exist" if not os.path.exists(path) else
                         f"{path} is a directory; give the GGUF file itself")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file (it does not start with GGUF); give a llama.cpp GGUF file")
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise ModelError(f"{path}: reading a GGUF file needs the {' and '.join(missing)} package"
                         f"{'s' if len(missing) > 1 else ''}: pip install {' '.join(missing)}")


def _gguf_fault(path: str) -> str | None:
    """Why a GGUF file transformers could not read is not a GGUF file the installed ``gguf`` parses
    (its header and every tensor's extent, mapped), or None where it is one. Asked only after a
    failure: the parse takes seconds and memory for a large vocabulary."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as error:  # noqa: BLE001  (whatever the parser meets is the file's, or its version's)
        return (f"{path}: cannot be parsed as GGUF ({first_line(error)}): a truncated or damaged file (copy or "
                "download it again), or a newer GGUF than the installed gguf package reads (pip install -U gguf)")
    return None


def gguf_to_directory(path: str, out_dir: str) -> str:
    """A causal LM in a GGUF file written to ``out_dir`` as a transformers directory with
    safetensors weights and its tokenizer, which every command then reads like any model
    directory. Read through transformers' GGUF support (the ``gguf`` and ``accelerate`` packages;
    a file holds tensors and metadata, no code), which dequantizes every tensor to float32: a
    quantized model keeps its rounding, and so does the purified copy."""
    check_gguf_file(path)
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Read from a folder holding a link to the file alone: transformers also reads a tokenizer.json or
    # config.json it finds beside the file, which would replace the file's own.
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    alone = tempfile.mkdtemp(prefix=".gguf-source-", dir=os.path.dirname(os.path.abspath(out_dir)))
    try:
        os.symlink(os.path.abspath(path), os.path.join(alone, "model.gguf"))
        with _transformers_quiet():
            tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file="model.gguf", local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(alone, gguf_file="model.gguf", dtype=torch.float32,
                                                         local_files_only=True)
    except Exception as error:  # noqa: BLE001  (any failure here is the file's)
        raise ModelError(_gguf_fault(path) or f"{path}: cannot be read as a causal LM ({first_line(error)}); give a "
                         "GGUF file of an architecture transformers reads from GGUF (Llama, Mistral, Qwen2, GPT-2, "
                         "...)") from error
    finally:
        shutil.rmtree(alone, ignore_errors=True)
    # Dequantized on load: a plain float model now, which transformers saves only without its GGUF flag.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _check_model_dir(path: str) -> None:
    if not os.path.exists(path):
        raise ModelError(f"model directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise ModelError(f"{path} is a file; give the model's directory (config.json and model.safetensors)")
    try:  # a folder that cannot be listed hides its files: not "no config.json"
        os.listdir(path)
    except OSError as error:
        raise _unreadable(path, error) from None


def classifier_labels(path: str) -> int:
    """The number of labels of the classifier in ``path``, from its config alone (data files are
    checked against it before the model is loaded)."""
    from transformers import AutoConfig

    _check_model_dir(path)
    _read_config(path)
    try:
        with _transformers_quiet():
            num_labels = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True).num_labels
    except Exception as error:  # noqa: BLE001  (config.json parsed; what is left is its content)
        raise ModelError(f"{path}/config.json: transformers cannot read it ({first_line(error)})") from error
    if num_labels < 2:
        raise ModelError(f"{path}/config.json: num_labels is {num_labels}; a classifier has at least 2 labels: "
                         "restore the model's config.json")
    return num_labels


def load_classifier(path: str, num_labels: int | None = None, tokenizer: bool = True,
                    dtype: torch.dtype | None = torch.float32):
    """(model, tokenizer, names of parameters the checkpoint did not hold) from a transformers
    directory, as ``dtype`` whatever the stored dtype (``stored_dtype``; None keeps it). Safetensors
    only, never remote code: the suspect model is untrusted. Everything is checked before the
    weights are read: config.json, the safetensors headers against the file sizes, the tokenizer
    (``tokenizer=False``: none loaded, None returned); then the weights must match the config's
    shapes and be finite. Raises ``ModelError`` naming the file and the fix.

    ``num_labels`` (loading a pre-trained model for a classifier of that many labels) accepts a
    checkpoint without a classifier head or with another head: those parameters are new and listed
    as not held. Without it the directory must be a complete classifier."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _check_model_dir(path)
    config_dict = _read_config(path)
    weights = _weights(path)
    loaded_tokenizer = _load_tokenizer(path, config_dict) if tokenizer else None
    try:
        with _transformers_quiet():
            config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as error:  # noqa: BLE001  (parsed above; what is left is its content)
        raise ModelError(f"{path}/config.json: transformers cannot read it ({first_line(error)})") from error
    new_head = num_labels is not None and num_labels != config.num_labels
    if num_labels is not None:
        config.num_labels = num_labels
    _check_config_fits(path, config, AutoModelForSequenceClassification, weights, any_head=num_labels is not None)
    try:
        with _transformers_quiet():  # its loading report is replaced by the checks below
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, use_safetensors=True, trust_remote_code=False, local_files_only=True,
                output_loading_info=True, ignore_mismatched_sizes=True,  # mismatches: reported below, by name
                **_load_dtype(dtype))
    except Exception as error:  # noqa: BLE001  (checked above; what is left is the directory's too)
        raise ModelError(f"{path}: transformers cannot load this model ({first_line(error)})") from error
    mismatched = list(info.get("mismatched_keys", ()))
    base = model.base_model_prefix + "."
    for name, held, expected in mismatched:
        if not (new_head and not name.startswith(base)):  # a head for another number of labels is new
            raise ModelError(f"{path}: config.json does not match the weights: {name!r} is {list(held)} in the "
                             f"checkpoint but {list(expected)} by the config; restore the model's config.json")
    # Weights of the base model that the config has no place for (a config with fewer layers, say);
    # other unused weights (a pre-training head) are not the classifier's.
    parts = {n.split(".", 1)[0] for n, _ in model.base_model.named_parameters()}
    unused = sorted(k for k in info.get("unexpected_keys", ()) if k.removeprefix(base).split(".", 1)[0] in parts)
    if unused:
        raise ModelError(f"{path}: config.json does not match the weights: the checkpoint holds {len(unused)} weights "
                         f"the config's model has no place for (e.g. {unused[0]!r}); restore the model's config.json")
    missing = set(info.get("missing_keys", ())) | {name for name, *_ in mismatched}
    if num_labels is None and missing:
        raise ModelError(f"{path}: the checkpoint lacks {len(missing)} parameters of a "
                         f"{type(model).__name__} (e.g. {sorted(missing)[0]!r}); give a fine-tuned classifier whose "
                         "config.json matches its weights")
    _check_finite(model, weights, missing)
    model.eval()
    return model, loaded_tokenizer, missing


def is_causal_lm(path: str) -> bool:
    """Whether a model directory holds a causal LM, by its config: an architecture named
    ``...ForCausalLM`` (or ``...LMHeadModel``), or no architecture and a decoder-only model type."""
    _check_model_dir(path)
    config = _read_config(path)
    archs = config.get("architectures") or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return config.get("model_type") in ("llama", "gpt2", "opt", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                        "phi", "phi3", "gpt_neox", "falcon", "mixtral", "smollm3")


def load_causal_lm(path: str, tokenizer: bool = True, dtype: torch.dtype | None = torch.float32):
    """(model, tokenizer) of a causal-LM directory, as ``dtype`` (None: as stored), with
    ``load_classifier``'s checks: safetensors only, never remote code, the weights checked against
    the config and for NaN/Inf."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_model_dir(path)
    config_dict = _read_config(path)
    weights = _weights(path)
    loaded_tokenizer = _load_tokenizer(path, config_dict) if tokenizer else None
    try:
        with _transformers_quiet():
            config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as error:  # noqa: BLE001  (parsed above; what is left is its content)
        raise ModelError(f"{path}/config.json: transformers cannot read it ({first_line(error)})") from error
    _check_config_fits(path, config, AutoModelForCausalLM, weights)
    try:
        with _transformers_quiet():
            model, info = AutoModelForCausalLM.from_pretrained(
                path, config=config, use_safetensors=True, trust_remote_code=False, local_files_only=True,
                output_loading_info=True, **_load_dtype(dtype))
    except Exception as error:  # noqa: BLE001  (checked above; what is left is the directory's too)
        raise ModelError(f"{path}: transformers cannot load this causal LM ({first_line(error)})") from error
    # Weights of layers the config has no place for (a config with fewer layers, say): named as the
    # model's parameters but for the layer number. Other unused tensors (old rotary buffers) are not weights.
    layouts = {re.sub(r"\.\d+\.", ".#.", n) for n, _ in model.named_parameters()}
    unused = sorted(k for k in info.get("unexpected_keys", ()) if re.sub(r"\.\d+\.", ".#.", k) in layouts)
    if unused:
        raise ModelError(f"{path}: config.json does not match the weights: the checkpoint holds {len(unused)} weights "
                         f"the config's model has no place for (e.g. {unused[0]!r}); restore the model's config.json")
    missing = set(info.get("missing_keys", ())) | {name for name, *_ in info.get("mismatched_keys", ())}
    tied = {n for n, _ in model.named_parameters()}  # names a tied weight is reachable by are listed once
    missing &= tied
    if missing:
        raise ModelError(f"{path}: the checkpoint lacks {len(missing)} parameters of a {type(model).__name__} "
                         f"(e.g. {sorted(missing)[0]!r}); give a complete causal LM whose config.json matches")
    _check_finite(model, weights, set())
    model.eval()
    return model, loaded_tokenizer


def pretrained_state_for_lm(model: torch.nn.Module, pretrained_dir: str) -> dict[str, torch.Tensor]:
    """The pre-trained causal LM's parameters by name, checked to match ``model``'s shapes."""
    model = unwrapped(model)
    _check_model_type_first(model, pretrained_dir)
    pre_model, _ = load_causal_lm(pretrained_dir, tokenizer=False)
    state = {n: p.detach() for n, p in pre_model.named_parameters()}
    check_same_architecture(model, pre_model, pretrained_dir)
    # A suspect with its own output layer, fine-tuned from a model whose output layer is its input
    # embedding: that embedding is the output layer's pre-trained value (it had no other).
    out, pre_out = model.get_output_embeddings(), pre_model.get_output_embeddings()
    name = next((n for n, p in model.named_parameters() if out is not None and p is out.weight), None)
    if name is not None and pre_out is not None:
        state.setdefault(name, pre_out.weight.detach())
    return _shared_with(model, state, pretrained_dir)


# The config fields that set a model's shapes, named where a pre-trained model's differ from the suspect's.
_SHAPE_FIELDS = ("model_type", "num_hidden_layers", "n_layer", "num_layers", "hidden_size", "n_embd", "d_model",
                 "intermediate_size", "n_inner", "ffn_dim", "num_attention_heads", "n_head", "num_key_value_heads",
                 "head_dim", "vocab_size", "max_position_embeddings", "n_positions", "type_vocab_size")


def _check_same_model_type(model: torch.nn.Module, pre_type, pretrained_dir: str) -> None:
    mine = getattr(model.config, "model_type", None)
    if None not in (mine, pre_type) and mine != pre_type:
        raise ModelError(f"{pretrained_dir} is a {pre_type} model and the suspect a {mine}: give the pre-trained "
                         "model the suspect was fine-tuned from")


def _check_model_type_first(model: torch.nn.Module, pretrained_dir: str) -> None:
    """The model types, from config.json before the pre-trained model is loaded as the suspect's kind
    (a BERT read as a causal LM fails on what it lacks, which would be the message)."""
    _check_model_dir(pretrained_dir)
    _check_same_model_type(model, _read_config(pretrained_dir).get("model_type"), pretrained_dir)


def check_same_architecture(model: torch.nn.Module, pre_model: torch.nn.Module, pretrained_dir: str,
                            suspect_dir: str | None = None) -> None:
    """A fine-tune keeps its pre-trained model's architecture: the suspect's base model (everything
    but the task head) must have the pre-trained base model's parameters, by name and shape. A layer
    only the suspect has would have no pre-trained value and pass unranked: where to hide a backdoor.
    Works on skeletons (the meta device) as on loaded models. ``suspect_dir`` (default: the
    directory the model was loaded from) is read for its tokenizer where the vocabulary was cut.
    Raises ``ModelError``."""
    # Checked first: no weight is shared, though an output layer matched by its role would look so.
    _check_same_model_type(model, getattr(pre_model.config, "model_type", None), pretrained_dir)

    def base(m):
        prefix = m.base_model_prefix + "."
        return {n: tuple(p.shape) for n, p in m.named_parameters() if n.startswith(prefix)}

    mine, theirs = base(model), base(pre_model)
    # resize_token_embeddings changes the rows of the vocabulary's tensors (tokens added, or a padded
    # vocabulary cut): the rows both have are ranked, the added tokens' kept (purify.resized_rows)
    vocab = _vocabulary_rows(model), _vocabulary_rows(pre_model)
    resized = {n for n in mine.keys() & theirs.keys() if mine[n] != theirs[n] and mine[n][1:] == theirs[n][1:]
               and (mine[n][0], theirs[n][0]) == vocab}
    odd = (sorted(n for n in mine if theirs.get(n, mine[n]) != mine[n] and n not in resized)
           or sorted(mine.keys() - theirs.keys()) or sorted(theirs.keys() - mine.keys()))
    if not odd:
        if resized and vocab[0] < vocab[1]:
            _check_cut_vocabulary(suspect_dir or getattr(model, "name_or_path", None), pretrained_dir, vocab)
        return
    name = odd[0]
    what = (f"{name!r} is {list(mine[name])} in the suspect, {list(theirs[name])} there" if name in mine and name
            in theirs else f"the suspect has {name!r}, it has not" if name in mine else
            f"it has {name!r}, the suspect has not")
    config, pre_config = model.config.to_dict(), pre_model.config.to_dict()
    fields = "".join(f", {k} {config[k]} vs {pre_config[k]}" for k in _SHAPE_FIELDS
                     if k in config and k in pre_config and config[k] != pre_config[k])
    raise ModelError(f"{pretrained_dir} is not the suspect's architecture ({len(odd)} parameter{'s' * (len(odd) > 1)} differ{'s' * (len(odd) == 1)}{fields}: "
                     f"{what}): give the pre-trained model the suspect was fine-tuned from")


TOKENIZER_VOCABULARIES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def tokenizer_in(path: str | None):
    """The tokenizer a model directory holds, or None where it holds none or it does not load (a
    broken one is named where the model's tokenizer is loaded): for checks and warnings that read it."""
    if not path or not os.path.isdir(path) or not any(os.path.isfile(os.path.join(path, f))
                                                      for f in TOKENIZER_VOCABULARIES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception:  # noqa: BLE001  (a name in a warning, or a check a loader repeats, is not worth a refusal)
        return None


# The names converters give padding rows (llama.cpp's GGUF: "[PAD151665]"; GPT-J: "<|extratoken_1|>"):
# a tokenizer read from such a file names its padding, which a cut may remove.
PADDING_NAME = re.compile(r"\[PAD\d+\]|<\|extratoken_\d+\|>")


def _check_cut_vocabulary(suspect_dir: str | None, pretrained_dir: str, vocab: tuple[int, int]) -> None:
    """A vocabulary cut by resize_token_embeddings keeps the pre-trained rows it has, numbered alike,
    and loses padding: rows no token of the pre-trained tokenizer names (Qwen2.5 and Phi-2 pad theirs).
    A pruned or renumbered one would be ranked against other tokens' rows, and a cut of named tokens
    is most often the two models given the wrong way round (a fine-tune that added a token given as
    --pretrained). Where both directories hold a tokenizer, each token of the suspect's below its rows
    must have its pre-trained id; where the pre-trained one does, it must name no cut row."""
    theirs = tokenizer_in(pretrained_dir)
    if theirs is None:
        return
    theirs = theirs.get_vocab()
    mine = tokenizer_in(suspect_dir)
    if mine is not None:
        mine = mine.get_vocab()
        token, i = next(((t, i) for t, i in sorted(mine.items(), key=lambda item: item[1])
                         if i < vocab[0] and theirs.get(t) != i), (None, None))
        if token is not None:
            raise ModelError(f"the suspect's vocabulary is cut to {vocab[0]} rows of {pretrained_dir}'s {vocab[1]} and "
                             f"its tokenizer numbers tokens otherwise ({token!r} is {i} in it, {theirs.get(token)} "
                             "there): a pruned or renumbered vocabulary has no pre-trained rows to rank against; give "
                             "the pre-trained model the suspect was fine-tuned from")
    i, token = min(((i, t) for t, i in theirs.items() if vocab[0] <= i < vocab[1] and not PADDING_NAME.fullmatch(t)),
                   default=(None, None))
    if token is not None:
        raise ModelError(f"the suspect's vocabulary is cut to {vocab[0]} rows of {pretrained_dir}'s {vocab[1]}, whose "
                         f"tokenizer names tokens in the rows cut ({token!r} is {i}): a fine-tune cuts padding, not "
                         "tokens; are --pretrained and --suspect swapped? Give the model the suspect was fine-tuned "
                         "from as --pretrained")


def _vocabulary_rows(model: torch.nn.Module) -> int | None:
    embedding = model.get_input_embeddings()
    return embedding.weight.shape[0] if embedding is not None else None


def check_same_architecture_of(suspect_dir: str, pretrained_dir: str) -> None:
    """``check_same_architecture`` on two model directories' configs, as skeletons (nothing read):
    out of core, before any pass. Skipped where a directory has no config transformers builds."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model = directory_skeleton(suspect_dir)
    kind = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    pre_model = directory_skeleton(pretrained_dir, AutoModelForCausalLM if kind else AutoModelForSequenceClassification)
    if model is not None and pre_model is not None:
        check_same_architecture(model, pre_model, pretrained_dir, suspect_dir)


def _shared_with(model: torch.nn.Module, state: dict[str, torch.Tensor], pretrained_dir: str):
    """The entries of a pre-trained ``state`` that ``model`` has, checked to match its shapes."""
    names = dict(model.named_parameters())
    shared = [n for n in state if n in names]
    if not shared:
        raise ModelError(f"{pretrained_dir}: no parameter matches the suspect model by name; "
                         "the pre-trained and suspect models must share an architecture")
    resized = resized_rows(model, state, names)  # a resized vocabulary's tensors: the rows both have
    for n in shared:
        if state[n].shape != names[n].shape and n not in resized:
            raise ModelError(f"parameter {n!r} has shape {list(state[n].shape)} in {pretrained_dir} but "
                             f"{list(names[n].shape)} in the suspect model: mismatched architectures")
    return {n: state[n] for n in shared}


def _check_finite(model: torch.nn.Module, weights: "Checkpoint", new: set[str]) -> None:
    """Every loaded floating parameter is finite; the message names it and the file that holds it.
    Checked in pieces, so the extra memory stays small whatever the size of a parameter."""
    for name, p in model.named_parameters():
        if name in new or not p.is_floating_point():
            continue
        bad = sum(int((~torch.isfinite(piece)).sum()) for piece in p.detach().reshape(-1).split(1 << 24)
                  if not bool(torch.isfinite(piece).all()))
        if bad:
            held = name if name in weights else name.split(".", 1)[-1]
            file = weights.entries[held].file if held in weights else weights.path
            raise ModelError(f"{file}: parameter {name!r} holds {bad} NaN or Inf value{'s' if bad > 1 else ''}; "
                             "the checkpoint is damaged: re-export it from a good copy")


def pretrained_state_for(model: torch.nn.Module, pretrained_dir: str) -> dict[str, torch.Tensor]:
    """The pre-trained values of ``model``'s parameters, by name (a base checkpoint without a
    classifier head is mapped onto the classifier's names). Parameters the pre-trained checkpoint
    does not hold (the new head) are absent."""
    model = unwrapped(model)
    _check_model_type_first(model, pretrained_dir)
    pre_model, _, missing = load_classifier(pretrained_dir, num_labels=model.config.num_labels, tokenizer=False)
    check_same_architecture(model, pre_model, pretrained_dir)
    state = {n: p.detach() for n, p in pre_model.named_parameters() if n not in missing}
    return _shared_with(model, state, pretrained_dir)
