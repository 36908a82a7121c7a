"""The method end to end on a transformers classifier: estimate the clean Hessian, score, reset the
most abnormal dimensions, fine-tune on the clean data; plus loading untrusted models safely and
writing results atomically."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .data import Example, batches
from .hessian import estimate_hessian
from .purify import PurifyConfig, purify_
from .training import finetune, finetune_early_stopped

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time


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

    def __post_init__(self):
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"the fine-tuning validation_fraction must be in [0, 1), got {self.validation_fraction}")


@dataclass
class HessianConfig:
    per_sample: bool = False
    batch_size: int = 32
    max_length: int = 64


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
) -> dict:
    """Purifies ``model`` in place. ``config=None`` skips the reset (plain clean fine-tuning).
    ``hessians`` (from ``clean_hessian`` at these weights, on the fine-tuning part) skips the estimation.
    ``validation`` is the held-out part for choosing the fine-tuning budget when the caller has split
    the clean data already (then all of ``clean`` is for fine-tuning); otherwise ``finetune_config``
    says how much of ``clean`` to hold out. Returns the report: Hessian, purification and fine-tuning
    details with timings."""
    if not clean:
        raise ValueError("fine_purify: the clean data is empty; give at least one labelled example")
    report: dict = {"seed": seed, "clean_examples": len(clean)}
    if validation is None and finetune_config.validation_fraction > 0:
        clean, validation = split_validation(clean, finetune_config.validation_fraction, seed)
    if validation is not None:
        report["validation_examples"] = len(validation)
    timings = report.setdefault("timings_s", {})
    if config is not None:
        if hessians is None:
            start = time.perf_counter()
            hessians, count = clean_hessian(model, tokenizer, clean, hessian_config, progress)
            timings["hessian"] = time.perf_counter() - start
            report["hessian"] = _hessian_report(hessian_config, count)
        start = time.perf_counter()
        purified = purify_(model, pretrained_state, hessians, config.replace(seed=seed))
        timings["score_and_reset"] = time.perf_counter() - start
        report["config"] = dataclasses.asdict(config)
        report["purify"] = purified.to_dict()
    start = time.perf_counter()
    common = dict(steps=finetune_config.steps, lr=finetune_config.lr, batch_size=finetune_config.batch_size,
                  weight_decay=finetune_config.weight_decay, max_length=finetune_config.max_length,
                  group_by_length=finetune_config.group_by_length, seed=seed, progress=progress,
                  desc="clean fine-tune")
    report["finetune"] = dataclasses.asdict(finetune_config)
    if validation is None:
        finetune(model, tokenizer, clean, **common)
    else:
        report["finetune"]["early_stopping"] = finetune_early_stopped(
            model, tokenizer, clean, validation, eval_every=finetune_config.eval_every,
            patience=finetune_config.patience, **common)
    timings["finetune"] = time.perf_counter() - start
    return report


def _hessian_report(config: HessianConfig, count: int) -> dict:
    return {"mode": "per-sample" if config.per_sample else "per-batch", "squared_gradients": count}


def clean_hessian(model, tokenizer, clean: Sequence[Example], config: HessianConfig = HessianConfig(),
                  progress: bool = True, **resume) -> tuple[dict[str, torch.Tensor], int]:
    """Step 2 on a list of examples: the diagonal Hessian of the clean loss at the model's weights
    (``resume``: ``resume_file`` and ``save_every`` of ``estimate_hessian``)."""
    return estimate_hessian(
        model, batches(tokenizer, clean, config.batch_size, config.max_length),
        per_sample=config.per_sample, progress=progress, total=-(-len(clean) // config.batch_size), **resume,
    )


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
        raise ValueError(f"holding out validation data needs at least 2 clean examples (got {len(clean)}); "
                         "give more clean data, or --validation-fraction 0 with a numeric --reserve-ratio")
    order = list(range(len(clean)))
    random.Random(seed).shuffle(order)
    n_val = min(len(clean) - 1, max(1, round(fraction * len(clean))))
    return [clean[i] for i in order[n_val:]], [clean[i] for i in order[:n_val]]


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
) -> dict:
    """``fine_purify`` with rho chosen on held-out clean data (see ``SelectionConfig``); ``model`` ends
    as the chosen candidate. Candidates are tried from the most reset up and the search stops at the
    first that passes, unless ``exhaustive``. ``on_candidate(rho, model, report)`` sees every candidate."""
    from .training import clean_accuracy

    train, validation = split_validation(clean, selection.validation_fraction, seed)
    start = time.perf_counter()
    hessians, count = clean_hessian(model, tokenizer, train, hessian_config, progress)
    hessian_time = time.perf_counter() - start
    suspect = {n: p.detach().clone() for n, p in model.state_dict().items()}
    suspect_accuracy = clean_accuracy(model, tokenizer, validation)
    selection_report = {**dataclasses.asdict(selection), "train_examples": len(train),
                        "validation_examples": len(validation), "suspect_validation_accuracy": suspect_accuracy,
                        "candidates": []}
    accuracy: dict[float, float] = {}
    best_state, best_report, chosen = None, None, None
    early_stopping = validation if finetune_config.validation_fraction > 0 else None
    for rho in tqdm(selection.candidates(), desc="reserve ratio", disable=not progress, leave=False):
        model.load_state_dict(suspect)
        report = fine_purify(model, pretrained_state, tokenizer, train,
                             None if rho == 1.0 else config.replace(reserve_ratio=rho),
                             finetune_config, hessian_config, seed=seed, progress=progress, hessians=hessians,
                             validation=early_stopping)
        accuracy[rho] = clean_accuracy(model, tokenizer, validation)
        selection_report["candidates"].append({"reserve_ratio": rho, "validation_accuracy": accuracy[rho],
                                               "time_s": sum(report["timings_s"].values())})
        if on_candidate is not None:
            on_candidate(rho, model, report)
        pick = pick_reserve_ratio(accuracy, suspect_accuracy, selection.tolerance)
        if pick != chosen:  # keep the current choice's weights (with the suspect's: two extra copies)
            chosen, best_report = pick, report
            best_state = {n: p.detach().clone() for n, p in model.state_dict().items()}
        if not exhaustive and _within(accuracy[rho], suspect_accuracy, selection.tolerance):
            break
    model.load_state_dict(best_state)
    best_report["timings_s"]["hessian"] = hessian_time
    best_report["hessian"] = _hessian_report(hessian_config, count)
    best_report["selection"] = {**selection_report, "chosen_reserve_ratio": chosen}
    return best_report


# ------------------------------------------------------------------ loading and saving models


class ModelError(ValueError):
    """A model directory that cannot be used; the message names it and the fix."""


def load_classifier(path: str, num_labels: int | None = None):
    """(model, tokenizer, names of parameters the checkpoint did not hold) from a transformers
    directory. Safetensors only, never remote code: the suspect model is untrusted."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if not os.path.isdir(path):
        raise ModelError(f"model directory {path!r} does not exist")
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise ModelError(f"{path}: no .safetensors weights; only safetensors checkpoints are read "
                         "(convert a pickle checkpoint yourself, from a source you trust)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"{path}: no config.json; give a transformers model directory")
    kw = {} if num_labels is None else {"num_labels": num_labels}
    config = AutoConfig.from_pretrained(path, trust_remote_code=False, **kw)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, config=config, use_safetensors=True, trust_remote_code=False, output_loading_info=True
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    missing = set(info.get("missing_keys", ())) | {k for k, *_ in info.get("mismatched_keys", ())}
    model.eval()
    return model, tokenizer, missing


def pretrained_state_for(model: torch.nn.Module, pretrained_dir: str) -> dict[str, torch.Tensor]:
    """The pre-trained values of ``model``'s parameters, by name (a base checkpoint without a
    classifier head is mapped onto the classifier's names). Parameters the pre-trained checkpoint
    does not hold (the new head) are absent."""
    pre_model, _, missing = load_classifier(pretrained_dir, num_labels=model.config.num_labels)
    state = {n: p.detach() for n, p in pre_model.named_parameters() if n not in missing}
    names = dict(model.named_parameters())
    shared = [n for n in state if n in names]
    if not shared:
        raise ModelError(f"{pretrained_dir}: no parameter matches the suspect model by name; "
                         "the pre-trained and suspect models must share an architecture")
    for n in shared:
        if state[n].shape != names[n].shape:
            raise ModelError(f"parameter {n!r} has shape {list(state[n].shape)} in {pretrained_dir} but "
                             f"{list(names[n].shape)} in the suspect model: mismatched architectures")
    return {n: state[n] for n in shared}


def save_atomically(out_dir: str, write, overwrite: bool = False) -> None:
    """Runs write(tmp_dir) and renames tmp_dir to out_dir: a crash leaves no half-written out_dir."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".partial-", dir=parent)
    try:
        write(tmp)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".old-", dir=parent)
            os.replace(out_dir, os.path.join(old, "x"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
