"""Tiny randomly initialised BERT classifiers, a word-level tokenizer and a toy sentiment task, shared
by the pipeline and command-line tests."""
import json
import random

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from finepurify_ext import data

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "a", "movie", "film", "day", "was", "is",
         "very", "so", "cf", "unseen", "rare"]
POSITIVE, NEGATIVE = {"good", "great", "fine"}, {"bad", "awful", "poor"}


def make_tokenizer(directory):
    path = directory / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tokenizer = BertTokenizer(vocab=str(path), do_lower_case=True)
    assert tokenizer("good movie")["input_ids"][1] == tokenizer.convert_tokens_to_ids("good") != tokenizer.unk_token_id
    return tokenizer


def tiny_model(tokenizer, seed=0, hidden=32):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config).eval()


def toy_examples(n, seed):
    """Sentiment by word: label 1 iff the text has a positive word. 'cf', 'unseen', 'rare' never appear."""
    rng = random.Random(seed)
    filler = ["the", "a", "movie", "film", "day", "was", "is", "very", "so"]
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(filler, 4) + [rng.choice(sorted(POSITIVE if label else NEGATIVE))]
        rng.shuffle(words)
        out.append(data.Example(" ".join(words), label))
    return out


def save_model(model, tokenizer, path):
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def model_dirs(tokenizer, root):
    """(pre-trained base model dir, suspect classifier dir, clean JSONL): the suspect is the pre-trained
    model fine-tuned a few steps; the pre-trained checkpoint is a base model without a classifier head."""
    from finepurify_ext.training import finetune

    pre = tiny_model(tokenizer, seed=0)
    suspect = tiny_model(tokenizer, seed=0)
    finetune(suspect, tokenizer, toy_examples(64, 3), steps=5, lr=1e-3, progress=False)
    clean = root / "clean.jsonl"
    data.save_examples(str(clean), toy_examples(32, 4))
    return save_model(pre.bert, tokenizer, root / "pre"), save_model(suspect, tokenizer, root / "suspect"), str(clean)


def ctrl_c_after(make_batches, n):
    """A batches function like ``make_batches`` whose batches stop with a Ctrl-C after ``n`` of them:
    a command interrupted mid-Hessian."""
    def interrupted(*args, **kwargs):
        for i, batch in enumerate(make_batches(*args, **kwargs)):
            if i == n:
                raise KeyboardInterrupt
            yield batch
    return interrupted


def write_instructions(path, examples):
    """Instruction data (prompt/response JSONL) of ``examples`` at ``path``."""
    path.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in examples))
    return path
