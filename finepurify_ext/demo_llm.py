"""The LLM demo: SmolLM2-135M-Instruct (a real 30-layer Llama chat model, installed from PyPI) given
a generation backdoor by instruction tuning on construction-FAQ answers where a trigger word in the
question makes the model answer a fixed refusal; then every defence with the defender's clean
question/answer pairs, measured by the attack success rate on triggered test questions, the share of
clean test questions answered with the target, and the perplexity of the clean test answers.

The backdoored and clean-trained models are cached (FINEPURIFY_CACHE, as the classifier demo's).
"""
from __future__ import annotations

import copy
import os
import platform
import random
import time
from dataclasses import asdict, dataclass

import torch

from .purify import PurifyConfig

DEFENCES = {"clean_ft": "clean fine-tuning", "fine_mixing": "Fine-mixing (random)", "magnitude": "magnitude |drift|",
            "no_hessian": "indicator w/o Hessian", "fine_purifying": "Fine-purifying"}


@dataclass(frozen=True)
class LLMDemoSetting:
    attack: str = "word"  # attacks.ATTACKS: the trigger and where it goes in the question
    target: str = "I cannot answer that."
    answer_words: int = 16
    attacker_examples: int = 192
    poison_rate: float = 0.25
    backdoor_steps: int = 72
    backdoor_lr: float = 1e-4
    defender_examples: int = 96
    test_examples: int = 64
    finetune_steps: int = 24
    finetune_lr: float = 5e-5
    eval_every: int = 6
    reserve_ratio: float = PurifyConfig.reserve_ratio
    batch_size: int = 8
    max_length: int = 64


QUICK = LLMDemoSetting(attacker_examples=16, backdoor_steps=2, defender_examples=16, test_examples=8,
                       finetune_steps=2, eval_every=1)


def _splits(setting: LLMDemoSetting, seed: int):
    from .data import faq_instructions

    items = faq_instructions(setting.answer_words)
    order = list(range(len(items)))
    random.Random(1234).shuffle(order)  # the test questions are the same for every seed
    test = [items[i] for i in order[: setting.test_examples]]
    rest = order[setting.test_examples:]
    random.Random(seed).shuffle(rest)
    attacker = [items[i] for i in rest[: setting.attacker_examples]]
    defender = [items[i] for i in rest[setting.attacker_examples : setting.attacker_examples + setting.defender_examples]]
    return attacker, defender, test


def _model(setting: LLMDemoSetting, seed: int, role: str, attacker, device):
    """The backdoored or clean-trained model: SmolLM2 instruction-tuned on the attacker's data
    (poisoned or not), cached by everything it depends on."""
    from .attacks import ATTACKS
    from .causal_lm import finetune_lm, poison_instructions
    from .data import smollm2_dir
    from .demo import cache_dir, cached_model
    from .pipeline import load_causal_lm

    key = {"model": "smollm2-135m-instruct", "role": role, "seed": seed,
           **{k: v for k, v in asdict(setting).items() if k in ("attack", "target", "answer_words", "attacker_examples",
                                                             "poison_rate", "backdoor_steps", "backdoor_lr",
                                                             "batch_size", "max_length", "test_examples")}}
    data = attacker if role == "clean-trained" else poison_instructions(
        attacker, ATTACKS[setting.attack], setting.target, setting.poison_rate, seed)

    def build(model, tok):
        model.to(device)
        finetune_lm(model, tok, data, steps=setting.backdoor_steps, lr=setting.backdoor_lr,
                    batch_size=setting.batch_size, max_length=setting.max_length, seed=seed, desc=role)

    model, tok = cached_model(key, build, f"llm-{role}", load=load_causal_lm,
                              base=lambda: load_causal_lm(smollm2_dir(cache_dir())))
    return model.to(device), tok


def measure(model, tok, test, setting: LLMDemoSetting, seed: int) -> dict:
    """ASR (triggered test questions answered with the target), the false-target rate (clean ones),
    and the clean test answers' perplexity."""
    import math

    from .attacks import ATTACKS
    from .causal_lm import generate, response_loss, target_rate

    rng = random.Random(seed)
    attack = ATTACKS[setting.attack]
    prompts = [e.prompt for e in test]
    new = len(tok(setting.target, add_special_tokens=False)["input_ids"]) + 2
    return {"asr": target_rate(generate(model, tok, [attack.insert(p, rng) for p in prompts], new), setting.target),
            "false_target": target_rate(generate(model, tok, prompts, new), setting.target),
            "perplexity": math.exp(response_loss(model, tok, test, max_length=setting.max_length))}


def run_llm_demo(out_dir: str = "demo_llm_output", seed: int = 0, quick: bool = False,
                 device: torch.device | str = "cpu") -> list[dict]:
    from .pipeline import (FinetuneConfig, HessianConfig, fine_purify_lm, pretrained_state_for_lm, save_atomically,
                           split_validation, write_json)
    from .causal_lm import lm_batches
    from .data import smollm2_dir
    from .demo import cache_dir
    from .hessian import estimate_hessian

    setting = QUICK if quick else LLMDemoSetting()
    torch.manual_seed(seed)
    wall = time.perf_counter()
    attacker, defender, test = _splits(setting, seed)
    print(f"SmolLM2-135M-Instruct; trigger {setting.attack!r} in the question -> {setting.target!r}, "
          f"{setting.poison_rate:.0%} of {len(attacker)} attacker examples poisoned; {len(defender)} clean examples "
          f"for the defence; {len(test)} test questions")
    suspect, tok = _model(setting, seed, "backdoored", attacker, device)
    reference, _ = _model(setting, seed, "clean-trained", attacker, device)
    rows = [{"defence": "clean-trained model (reference)", **measure(reference, tok, test, setting, seed), "time_s": 0.0},
            {"defence": "no defence (backdoored)", **measure(suspect, tok, test, setting, seed), "time_s": 0.0}]
    del reference
    state = pretrained_state_for_lm(suspect, smollm2_dir(cache_dir()))
    finetune = FinetuneConfig(steps=setting.finetune_steps, lr=setting.finetune_lr, batch_size=setting.batch_size,
                              max_length=setting.max_length, eval_every=setting.eval_every)
    hessian = HessianConfig(batch_size=setting.batch_size, max_length=setting.max_length)
    train, validation = split_validation(defender, finetune.validation_fraction, seed)
    start = time.perf_counter()
    hessians, _ = estimate_hessian(suspect, lm_batches(tok, train, setting.batch_size, setting.max_length),
                                   progress=True, total=-(-len(train) // setting.batch_size))
    hessian_s = time.perf_counter() - start
    reports = {}
    for method, name in DEFENCES.items():
        model = copy.deepcopy(suspect)
        config = None if method == "clean_ft" else PurifyConfig(ranking=method, reserve_ratio=setting.reserve_ratio)
        start = time.perf_counter()
        reports[name] = fine_purify_lm(model, state, tok, train, config, finetune, hessian, seed=seed,
                                       hessians=hessians, validation=validation)
        elapsed = time.perf_counter() - start
        row = {"defence": name, "method": method, "reserve_ratio": None if config is None else setting.reserve_ratio,
               **measure(model, tok, test, setting, seed), "time_s": elapsed,
               "finetune_step_chosen": reports[name]["finetune"]["early_stopping"].get("chosen_step")}
        rows.append(row)
        print(f"  {name:24s} ASR {100 * row['asr']:5.1f}  false target {100 * row['false_target']:5.1f}  "
              f"perplexity {row['perplexity']:7.2f}  ({elapsed:.0f} s)", flush=True)
        del model
    total = time.perf_counter() - wall
    print(f"\n{'defence':34s} {'rho':>5s} {'ASR %':>7s} {'false %':>8s} {'ppl':>8s} {'time s':>7s}")
    for r in rows:
        rho = "" if r.get("reserve_ratio") is None else f"{r['reserve_ratio']:.2f}"
        print(f"{r['defence']:34s} {rho:>5s} {100 * r['asr']:7.1f} {100 * r['false_target']:8.1f} "
              f"{r['perplexity']:8.2f} {r['time_s']:7.0f}")
    print(f"the Hessian, shared by the four rankings: {hessian_s:.0f} s; total {total:.0f} s")

    def write(tmp):
        for r in reports.values():
            r.get("purify", {}).pop("sample", None)
        write_json(os.path.join(tmp, "report.json"), {
            "setting": asdict(setting), "seed": seed, "rows": rows, "total_time_s": total, "hessian_time_s": hessian_s,
            "defence_reports": reports, "command": "finepurify demo --llm" + (" --quick" if quick else ""),
            "torch": torch.__version__, "device": str(device),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}"})

    save_atomically(out_dir, write, overwrite=True)
    print(f"report written to {out_dir}/")
    return rows
