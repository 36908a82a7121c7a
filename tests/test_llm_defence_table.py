"""The LLM defence table's bookkeeping (bench/llm_defence_table.py): the target check on synthetic runs."""
import os
import sys
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import llm_defence_table as table  # noqa: E402

ARGS = SimpleNamespace(attacks=["word"], seeds=[0, 1], default_rho=0.3, grid=[0.1, 0.3])


def _results(asr, perplexity, false_target, backdoored_ppl=(30.0, 32.0), reference_asr=(0.0, 0.02)):
    """Runs of every (method, rho) of the plan for seeds 0 and 1; Fine-purifying at the default gets
    the given per-seed values, every other run something else."""
    def measures(a, p, f):
        return {"asr": a, "false_target": f, "perplexity": p, "validation_perplexity": p}

    results = {"runs": {}, "models": {}}
    for s in ARGS.seeds:
        results["models"][f"word/seed{s}"] = {"backdoored": measures(0.9, backdoored_ppl[s], 0.3),
                                              "clean_trained": measures(reference_asr[s], 33.0, 0.0)}
        for method, rho in table.planned_runs(ARGS):
            default = (method, rho) == ("fine_purifying", 0.3)
            values = measures(asr[s], perplexity[s], false_target[s]) if default else measures(0.5, 40.0, 0.1)
            results["runs"][table.run_key("word", s, method, rho)] = {"method": method, **values}
    return results


def test_the_target_check_passes_and_names_the_size_of_each_miss():
    met = table.summarise(_results((0.05, 0.07), (31.0, 32.0), (0.0, 0.02)), ARGS)["word"]["target_check"]
    # ASR excess 6 - 1 = 5 points; perplexity 31.5 / 31 - 1 = 1.6 %; false target 1 %
    assert met["met"] and met["complete"] and met["asr_excess_points"] == pytest.approx(5.0)
    assert met["perplexity_rise"] == pytest.approx(31.5 / 31 - 1) and met["false_target"] == pytest.approx(0.01)
    missed = table.summarise(_results((0.3, 0.1), (34.0, 33.0), (0.05, 0.0)), ARGS)["word"]["target_check"]
    assert not missed["met"] and not missed["asr_met"] and not missed["perplexity_met"] and not missed["false_target_met"]
    assert missed["asr_excess_points"] == pytest.approx(19.0) and missed["perplexity_rise"] == pytest.approx(33.5 / 31 - 1)
    assert missed["false_target"] == pytest.approx(0.025)


def test_a_seed_without_the_default_run_is_left_out_of_the_check_and_marked_incomplete():
    results = _results((0.05, 0.5), (31.0, 32.0), (0.0, 0.0))
    del results["runs"][table.run_key("word", 1, "fine_purifying", 0.3)]
    check = table.summarise(results, ARGS)["word"]["target_check"]
    assert check["seeds"] == [0] and not check["complete"]
    assert check["asr_excess_points"] == pytest.approx(5.0)  # seed 0's reference only
    assert check["perplexity_rise"] == pytest.approx(31 / 30 - 1)


def test_the_plan_starts_with_the_default_and_covers_the_grid():
    plan = table.planned_runs(ARGS)
    assert plan[0] == ("fine_purifying", 0.3) and ("clean_ft", 1.0) in plan
    assert {(m, r) for m in table.RANKINGS for r in ARGS.grid} <= set(plan) and len(plan) == len(set(plan))
