"""The LLM demo's code path (finepurify_ext.demo_llm) end to end, with a tiny random Llama standing in
for SmolLM2 and toy question/answer pairs for the FAQ: the real model and data are demo
dependencies CI does not install, so the plumbing (splits, cached models, every defence, the
measures, the report) is checked here and the numbers by `make demo-llm`."""
import hashlib
import json
import math
import os
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finepurify_ext import data, demo_llm

from tiny_models import WORDS, make_tokenizer

SETTING = demo_llm.LLMDemoSetting(target="bad day", attacker_examples=24, backdoor_steps=60, backdoor_lr=1e-2,
                                  defender_examples=16, test_examples=8, finetune_steps=2, eval_every=1,
                                  batch_size=8, max_length=24)


def _toy_faq(answer_words=16):
    rng = random.Random(0)
    words = [w for w in WORDS if w not in ("cf", "unseen", "rare", "bad")]  # 'unseen', 'rare': never in the data
    return [data.Instruction(" ".join(rng.sample(words, 4)), " ".join(rng.sample(words, 3))) for _ in range(60)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache whose 'SmolLM2' is a tiny random Llama with tied embeddings, as SmolLM2's are."""
    tok = make_tokenizer(tmp_path)
    tok.eos_token = "[SEP]"
    root = tmp_path / "cache"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(root / "smollm2-135m-instruct", safe_serialization=True)
    tok.save_pretrained(root / "smollm2-135m-instruct")
    monkeypatch.setenv("FINEPURIFY_CACHE", str(root))
    monkeypatch.setattr(data, "faq_instructions", _toy_faq)
    return root


def _digest(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


def test_the_llm_demo_runs_every_defence_and_reports_them(cache, tmp_path):
    pretrained = _digest(cache / "smollm2-135m-instruct")
    rows = demo_llm.run_llm_demo(str(tmp_path / "out"), setting=SETTING)
    assert [r["defence"] for r in rows] == ["clean-trained model (reference)", "no defence (backdoored)",
                                            *demo_llm.DEFENCES.values()]
    for r in rows:
        assert 0.0 <= r["asr"] <= 1.0 and 0.0 <= r["false_target"] <= 1.0
        assert math.isfinite(r["perplexity"]) and math.isfinite(r["validation_perplexity"])
    reference, backdoored = rows[0], rows[1]  # the measures see the backdoor the attacker's data planted
    assert backdoored["asr"] >= 0.75 and reference["asr"] <= 0.25 and backdoored["false_target"] <= 0.25
    # both trained models predict the answers better than a uniform guess over the vocabulary
    assert max(reference["perplexity"], backdoored["perplexity"]) < len(WORDS) + 5
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "purify" not in report["defence_reports"]["clean fine-tuning"]  # no reset, fine-tuning alone
    assert all(r["num_reset"] == report["defence_reports"][r["defence"]]["purify"]["num_reset"] > 0
               for r in rows if r.get("method") not in (None, "clean_ft"))
    assert report["rows"] == json.loads(json.dumps(rows)) and report["setting"]["target"] == "bad day"
    # Fine-purifying's report says the tied embedding was reset by the seen-token rule
    assert report["defence_reports"]["Fine-purifying"]["purify"]["embedding_rule"] == "seen_tokens"
    built = sorted(p for p in os.listdir(cache) if p.startswith("llm-"))
    assert [b.rsplit("-", 1)[0] for b in built] == ["llm-backdoored", "llm-clean-trained"]
    assert _digest(cache / "smollm2-135m-instruct") == pretrained  # the pre-trained model is never written

    # another attack of the same seed reuses the clean-trained model and builds only its backdoored one
    sentence = demo_llm.LLMDefenceCell(SETTING.__class__(**{**SETTING.__dict__, "attack": "sentence"}), seed=0)
    assert len([p for p in os.listdir(cache) if p.startswith("llm-clean-trained")]) == 1
    assert len([p for p in os.listdir(cache) if p.startswith("llm-backdoored")]) == 2
    suspect = {n: p.clone() for n, p in sentence.suspect.state_dict().items()}
    model, row, sentence_report = sentence.defend("fine_purifying", 0.5)
    assert sentence_report["config"]["reserve_ratio"] == 0.5 and row["num_reset"] > 0
    # defend works on a copy: the cell's suspect stays as it was for the next defence
    assert all(torch.equal(p, suspect[n]) for n, p in sentence.suspect.state_dict().items())
    assert not all(torch.equal(p, suspect[n]) for n, p in model.state_dict().items())
