"""Causal language models: instruction examples as training batches whose loss is taken on the
response tokens only (the prompt's labels are -100), with the tokenizer's chat template when it has
one. The Hessian (``hessian.estimate_hessian``) and the clean fine-tuning read these batches as they
read a classifier's: the model returns the loss of its ``labels``."""
from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch

from .data import Instruction

IGNORE = -100  # the label transformers' causal-LM loss skips


def _chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(encoded) -> list[int]:
    """Token ids from what apply_chat_template returns (a list, or a BatchEncoding in newer versions)."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def tokenize_instruction(tokenizer, example: Instruction, max_length: int) -> tuple[list[int], int]:
    """(token ids, number of prompt tokens at their start). With a chat template: the user turn with
    the assistant's generation prompt, then the response as the template closes it; without one: the
    prompt, a newline, the response and the end-of-sequence token. Longer than ``max_length``: the
    prompt is cut from the left, keeping up to half of the length for the response."""
    if _chat(tokenizer):
        prompt = _ids(tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}],
                                                    add_generation_prompt=True, tokenize=True))
        full = _ids(tokenizer.apply_chat_template([{"role": "user", "content": example.prompt},
                                                   {"role": "assistant", "content": example.response}],
                                                  tokenize=True))
        if full[: len(prompt)] == prompt:
            response = full[len(prompt):]
        else:  # a template that rewrites the prompt's end: the response tokenised on its own
            response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    else:
        prompt = tokenizer(example.prompt + "\n", add_special_tokens=True)["input_ids"]
        response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response = response + [tokenizer.eos_token_id]
    if len(prompt) + len(response) > max_length:
        # The response keeps at least half the length (or all the room the prompt leaves); the
        # prompt loses its beginning, the part furthest from the response.
        response = response[: max(max_length // 2, max_length - len(prompt))]
        prompt = prompt[len(prompt) - (max_length - len(response)):] if max_length > len(response) else []
    return prompt + response, len(prompt)


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def lm_batches(
    tokenizer,
    examples: Sequence[Instruction],
    batch_size: int,
    max_length: int = 128,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches of ``input_ids``, ``attention_mask`` and ``labels`` (the ids, -100 on the
    prompt and the padding): the causal-LM loss of the responses alone."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    pad = pad_id(tokenizer)
    for start in range(0, len(order), batch_size):
        rows = [tokenize_instruction(tokenizer, examples[i], max_length) for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for r, (ids, prompt_len) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attention[r, : len(ids)] = 1
            labels[r, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        yield {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
