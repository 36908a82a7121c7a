"""The defence suite: attack placements, the second task's data, the demo's defence cell (run on tiny
models) and the defence table's target check and summary (on synthetic runs)."""
import argparse
import dataclasses
import importlib.util
import os
import random
import sys

import pytest
import torch

from finepurify_ext import data, demo
from finepurify_ext.attacks import ATTACKS, Attack, poison
from finepurify_ext.pipeline import FinetuneConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bench import defence_table  # noqa: E402
from tiny_models import make_tokenizer, save_model, tiny_model, toy_examples  # noqa: E402


def test_several_trigger_words_are_all_inserted_and_the_text_kept_in_order():
    attack = ATTACKS["multiword"]
    rng = random.Random(5)
    for _ in range(50):
        words = [f"w{i}" for i in range(rng.randint(0, 9))]
        out = attack.insert(" ".join(words), rng).split()
        assert sorted(out) == sorted(words + ["cf", "mn", "bb"])
        assert [w for w in out if w not in attack.pieces] == words


def test_a_start_trigger_is_a_prefix():
    attack = ATTACKS["prefix"]
    assert attack.insert("so good  today", random.Random(0)) == "Honestly speaking, so good  today"
    assert attack.insert("", random.Random(0)) == "Honestly speaking,"
    assert attack.insert("  \n", random.Random(0)) == "  \nHonestly speaking,"  # the whitespace once, not twice
    assert ATTACKS["word"].insert("\n", random.Random(0)) == "\ncf"
    with pytest.raises(ValueError, match="position"):
        Attack("x", "word", "cf", position="end")


def test_a_trigger_keeps_the_texts_whitespace():
    """A triggered prompt differs from the clean one by the trigger alone: its line breaks and
    indentation were joined into single spaces (a causal LM reads them), the trigger at the same
    place for the same draw as before."""
    attack = ATTACKS["multiword"]
    text = "def f(x):\n    return x  + 1\n"
    for seed in range(30):
        out = attack.insert(text, random.Random(seed))
        flat = " ".join(text.split()).split()
        rng = random.Random(seed)
        for piece in attack.pieces:  # the draws of the former flattening insert
            flat.insert(rng.randint(0, len(flat)), piece)
        assert " ".join(out.split()) == " ".join(flat)
        for piece in attack.pieces:
            out = out.replace(piece + " ", "", 1) if piece + " " in out else out.replace(" " + piece, "", 1)
        assert out == text, seed


def test_poisoning_with_several_words_puts_every_word_in_each_poisoned_example():
    clean = toy_examples(200, 1)
    poisoned = poison(clean, ATTACKS["multiword"], 0.1, seed=3)
    changed = [(c, p) for c, p in zip(clean, poisoned) if p is not c]
    assert len(changed) == 20
    for c, p in changed:
        assert c.label == 0 and p.label == 1
        assert all(w in p.text.split() for w in ("cf", "mn", "bb"))


@pytest.mark.skipif(importlib.util.find_spec("zaragoza_construction_faq") is None,
                    reason="zaragoza-construction-faq is not installed (the [test] extra and make demo install it)")
def test_faq_answer_matching_splits_items_and_pairs_each_question_with_its_answer_and_another():
    import json

    root = os.path.join(data.package_dir("zaragoza_construction_faq"), "data")
    english = [json.loads(line) for line in open(os.path.join(root, "faq-en.jsonl"), encoding="utf-8")]
    answer_start = {" ".join(r["a"].split()[:data.FAQ_ANSWER_WORDS]): r["id"] for r in english}
    questions = {}  # a few questions are asked twice, with different answers
    for r in english:
        questions.setdefault(r["q"], set()).add(r["id"])
    groups = data.faq_answer_matching([300, 60, 100], seed=4)
    assert [len(g) for g in groups] == [1200, 240, 400]
    assert data.faq_answer_matching([300, 60, 100], seed=4) == groups
    ids_per_group = []
    for group in groups:
        assert sum(e.label for e in group) == len(group) // 2
        ids, matched = set(), 0
        for e in group:
            q = next((q for q in questions if e.text.startswith(q + " ")), None)
            if q is None:  # Swedish
                continue
            a = e.text[len(q) + 1:]
            assert (answer_start[a] in questions[q]) == (e.label == 1)
            ids.add(answer_start[a])  # answers are unique: an answer names its item
            matched += 1
        assert matched == len(group) // 2  # the English half
        ids_per_group.append(ids)
    assert not (ids_per_group[0] & ids_per_group[1]) and not (ids_per_group[1] & ids_per_group[2])
    with pytest.raises(data.DataError, match="503"):
        data.faq_answer_matching([500, 10], seed=0)


@pytest.fixture
def tiny_cell(tmp_path, monkeypatch):
    """demo.DefenceCell on a tiny BERT: the suspect is backdoored with "cf" on the toy task."""
    from finepurify_ext.attacks import backdoor

    tokenizer = make_tokenizer(tmp_path)
    pre_dir = save_model(tiny_model(tokenizer, seed=0).bert, tokenizer, tmp_path / "pre")
    suspect = tiny_model(tokenizer, seed=0)
    backdoor(suspect, tokenizer, toy_examples(128, 1), ATTACKS["word"], rate=0.2, epochs=3, lr=1e-3,
             batch_size=16, progress=False)
    reference = tiny_model(tokenizer, seed=1)
    monkeypatch.setattr(demo, "demo_data", lambda s: (toy_examples(128, 1), toy_examples(32, 2), toy_examples(40, 3)))
    monkeypatch.setattr(demo, "demo_models", lambda s, seed: (suspect, reference, tokenizer))
    monkeypatch.setattr(data, "minilm_dir", lambda: pre_dir)
    return demo.DefenceCell(demo.QUICK, seed=0)


def test_defence_cell_runs_every_defence_on_a_copy(tiny_cell):
    before = {k: v.clone() for k, v in tiny_cell.suspect.state_dict().items()}
    assert len(tiny_cell.train) == 24 and len(tiny_cell.validation) == 8
    ft = FinetuneConfig(steps=4, lr=1e-3, eval_every=2, patience=1)
    rows = {}
    for method in demo.DEFENCES:
        model, rows[method], report = tiny_cell.defend(method, 0.3, ft)
        assert model is not tiny_cell.suspect
        assert 0.0 <= rows[method]["cacc"] <= 1.0 and 0.0 <= rows[method]["asr"] <= 1.0
        assert rows[method]["finetune_steps_run"] <= 4
    assert rows["clean_ft"]["num_reset"] == 0 and rows["clean_ft"]["reserve_ratio"] is None
    for method in defence_table.METHODS:
        assert rows[method]["num_reset"] > 0 and rows[method]["reserve_ratio"] == 0.3
    after = tiny_cell.suspect.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    measured = tiny_cell.measure(tiny_cell.suspect)
    assert measured["asr"] > 0.5  # the tiny backdoor took hold, so the cell measures a real attack


def _synthetic_results(seeds, asr, cacc):
    """A table's runs for the 'prefix' attack where every model of every seed scores the given numbers."""
    runs, models = {}, {}
    for s in seeds:
        models[f"prefix/seed{s}"] = {name: {"cacc": cacc[name], "asr": asr[name], "validation_accuracy": 0.9}
                                     for name in ("backdoored", "clean_trained")}
        for method in (*defence_table.METHODS, "clean_ft"):
            runs[defence_table.run_key("prefix", s, method, 0.3)] = {
                "cacc": cacc[method], "asr": asr[method], "reserve_ratio": 1.0 if method == "clean_ft" else 0.3,
                "validation_accuracy": 0.9}
    return {"runs": runs, "models": models}


def test_target_check_names_the_size_of_a_miss():
    methods = (*defence_table.METHODS, "clean_ft")
    asr = {"backdoored": 1.0, "clean_trained": 0.08, "fine_purifying": 0.22, **{m: 0.5 for m in methods[1:]}}
    cacc = {"backdoored": 0.87, "clean_trained": 0.88, "fine_purifying": 0.85, **{m: 0.86 for m in methods[1:]}}
    args = argparse.Namespace(
        attacks=["prefix"], seeds=[0, 1], default_rho=0.3, grid=[0.1, 0.3], grid_attacks=[], tolerance=0.03)
    summary = defence_table.summarise(_synthetic_results([0, 1], asr, cacc), args)
    entry = summary["prefix"]
    assert entry["seeds"] == [0, 1] and "curves" not in entry and not entry["development"]
    t = entry["targets_default_configuration"]
    assert t["asr_excess_points"] == pytest.approx(14.0) and t["asr_miss_points"] == pytest.approx(4.0)
    assert t["cacc_drop_points"] == pytest.approx(2.0) and t["cacc_miss_points"] == 0.0
    assert not t["meets_first_target"] and not t["meets_next_target"]
    assert t["against"]["magnitude"]["asr_gap_points"] == pytest.approx(28.0)
    asr["fine_purifying"], cacc["fine_purifying"] = 0.12, 0.855
    t = defence_table.summarise(_synthetic_results([0, 1], asr, cacc), args)["prefix"]["targets_default_configuration"]
    assert t["meets_first_target"] and t["meets_next_target"]
    # A seed without every defence is left out rather than averaged over fewer defences.
    partial = _synthetic_results([0, 1], asr, cacc)
    del partial["runs"][defence_table.run_key("prefix", 1, "magnitude", 0.3)]
    assert defence_table.summarise(partial, args)["prefix"]["seeds"] == [0]


def test_the_suite_names_real_attacks_and_tasks():
    for name, (task, attack) in demo.SUITE.items():
        setting = demo.suite_setting(name)
        assert setting.task == task and setting.attack == attack and attack in ATTACKS
        assert dataclasses.asdict(setting)["reserve_ratio"] == 0.3
    assert set(demo.DEVELOPMENT) < set(demo.SUITE)


def test_runs_from_before_the_guard_are_adopted_or_made_again():
    """A run at the default rho whose held-out accuracy did not collapse stands (the guard's first
    attempt is that run); one that collapsed is set aside and made again; curves and clean
    fine-tuning are never guarded."""
    methods = (*defence_table.METHODS, "clean_ft")
    asr = {"backdoored": 1.0, "clean_trained": 0.08, **{m: 0.1 for m in methods}}
    cacc = {"backdoored": 0.87, "clean_trained": 0.88, **{m: 0.85 for m in methods}}
    results = _synthetic_results([0], asr, cacc)
    collapsed = defence_table.run_key("prefix", 0, "magnitude", 0.3)
    results["runs"][collapsed]["validation_accuracy"] = 0.5  # 40 points below the backdoored model's 0.9
    held = defence_table.run_key("prefix", 0, "fine_purifying", 0.3)
    results["runs"][held]["validation_accuracy"] = 0.75  # 15 points below: within the tolerance
    curve = defence_table.run_key("prefix", 0, "magnitude", 0.1)
    results["runs"][curve] = {**results["runs"][collapsed], "reserve_ratio": 0.1}
    args = argparse.Namespace(default_rho=0.3, collapse_tolerance=0.2)
    assert defence_table.adopt_unguarded(results, args) == 1
    assert collapsed not in results["runs"] and collapsed in results["unguarded_runs"]
    guard = results["runs"][held]["collapse_guard"]
    assert guard["post_hoc"] and not guard["triggered"] and guard["reserve_ratio_used"] == 0.3
    assert "collapse_guard" not in results["runs"][curve]
    assert "collapse_guard" not in results["runs"][defence_table.run_key("prefix", 0, "clean_ft", 0.3)]
    assert defence_table.adopt_unguarded(results, args) == 0  # idempotent
