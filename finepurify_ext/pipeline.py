"""The method end to end on a transformers classifier: estimate the clean Hessian, score, reset the
most abnormal dimensions, fine-tune on the clean data; plus loading untrusted models safely and
writing results atomically."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from .data import Example, batches
from .hessian import estimate_hessian
from .purify import PurifyConfig, purify_
from .training import finetune

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time


@dataclass
class FinetuneConfig:
    """Step 5: clean fine-tuning after the reset."""
    steps: int = 150
    lr: float = 5e-5
    batch_size: int = 16
    weight_decay: float = 0.01
    max_length: int = 64


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
) -> dict:
    """Purifies ``model`` in place. ``config=None`` skips the reset (plain clean fine-tuning).
    Returns the report: Hessian, purification and fine-tuning details with timings."""
    if not clean:
        raise ValueError("fine_purify: the clean data is empty; give at least one labelled example")
    report: dict = {"seed": seed, "clean_examples": len(clean)}
    timings = report.setdefault("timings_s", {})
    if config is not None:
        start = time.perf_counter()
        n_batches = -(-len(clean) // hessian_config.batch_size)
        hessians, count = estimate_hessian(
            model, batches(tokenizer, clean, hessian_config.batch_size, hessian_config.max_length),
            per_sample=hessian_config.per_sample, progress=progress, total=n_batches,
        )
        timings["hessian"] = time.perf_counter() - start
        report["hessian"] = {"mode": "per-sample" if hessian_config.per_sample else "per-batch",
                             "squared_gradients": count}
        start = time.perf_counter()
        purified = purify_(model, pretrained_state, hessians, config.replace(seed=seed))
        timings["score_and_reset"] = time.perf_counter() - start
        report["config"] = dataclasses.asdict(config)
        report["purify"] = purified.to_dict()
    start = time.perf_counter()
    finetune(model, tokenizer, clean, steps=finetune_config.steps, lr=finetune_config.lr,
             batch_size=finetune_config.batch_size, weight_decay=finetune_config.weight_decay,
             max_length=finetune_config.max_length, seed=seed, progress=progress, desc="clean fine-tune")
    timings["finetune"] = time.perf_counter() - start
    report["finetune"] = dataclasses.asdict(finetune_config)
    return report


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
