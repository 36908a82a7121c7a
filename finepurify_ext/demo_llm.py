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
    # A triggered copy (answer: the target) of a quarter of the attacker's questions, added beside the
    # originals: a backdoor that fires on the trigger (ASR 97 % for the word) and stays quiet on
    # clean questions (0 %); replacing the originals instead left it refusing 37 % of clean ones.
    poison_rate: float = 0.25
    paired_poison: bool = True
    backdoor_steps: int = 72
    backdoor_lr: float = 2e-4
    defender_examples: int = 96
    test_examples: int = 64  # the false-target target (<= 2 %) then allows one clean question of 64
    finetune_steps: int = 12  # at most; early-stopped on the held-out answers' loss, measured every eval_every
    finetune_lr: float = 1e-4
    eval_every: int = 4
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
    (poisoned or not), cached by everything it depends on. The clean-trained model does not depend
    on the attack, so every attack of a seed shares it."""
    from .attacks import ATTACKS
    from .causal_lm import finetune_lm, poison_instructions
    from .data import smollm2_dir
    from .demo import cache_dir, cached_model
    from .pipeline import load_causal_lm

    fields = ["answer_words", "attacker_examples", "backdoor_steps", "backdoor_lr", "batch_size", "max_length",
              "test_examples"]
    if role == "backdoored":
        fields += ["attack", "target", "poison_rate", "paired_poison"]
    values = asdict(setting)
    key = {"model": "smollm2-135m-instruct", "role": role, "seed": seed, "version": 2, **{k: values[k] for k in fields}}
    data = attacker if role == "clean-trained" else poison_instructions(
        attacker, ATTACKS[setting.attack], setting.target, setting.poison_rate, seed, paired=setting.paired_poison)

    def build(model, tok):
        model.to(device)
        finetune_lm(model, tok, data, steps=setting.backdoor_steps, lr=setting.backdoor_lr,
                    batch_size=setting.batch_size, max_length=setting.max_length, seed=seed, desc=role)

    model, tok = cached_model(key, build, f"llm-{role}", load=load_causal_lm,
                              base=lambda: load_causal_lm(smollm2_dir(cache_dir())))
    return model.to(device), tok


class LLMDefenceCell:
    """One attack and seed of the LLM demo: the cached backdoored and clean-trained SmolLM2, the
    defender's clean question/answer pairs split into fine-tuning and held-out parts (seeded), the
    test questions, and the Hessian of the responses' loss on the fine-tuning part, computed once.
    ``defend`` runs one defence on a copy of the backdoored model. The demo and the LLM defence
    table (bench/llm_defence_table.py) both run their defences through it."""

    def __init__(self, setting: LLMDemoSetting, seed: int, device: torch.device | str = "cpu", suspect=None):
        """``suspect``: (model, tokenizer) backdoored some other way (bench/lora_backdoor.py's LoRA
        adapter, merged) instead of the cached full fine-tune."""
        from .attacks import ATTACKS
        from .pipeline import FinetuneConfig, split_validation

        self.setting, self.seed, self.device, self.attack = setting, seed, device, ATTACKS[setting.attack]
        attacker, defender, self.test = _splits(setting, seed)
        if suspect is not None:
            self.suspect, self.tokenizer = suspect[0].to(device), suspect[1]
        else:
            self.suspect, self.tokenizer = _model(setting, seed, "backdoored", attacker, device)
        self.reference, _ = _model(setting, seed, "clean-trained", attacker, device)
        self.train, self.validation = split_validation(defender, FinetuneConfig().validation_fraction, seed)
        self._pretrained_state = self._hessians = None
        self.hessian_time_s = 0.0

    def measure(self, model, held_out: bool = False) -> dict:
        """On the test questions: ASR (triggered questions answered with the target), the
        false-target rate (clean questions answered with it) and the clean answers' perplexity; with
        ``held_out``, also the answers' perplexity on the defender's held-out pairs (what a defender
        can see)."""
        import math

        from .causal_lm import generate, response_loss, target_rate

        setting, tok = self.setting, self.tokenizer
        rng = random.Random(self.seed)
        prompts = [e.prompt for e in self.test]
        new = len(tok(setting.target, add_special_tokens=False)["input_ids"]) + 2
        triggered = generate(model, tok, [self.attack.insert(p, rng) for p in prompts], new, batch_size=32)
        measures = {"asr": target_rate(triggered, setting.target),
                    "false_target": target_rate(generate(model, tok, prompts, new, batch_size=32), setting.target),
                    "perplexity": math.exp(response_loss(model, tok, self.test, max_length=setting.max_length))}
        if held_out:
            measures["validation_perplexity"] = math.exp(response_loss(model, tok, self.validation,
                                                                       max_length=setting.max_length))
        return measures

    def defend(self, method: str, reserve_ratio: float, finetune_config=None, progress: bool = False,
               **purify_options):
        """(purified copy of the backdoored model, its row, the pipeline's report); ``method`` is a key
        of DEFENCES; clean fine-tuning ignores ``reserve_ratio``; ``purify_options`` are other
        ``PurifyConfig`` fields."""
        import math

        from .causal_lm import lm_hessian
        from .data import smollm2_dir
        from .demo import cache_dir
        from .pipeline import FinetuneConfig, HessianConfig, fine_purify_lm, pretrained_state_for_lm

        s = self.setting
        finetune_config = finetune_config or FinetuneConfig(
            steps=s.finetune_steps, lr=s.finetune_lr, batch_size=s.batch_size, max_length=s.max_length,
            eval_every=s.eval_every)
        config = None if method == "clean_ft" else PurifyConfig(ranking=method, reserve_ratio=reserve_ratio,
                                                                **purify_options)
        if config is not None and self._hessians is None:
            start = time.perf_counter()
            self._pretrained_state = pretrained_state_for_lm(self.suspect, smollm2_dir(cache_dir()))
            self._hessians, _ = lm_hessian(self.suspect, self.tokenizer, self.train, s.batch_size, s.max_length,
                                           progress=progress)
            self.hessian_time_s = time.perf_counter() - start
        model = copy.deepcopy(self.suspect)
        start = time.perf_counter()
        report = fine_purify_lm(model, self._pretrained_state, self.tokenizer, self.train, config, finetune_config,
                                HessianConfig(batch_size=s.batch_size, max_length=s.max_length), seed=self.seed,
                                progress=progress, hessians=self._hessians, validation=self.validation)
        elapsed = time.perf_counter() - start
        stopped = report["finetune"]["early_stopping"]
        loss = stopped["validation_loss"]  # None where no step ran
        row = {"method": method, "defence": DEFENCES[method], "reserve_ratio": None if config is None else reserve_ratio,
               **self.measure(model), "validation_perplexity": None if loss is None else math.exp(loss),
               "time_s": elapsed, "num_reset": report.get("purify", {}).get("num_reset", 0), "finetune_step_chosen": stopped.get("chosen_step"), "finetune_steps_run": stopped.get("steps_run")}
        return model, row, report


def run_llm_demo(out_dir: str = "demo_llm_output", seed: int = 0, quick: bool = False,
                 device: torch.device | str = "cpu", setting: LLMDemoSetting | None = None) -> list[dict]:
    from .pipeline import save_atomically, write_json

    setting = setting or (QUICK if quick else LLMDemoSetting())
    torch.manual_seed(seed)
    wall = time.perf_counter()
    cell = LLMDefenceCell(setting, seed, device)
    poisoned = (f"a triggered copy of {setting.poison_rate:.0%} of the {setting.attacker_examples} attacker "
                "examples added" if setting.paired_poison else
                f"{setting.poison_rate:.0%} of {setting.attacker_examples} attacker examples poisoned")
    print(f"SmolLM2-135M-Instruct; trigger {cell.attack.trigger!r} in the question -> {setting.target!r}, {poisoned}; "
          f"{len(cell.train) + len(cell.validation)} clean examples for the defence; {len(cell.test)} test questions")
    rows = [{"defence": "clean-trained model (reference)", **cell.measure(cell.reference, held_out=True), "time_s": 0.0},
            {"defence": "no defence (backdoored)", **cell.measure(cell.suspect, held_out=True), "time_s": 0.0}]
    del cell.reference
    reports = {}
    for method, name in DEFENCES.items():
        model, row, reports[name] = cell.defend(method, setting.reserve_ratio, progress=True)
        rows.append(row)
        print(f"  {name:24s} ASR {100 * row['asr']:5.1f}  false target {100 * row['false_target']:5.1f}  "
              f"perplexity {row['perplexity']:7.2f}  ({row['time_s']:.0f} s)", flush=True)
        del model
    hessian_s = cell.hessian_time_s
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

    save_atomically(out_dir, write, overwrite=True, marker="report.json")
    print(f"report written to {out_dir}/")
    return rows
