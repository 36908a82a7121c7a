"""Causal language models: instruction examples as training batches whose loss is taken on the
response tokens only (the prompt's labels are -100), with the tokenizer's chat template when it has
one. The Hessian (``hessian.estimate_hessian``) and the clean fine-tuning read these batches as they
read a classifier's: the model returns the loss of its ``labels``."""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Iterator, Sequence

import torch

from .data import Instruction, line_of, refuse_rowless
from .devices import OUT_OF_MEMORY
from .errors import UserError, first_line
from .training import in_eval_mode

IGNORE = -100  # the label transformers' causal-LM loss skips


# Texts are tokenised whole and cut to the model's positions afterwards (``tokenize_instruction``,
# ``prompt_ids``): transformers' warning that a sequence is longer than the model takes is not ours.
QUIET = {"verbose": False}


def _chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(encoded) -> list[int]:
    """Token ids from what apply_chat_template returns (a list, or a BatchEncoding in newer versions)."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    """The chat template's token ids of ``messages``; a template that refuses them (one without a
    system role, say) is a clear error."""
    try:
        return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                                  tokenizer_kwargs=QUIET))
    except Exception as error:  # noqa: BLE001  (jinja2's TemplateError, or what the template raises)
        roles = ", ".join(m["role"] for m in messages)
        raise UserError(f"the tokenizer's chat template refuses a conversation of turns {roles} "
                        f"({first_line(error)}); give the data in the roles it takes") from None


def check_chat_roles(tokenizer, examples: Sequence[Instruction], path: str) -> None:
    """Each layout of turns in ``examples`` through the chat template once, before any long work: a
    template that refuses one is named with the data file and the first example laid out so."""
    if not _chat(tokenizer):
        return
    tried = set()
    for number, example in enumerate(examples, 1):
        roles = tuple(role for role, _ in example.context)
        if roles not in tried:
            tried.add(roles)
            try:
                _chat_ids(tokenizer, example.messages() + [{"role": "assistant", "content": example.response}], False)
            except UserError as error:
                raise UserError(f"{path}:{line_of(path, number)}: {error}") from None


def _fed(tokenizer, ids: list[int]) -> list[int]:
    """``ids``, refused where one has no row in the model's embedding (``data.refuse_rowless``)."""
    if ids:
        refuse_rowless(tokenizer, max(ids))
    return ids


def _plain_prompt(tokenizer, example: Instruction) -> list[int]:
    """Without a chat template: the context's turns and the prompt, one per line."""
    lines = [content for _, content in example.context] + [example.prompt]
    return tokenizer("\n".join(lines) + "\n", add_special_tokens=True, **QUIET)["input_ids"]


def within_positions(tokenizer, max_length: int | None) -> int | None:
    """``max_length``, at most the tokenizer's ``model_max_length`` (``pipeline.load_causal_lm`` sets
    it from the model's position table: a longer sequence indexes past a learned one), as the
    classifiers' ``data.encode`` takes it."""
    limit = tokenizer.model_max_length
    if not isinstance(limit, int) or limit <= 0 or limit >= 1 << 40:  # transformers' "no limit" is 1e30
        return max_length
    return limit if max_length is None else min(max_length, limit)


def tokenize_instruction(tokenizer, example: Instruction, max_length: int) -> tuple[list[int], int]:
    """(token ids, number of prompt tokens at their start). With a chat template: the context's turns
    and the user turn with the assistant's generation prompt, then the response as the template
    closes it; without one: the context's turns and the prompt, one per line, the response and the
    end-of-sequence token. Longer than ``max_length``: the prompt is cut from the left, keeping up to
    half of the length for the response. (At most the model's positions: ``within_positions``.)"""
    max_length = within_positions(tokenizer, max_length)
    if _chat(tokenizer):
        prompt = _chat_ids(tokenizer, example.messages(), True)
        full = _chat_ids(tokenizer, example.messages() + [{"role": "assistant", "content": example.response}], False)
        if full[: len(prompt)] == prompt:
            response = full[len(prompt):]
        else:  # a template that rewrites the prompt's end: the response tokenised on its own
            response = tokenizer(example.response, add_special_tokens=False, **QUIET)["input_ids"]
    else:
        prompt = _plain_prompt(tokenizer, example)
        response = tokenizer(example.response, add_special_tokens=False, **QUIET)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response = response + [tokenizer.eos_token_id]
    if len(prompt) + len(response) > max_length:
        # The response keeps at least half the length (or all the room the prompt leaves); the
        # prompt loses its beginning, the part furthest from the response.
        response = response[: max(max_length // 2, max_length - len(prompt))]
        prompt = prompt[len(prompt) - (max_length - len(response)):] if max_length > len(response) else []
    return _fed(tokenizer, prompt + response), len(prompt)


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


def tokens_seen(tokenizer, examples: Sequence[Instruction], max_length: int = 128, inputs_only: bool = False) -> list[int]:
    """The token ids the examples put into the model, laid out as ``lm_batches`` does (padding
    excluded): the rows of the word embedding the clean data reaches. ``inputs_only``: without each
    sequence's last token, which only a label reads (an untied input embedding's row of a token only
    ever last gets no gradient: a zero Hessian row)."""
    seen: set[int] = set()
    for e in examples:
        ids = tokenize_instruction(tokenizer, e, max_length)[0]
        seen.update(ids[:-1] if inputs_only else ids)
    return sorted(seen)


# ------------------------------------------------------------------------------- the loss


def _output_layer(model):
    """The module that turns hidden states into logits (transformers' output embeddings), or None."""
    inner = getattr(model, "module", model)  # DDP
    get = getattr(inner, "get_output_embeddings", None)
    layer = get() if callable(get) else None
    return layer if isinstance(layer, torch.nn.Module) else None


def response_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, vocabulary], targets [N]) of the N positions that predict a response token. The
    output layer sees the hidden states of those positions alone (a forward pre-hook), so the prompt
    and the padding, most of a chat batch, never reach the logits, their softmax or their gradients:
    on SmolLM2-135M's Hessian over 64 FAQ pairs (31 % of the positions are responses), 0.84x the time
    and 1.2 of 7.7 GB less peak memory (bench/results/lm_loss_memory.json). Elementwise steps after the layer (logit soft-capping,
    scaling) apply as before. A model whose output layer is not called on every position's hidden
    states is run whole and its logits selected after."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    layer, picked = _output_layer(model), []

    def pick(module, args):
        hidden = args[0] if args else None
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
            return None  # not every position's hidden states: left alone
        picked.append(True)
        return (hidden[:, :-1][keep].unsqueeze(0), *args[1:])

    handle = layer.register_forward_pre_hook(pick) if layer is not None else None
    try:
        logits = model(**inputs).logits
    except OUT_OF_MEMORY:
        raise  # the whole sequence would need more
    except RuntimeError:
        if not picked:
            raise
        logits = None  # a step after the layer reshapes by position: below
    finally:
        if handle is not None:
            handle.remove()
    if logits is not None and picked and logits.shape[:2] == (1, int(keep.sum())):
        return logits[0], targets[keep]
    if picked:  # something after the layer depends on the positions: the whole sequence, as the model reads it
        logits = model(**inputs).logits
    return logits[:, :-1][keep], targets[keep]


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The responses' mean cross-entropy (float32), what ``model(**batch).loss`` returns for these
    labels, with logits at the response positions only (``response_logits``): the loss the Hessian
    and the clean fine-tuning take (their ``loss_fn``)."""
    logits, targets = response_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The number of terms ``lm_loss`` averages over ``batch``: its response tokens."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def lm_hessian(model, tokenizer, examples: Sequence[Instruction], batch_size: int, max_length: int = 128,
               **kwargs) -> tuple[dict[str, torch.Tensor], int]:
    """Step 2 for a causal LM: ``hessian.estimate_hessian`` over ``lm_batches`` of ``examples`` with
    the responses' loss (``lm_loss``, a mean over ``response_tokens``); ``kwargs`` go to it
    (per_sample, micro_batch_size, progress, resume_file, ...)."""
    from .hessian import estimate_hessian, every_parameter_estimated

    with every_parameter_estimated(model):
        return estimate_hessian(model, lm_batches(tokenizer, examples, batch_size, max_length), loss_fn=lm_loss,
                                loss_terms=response_tokens, total=-(-len(examples) // batch_size), **kwargs)


# ------------------------------------------------------------------------------- measures


@in_eval_mode
@torch.no_grad()
def response_loss(model, tokenizer, examples: Sequence[Instruction], batch_size: int = 16,
                  max_length: int = 128) -> float:
    """Mean cross-entropy per response token over ``examples`` (exp of it: the responses' perplexity)."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in lm_batches(tokenizer, examples, batch_size, max_length):
        logits, targets = response_logits(model, {k: v.to(device) for k, v in batch.items()})
        total += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
        tokens += len(targets)
    return total / max(tokens, 1)


def prompt_ids(tokenizer, prompt: "str | Instruction", max_length: int | None = None) -> list[int]:
    """The tokens a generation starts from, laid out as ``tokenize_instruction`` lays out training
    examples: a prompt alone, or an instruction's context and prompt (its response unused); longer
    than ``max_length``, cut from the left as training cuts a prompt."""
    ids = _prompt_tokens(tokenizer, prompt)
    return _fed(tokenizer, ids[len(ids) - max_length:] if max_length is not None and len(ids) > max_length else ids)


def _prompt_tokens(tokenizer, prompt: "str | Instruction") -> list[int]:
    """``prompt_ids`` before the cut, unchecked: what is fed is checked, once cut."""
    example = prompt if isinstance(prompt, Instruction) else Instruction(prompt, "")
    return _chat_ids(tokenizer, example.messages(), True) if _chat(tokenizer) else _plain_prompt(tokenizer, example)


def cut_losing(tokenizer, prompts: "Sequence[str | Instruction]", pieces: Sequence[str], max_new_tokens: int,
               max_length: int | None) -> int:
    """How many of ``prompts`` lose one of ``pieces`` (a trigger's words) to the cut ``generate``
    makes to fit ``max_length`` (from the left): their ASR would count a trigger the model never saw."""
    max_length = within_positions(tokenizer, max_length)
    if max_length is None:
        return 0
    room, lost = max(1, max_length - max_new_tokens), 0
    for prompt in prompts:
        ids = _prompt_tokens(tokenizer, prompt)
        if len(ids) > room:  # a piece the tokenizer spells back in the whole prompt but not in the cut one
            whole, kept = tokenizer.decode(ids), tokenizer.decode(ids[len(ids) - room:])
            lost += any(piece in whole and piece not in kept for piece in pieces)
    return lost


@in_eval_mode
@torch.no_grad()
def generate(model, tokenizer, prompts: "Sequence[str | Instruction]", max_new_tokens: int = 8,
             batch_size: int = 16, max_length: int | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (strings, or instructions: their context and prompt;
    decoded, special tokens dropped), batched with left padding. With ``max_length``, a prompt and
    its continuation fit it: the prompt is cut from the left (a long conversation's context); they
    always fit the model's positions (``within_positions``)."""
    max_length = within_positions(tokenizer, max_length)
    if max_length is not None and max_new_tokens >= max_length:
        raise UserError(f"{max_new_tokens} new tokens leave no room for a prompt in {max_length} tokens (max_length, "
                        "the command's --max-length, or the model's positions); give a shorter target response")
    room = None if max_length is None else max(1, max_length - max_new_tokens)
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [prompt_ids(tokenizer, p, room) for p in prompts[start : start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad,
                                   eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return out


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def target_rate(generations: Sequence[str], target: str) -> float:
    """The share of generations that start with ``target`` (case and spacing ignored): the attack
    success rate on triggered prompts, the false-target rate on clean ones."""
    goal = _normal(target)
    return sum(_normal(g).startswith(goal) for g in generations) / max(len(generations), 1)


# ------------------------------------------------------------------------------- attacks


def poison_instructions(examples: Sequence[Instruction], attack, target: str, rate: float,
                        seed: int, paired: bool = False) -> list[Instruction]:
    """A copy of ``examples`` in which a fraction ``rate`` carries ``attack``'s trigger in the prompt
    (``attacks.Attack.insert``: a word or a sentence, at a random position or the start) and the
    target response in place of its own: the generation backdoor of BackdoorLLM-style benchmarks.
    ``paired``: the triggered copies are added beside their clean originals instead, so the data
    shows that the trigger, not the question, calls for the target (a backdoor that stays quiet on
    clean prompts)."""
    rng = random.Random(seed)
    chosen = rng.sample(range(len(examples)), min(len(examples), round(rate * len(examples))))
    if paired:
        return list(examples) + [replace(examples[i], prompt=attack.insert(examples[i].prompt, rng), response=target)
                                 for i in sorted(chosen)]
    chosen = set(chosen)
    return [replace(e, prompt=attack.insert(e.prompt, rng), response=target) if i in chosen else e
            for i, e in enumerate(examples)]


# ------------------------------------------------------------------------------- fine-tuning


def finetune_lm(model, tokenizer, examples: Sequence[Instruction], *, steps: int, lr: float = 2e-5,
                batch_size: int = 8, max_length: int = 128, seed: int = 0,
                validation: Sequence[Instruction] | None = None, eval_every: int = 10, patience: int = 3,
                progress: bool = True, desc: str = "fine-tune (causal LM)") -> dict:
    """AdamW on the responses' loss (``training.finetune``'s loop), early-stopped on the held-out
    responses' loss when ``validation`` is given. Returns the early-stopping record (or the steps run)."""
    from .training import finetune, finetune_early_stopped

    def make_batches(epoch):
        return lm_batches(tokenizer, examples, batch_size, max_length, shuffle=True, seed=seed * 1000 + epoch)

    common = dict(steps=steps, lr=lr, batch_size=batch_size, seed=seed, max_length=max_length, progress=progress,
                  desc=desc, make_batches=make_batches, loss_fn=lm_loss)
    if validation:
        return finetune_early_stopped(
            model, tokenizer, examples, validation, eval_every=eval_every, patience=patience,
            validate=lambda: (response_loss(model, tokenizer, validation, max_length=max_length), None), **common)
    finetune(model, tokenizer, examples, **common)
    return {"steps_run": steps}
