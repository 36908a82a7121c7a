"""LoRA adapters (PEFT's format) as suspect models.

Many fine-tuned models are shared as a LoRA adapter: ``adapter_config.json`` and
``adapter_model.safetensors`` holding, for each adapted weight ``W`` (a module of the pre-trained
model), two low-rank factors with ``W_ft = W_pre + scaling * B @ A``, and whole copies of the few
modules trained in full (``modules_to_save``: a head, a norm, resized embeddings). Fine-purifying
needs the fine-tuned weights themselves, so the adapter is merged into the pre-trained checkpoint it
was trained on, as PEFT's ``merge_and_unload`` would, into a model directory that every command
then reads like any other. The merge streams the checkpoint tensor by tensor (peak memory: the
adapter and a few float32 copies of one tensor), keeps the checkpoint's shards, dtypes and non-weight files, and takes the
adapter's tokenizer where it ships one.

The adapter is untrusted input: its config is JSON, its weights safetensors (a pickled
``adapter_model.bin`` is refused); every tensor it names must be one of the checkpoint's, with the
shape the merge needs. LoRA variants whose merge is not ``scaling * B @ A`` (DoRA, LoRA biases,
trainable tokens, layer replication, ...) are refused, with PEFT's own merge as the way round.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field

import regex
import torch

from .errors import UserError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's saved names: the base model's module names under this prefix
# Options whose merge is more than W + scaling * B @ A; any of them set refuses the adapter.
UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "trainable_token_indices": "trainable tokens",
               "layer_replication": "layer replication", "target_parameters": "adapted parameters (MoE experts)",
               "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA", "alora_invocation_tokens": "aLoRA",
               "arrow_config": "Arrow routing"}
# Initialisations after which the base weights are not the pre-trained ones (PEFT rewrites them as
# W - scaling * B0 @ A0 when it loads the adapter): saved unconverted, the adapter is not W + its product.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Files of the fine-tuned model that an adapter may ship beside its weights (the tokenizer, its chat
# template): they replace the pre-trained checkpoint's.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
# The pre-trained directory's files copied beside the merged weights (configs, tokenizer); never
# weights, pickles or code.
KEPT_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
MERGE_WAY = "merge it with PEFT (merge_and_unload, then save_pretrained) and give that directory"
# A sequence classifier's last head layer, whose rows are its labels (BERT's, RoBERTa's, decoders').
HEADS = ("classifier.out_proj.weight", "classifier.weight", "score.weight")


class AdapterError(UserError):
    """An adapter that cannot be merged here; the message names the file and the fix."""


def is_adapter(path) -> bool:
    """Whether a model option names a LoRA adapter's directory (PEFT's adapter_config.json)."""
    return isinstance(path, str) and os.path.isfile(os.path.join(path, CONFIG))


@dataclass
class Adapter:
    """A LoRA adapter read and checked: its scaling rule and its tensors by the base model's names."""

    path: str
    config: dict
    factors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module: {"A", "B", "kind"}
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor name: its fine-tuned value
    # module: whether its weight is stored [in, out] (transformers' Conv1D, as GPT-2's), by its type
    # where the model is known (PEFT decides by type, whatever the config's fan_in_fan_out says)
    transposed: dict[str, bool] = field(default_factory=dict)

    def scaling(self, module: str, rank: int) -> float:
        """PEFT's scaling of ``module``'s product: lora_alpha / r (or / sqrt(r), rsLoRA), with the
        first key of rank_pattern and alpha_pattern that matches the module's name."""
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8),
                               f"{os.path.join(self.path, CONFIG)}: alpha_pattern")
        return alpha / (math.sqrt(rank) if self.config.get("use_rslora") else rank)

    def rank(self, module: str) -> int:
        return int(_pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8),
                                  f"{os.path.join(self.path, CONFIG)}: rank_pattern"))

    def _stored_transposed(self, module: str) -> bool:
        """Whether the module's weight is B @ A's transpose: an embedding's, or a Conv1D's."""
        f = self.factors[module]
        return f["kind"] == "embedding" or self.transposed.get(module, bool(self.config.get("fan_in_fan_out")))

    def delta(self, module: str) -> torch.Tensor:
        """scaling * B @ A in float32, laid out as the module's weight."""
        f = self.factors[module]
        product = f["B"].float() @ f["A"].float()
        if self._stored_transposed(module):
            product = product.T
        return product * self.scaling(module, f["A"].shape[0])

    def delta_shape(self, module: str) -> tuple[int, int]:
        """The shape of ``delta(module)``, without computing it."""
        f = self.factors[module]
        out, into = f["B"].shape[0], f["A"].shape[1]
        return (into, out) if self._stored_transposed(module) else (out, into)

    @property
    def num_labels(self) -> int:
        """The labels of the classifier the adapter was trained for: the rows of the head it saved."""
        for head in HEADS:
            for name, tensor in self.replaced.items():
                if (name == head or name.endswith("." + head)) and tensor.dim() == 2:
                    return tensor.shape[0]
        raise AdapterError(f"{self.path}: the adapter holds no classifier head ({' or '.join(HEADS)} in "
                           "modules_to_save), which a classifier trained through LoRA saves; give the fine-tuned "
                           "classifier's directory instead")

    @property
    def targets(self) -> list[str]:
        """The checkpoint tensors the adapter changes."""
        return sorted({m + ".weight" for m in self.factors} | set(self.replaced))

    def merged(self, name: str, pretrained: torch.Tensor) -> torch.Tensor:
        """Tensor ``name`` of the fine-tuned model, from the pre-trained one: the adapter's saved copy
        where it has one (a module trained in full, resized embeddings), plus scaling * B @ A where
        the module is adapted; in the pre-trained tensor's dtype."""
        value = self.replaced.get(name, pretrained)
        module = name.removesuffix(".weight")
        if module in self.factors and name.endswith(".weight"):
            if self.factors[module]["kind"] == "embedding":  # PEFT rounds an embedding's product to its dtype first
                value = value.to(pretrained.dtype) + self.delta(module).to(pretrained.dtype)
            else:
                value = value.float() + self.delta(module)
        return value.to(pretrained.dtype)


def _positive(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


# PEFT matches rank_pattern and alpha_pattern keys as regular expressions, and the adapter is
# untrusted: a key such as "(a+)+b" backtracks for hours over a module's name under Python's re. They
# are matched with the regex package (transformers' dependency), which gives up after this long.
PATTERN_TIMEOUT_S = 1.0


def _peft_pattern(key: str) -> str:
    """What PEFT matches a pattern key as: the end of a module's name, at a dot."""
    return rf"(.*\.)?({key})$"


def _pattern_value(pattern: dict, module: str, default, where: str):
    """PEFT's rule: the first pattern key that matches the end of the module's name at a dot.
    ``where`` names the config and option for the message of a key that takes too long."""
    for key, value in pattern.items():
        try:
            if regex.match(_peft_pattern(key), module, timeout=PATTERN_TIMEOUT_S):
                return value
        except TimeoutError:
            raise AdapterError(f"{where} key {key!r} took over {PATTERN_TIMEOUT_S:g} s to match the module name "
                               f"{module!r}; give module names, or a simpler pattern") from None
    return default


def read_adapter(path: str) -> Adapter:
    """The adapter in directory ``path``, checked: LoRA, a merge this module does, safetensors
    weights whose names and shapes are LoRA's. Raises AdapterError naming what is wrong."""
    from safetensors import SafetensorError, safe_open

    config_file = os.path.join(path, CONFIG)
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"{config_file}: not a readable JSON adapter config ({error}); restore it") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file}: not a JSON object; restore the adapter's config")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise AdapterError(f"{config_file}: peft_type {kind!r}; only LoRA adapters are merged here: {MERGE_WAY}")
    for option, what in UNSUPPORTED.items():
        if config.get(option):
            raise AdapterError(f"{config_file}: {option} is set ({what}), whose merge is not W + scaling * B @ A; "
                               f"{MERGE_WAY}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterError(f"{config_file}: init_lora_weights is {init!r}, which changes the base weights as well; "
                           "convert the adapter with PEFT (save_pretrained(..., path_initial_model_for_weight_"
                           "conversion=...)) and give the converted one")
    for option in ("lora_alpha", "r"):
        if not _positive(config.get(option, 8)):
            raise AdapterError(f"{config_file}: {option} is {config.get(option)!r}; expected a positive number")
    for option in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(option) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and _positive(v) for k, v in pattern.items()):
            raise AdapterError(f"{config_file}: {option} is {pattern!r}; expected module names mapped to positive "
                               "numbers")
        for key in pattern:
            try:
                re.compile(_peft_pattern(key))  # as PEFT compiles it
            except re.error as error:
                raise AdapterError(f"{config_file}: {option} key {key!r} is not a regular expression PEFT can match "
                                   f"({error}); give module names") from None
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        pickled = [f for f in ("adapter_model.bin", "adapter_model.pt") if os.path.isfile(os.path.join(path, f))]
        raise AdapterError(f"{path}: no {WEIGHTS}" + (f" ({pickled[0]} is a pickle, which is never loaded: a "
                           "pickle can run code; convert it yourself, from a source you trust)" if pickled else
                           "; give the adapter's directory as PEFT saves it"))
    adapter = Adapter(path, config)
    try:
        with safe_open(weights, framework="pt") as f:
            names = list(f.keys())
            tensors = {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{weights}: not a readable safetensors file ({error}); restore it") from None
    for name, tensor in tensors.items():
        if not name.startswith(PREFIX):
            raise AdapterError(f"{weights}: tensor {name!r} is not under {PREFIX!r}, as PEFT names a LoRA "
                               f"adapter's tensors; {MERGE_WAY}")
        key = name[len(PREFIX):]
        # Older savers kept the adapter's name, "default", in the factors' names; PEFT loads those as well.
        match = re.fullmatch(r"(.+)\.(?:lora_(A|B)(?:\.default)?\.weight|lora_embedding_(A|B)(?:\.default)?)", key)
        if match:
            module, linear_part, embedding_part = match.groups()
            entry = adapter.factors.setdefault(module, {})
            part = linear_part or embedding_part
            if part in entry:
                raise AdapterError(f"{weights}: {module}'s lora_{part} is saved twice (with and without the "
                                   "adapter's name); the file is damaged: restore it")
            entry[part] = tensor
            entry["kind"] = "embedding" if embedding_part else "linear"
        elif "lora_" in key or "magnitude" in key:
            raise AdapterError(f"{weights}: tensor {name!r} is not one of LoRA's factors; {MERGE_WAY}")
        else:  # a module trained in full (modules_to_save), or an adapted module's own weights saved
            inner = re.fullmatch(r"(.+)\.(?:modules_to_save|original_module)(?:\.default)?\.(\w+)", key)
            if inner and f"{PREFIX}{inner.group(1)}.{inner.group(2)}" in tensors:
                # PEFT's wrapper of the module, saved with a resized embedding beside the module's own
                # copy, which is what PEFT loads (tests/test_adapters.py checks it)
                continue
            adapter.replaced[key.replace(".base_layer.", ".")] = tensor
    for module, f in adapter.factors.items():
        if "A" not in f or "B" not in f:
            has, lacks = ("A", "B") if "A" in f else ("B", "A")
            raise AdapterError(f"{weights}: {module} has lora_{has} without lora_{lacks}; the file is damaged: "
                               "restore it")
        a, b = f["A"], f["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(f"{weights}: {module}'s factors are {a.dim()}-D and {b.dim()}-D (a convolution's); "
                               f"only linear and embedding layers are merged here: {MERGE_WAY}")
        if a.shape[0] != b.shape[1] or a.shape[0] != adapter.rank(module):
            raise AdapterError(f"{weights}: {module}'s factors {tuple(b.shape)} @ {tuple(a.shape)} do not have "
                               f"the rank {adapter.rank(module)} its config gives; restore the adapter")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"{weights}: {module}'s factors are not floating point; restore the adapter")
    for name, tensor in tensors.items():  # a NaN would spread through the merged model (read once, small)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{weights}: tensor {name!r} holds NaN or Inf values; the adapter is damaged: "
                               "restore it")
    if not adapter.factors and not adapter.replaced:
        raise AdapterError(f"{weights}: holds no tensor; restore the adapter")
    return adapter


def merge_adapter(adapter: Adapter | str, pretrained: str, out_dir: str, announce=None) -> dict:
    """Writes into ``out_dir`` (new, or empty) the pre-trained checkpoint ``pretrained`` (a model
    directory, or one safetensors file) with the adapter (``read_adapter``'s, or its directory)
    merged: each adapted weight plus scaling * B @ A, each module the adapter trained in full
    replaced, in the checkpoint's dtypes and shards; the directory's config and tokenizer files
    beside, the adapter's tokenizer files over them. ``announce()`` is called once the adapter is
    known to fit the checkpoint, before the writing. Returns a summary for the report."""
    from .checkpoint import INDEX, Checkpoint, CheckpointError
    from .safetensors_io import ShardWriter

    adapter = read_adapter(adapter) if isinstance(adapter, str) else adapter
    adapter_dir = adapter.path
    try:
        base = Checkpoint(pretrained, role="--pretrained")
    except CheckpointError as error:
        raise AdapterError(f"{error} (the model the adapter {adapter_dir} was trained on)") from None
    shapes = {name: tuple(e.shape) for name, e in base.entries.items()}
    _choose_layouts(adapter, shapes, _conv1d_modules(pretrained) if os.path.isdir(pretrained) else None)
    _drop_tied_copy(adapter, pretrained, shapes)
    resized = _resized_vocabulary(adapter, shapes, pretrained)
    shapes.update(resized)
    _check_fits(adapter, shapes, f"--pretrained {pretrained}")
    _check_tie_kept(adapter, pretrained)
    if announce is not None:
        announce()
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isdir(pretrained):
        for entry in sorted(os.listdir(pretrained)):
            source = os.path.join(pretrained, entry)
            if entry == INDEX and base.index is None:  # beside a model.safetensors, which is what was read
                continue
            if entry.endswith(KEPT_SUFFIXES) and os.path.isfile(source):  # the index, configs, the tokenizer
                shutil.copyfile(source, os.path.join(out_dir, entry))
        _copy_tokenizer(adapter, out_dir)
        if resized and os.path.isfile(os.path.join(out_dir, "config.json")):  # the merged model's vocabulary
            with open(os.path.join(out_dir, "config.json")) as f:
                merged_config = json.load(f)
            merged_config["vocab_size"] = next(iter(resized.values()))[0]
            with open(os.path.join(out_dir, "config.json"), "w") as f:
                json.dump(merged_config, f, indent=2)
    changed = set(adapter.targets)
    for file in base.files:
        layout = [(n, base.entries[n].dtype, shapes[n]) for n in base.file_order[file]]
        name_out = os.path.basename(file) if os.path.isdir(pretrained) else "model.safetensors"
        writer = ShardWriter(os.path.join(out_dir, name_out), layout, base.metadata[file])
        try:
            for name, _, _ in layout:
                tensor = base.read(name)
                writer.write(name, adapter.merged(name, tensor) if name in changed else tensor)
        except BaseException:
            writer.f.close()
            raise
        writer.close(sync=False)  # a scratch copy: the purified output is synced when written
    return _summary(adapter, resized)


def _conv1d_modules(pretrained: str) -> set[str] | None:
    """The modules of the causal LM in directory ``pretrained`` that are transformers' Conv1D (weights
    stored [in, out]), from the model built on the meta device from its config (no weights read);
    None where there is no config to build it from."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from .pipeline import directory_skeleton

    model = directory_skeleton(pretrained, AutoModelForCausalLM)  # else the layouts come from the shapes
    if model is None:
        return None
    # Names with and without the LM's prefix (a checkpoint saved from the bare model has none).
    prefix = model.base_model_prefix + "."
    names = {name for name, module in model.named_modules() if isinstance(module, Conv1D)}
    return names | {name.removeprefix(prefix) for name in names}


def _choose_layouts(adapter: Adapter, shapes: dict, conv1d: set[str] | None) -> None:
    """Sets ``adapter.transposed`` for each linear module: Conv1D or not where the model's module
    types are known; else the orientation of the product that fits the weight's shape, and the
    config's fan_in_fan_out for a square weight."""
    for module, f in adapter.factors.items():
        if f["kind"] != "linear":
            continue
        if conv1d is not None:
            adapter.transposed[module] = module in conv1d
            continue
        product = (f["B"].shape[0], f["A"].shape[1])
        shape = tuple(shapes.get(module + ".weight", ()))
        if product != product[::-1] and shape in (product, product[::-1]):
            adapter.transposed[module] = shape != product


def _resized_vocabulary(adapter: Adapter, shapes: dict, pretrained: str) -> dict[str, tuple]:
    """The tensors the adapter holds with other rows than ``shapes`` gives them, every other dimension
    alike (saved whole, or a LoRA-adapted embedding's own weight and factors): a vocabulary resized
    after tokens were added, or a padded one cut to its tokenizer's length. By name, the shape they
    are merged in; the merged model is the resized one (``purify.resized_rows``). Where the
    checkpoint's config tells its model, they must be its vocabulary's tensors, every one of them
    (else the merged model would not load)."""
    resized = {name: tuple(t.shape) for name, t in adapter.replaced.items()
               if name in shapes and t.dim() >= 1 and len(shapes[name]) == t.dim()
               and tuple(t.shape[1:]) == tuple(shapes[name][1:]) and t.shape[0] != shapes[name][0]}
    rows = {(shape[0], shapes[name][0]) for name, shape in resized.items()}
    if len(rows) != 1:
        return {}  # none; or not one vocabulary: _check_fits names a tensor whose shape is not the checkpoint's
    config_file = os.path.join(pretrained, "config.json") if os.path.isdir(pretrained) else None
    if config_file is None or not os.path.isfile(config_file):
        return resized
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        return {}  # a broken config.json is named where the merged model is read
    (new, old), = rows
    first = sorted(resized)[0]
    if not isinstance(config, dict) or config.get("vocab_size") != old:
        raise AdapterError(f"{adapter.path}: the adapter's {first} has {new} rows, --pretrained {pretrained} {old}, and "
                           "its config.json gives no vocab_size of that size (another tensor, or a model that keeps "
                           f"it elsewhere): {MERGE_WAY}")
    from .checkpoint import model_layout

    layout = model_layout(pretrained)
    vocabulary = [] if layout is None else [n for name in (layout.input_embedding, layout.output_embedding) if name
                                            for n in layout.names_of(name) if n in shapes]
    left = [n for n in vocabulary if n not in resized]
    if left:
        raise AdapterError(f"{adapter.path}: the adapter holds {first} with {new} rows (the vocabulary resized) but "
                           f"not {left[0]}, which --pretrained {pretrained} holds with {old}: the merged model would "
                           f"not load; {MERGE_WAY}")
    return resized


def _drop_tied_copy(adapter: Adapter, pretrained: str, shapes: dict) -> None:
    """An adapter trained with ensure_weight_tying saves a tied output layer whole beside the input
    embedding, the same values; the checkpoint stores the tie once, under the embedding's name, and
    the merge keeps it tied, as PEFT's does."""
    if not os.path.isdir(pretrained) or not adapter.config.get("ensure_weight_tying"):
        return
    from .checkpoint import model_layout

    layout = model_layout(pretrained)
    if layout is None or not layout.tied or layout.tied_output is None or layout.input_embedding is None:
        return
    embedding = next((n for n in layout.names_of(layout.input_embedding) if n in adapter.replaced), None)
    for name in layout.names_of(layout.tied_output):
        if (embedding is not None and name in adapter.replaced and name not in shapes
                and torch.equal(adapter.replaced[name], adapter.replaced[embedding])):
            del adapter.replaced[name]


def _check_tie_kept(adapter: Adapter, pretrained: str) -> None:
    """An input embedding saved whole, of a model whose output layer is that embedding: PEFT's merge
    unties them (the output layer keeps the pre-trained values) unless the adapter was trained with
    ensure_weight_tying; the merge here keeps the checkpoint's layout, so it refuses the untying one."""
    if not os.path.isdir(pretrained) or adapter.config.get("ensure_weight_tying"):
        return
    from .checkpoint import model_layout

    layout = model_layout(pretrained)
    if layout is None or not layout.tied or layout.input_embedding is None:
        return
    # saved whole (modules_to_save); a LoRA-adapted embedding's own weight is merged into the tie, as PEFT does
    saved = [n for n in layout.names_of(layout.input_embedding) if n in adapter.replaced
             and n.removesuffix(".weight") not in adapter.factors]
    if saved:
        raise AdapterError(f"{adapter.path}: the adapter saves {saved[0]} whole, which --pretrained {pretrained} ties "
                           "to its output layer; PEFT's merge unties them (the output layer keeps the pre-trained "
                           f"values: the adapter was not trained with ensure_weight_tying): {MERGE_WAY}")


def _check_fits(adapter: Adapter, shapes: dict, where: str) -> None:
    """Every tensor the adapter changes is one of ``shapes`` (by name), with the shape its saved copy
    and its product have: an adapter of another model is refused before anything is written."""
    missing = [name for name in adapter.targets if name not in shapes]
    if missing:
        tied = " (tied to the input embedding there: merge such an adapter with PEFT)" if any(
            "lm_head" in n for n in missing) else ""
        raise AdapterError(f"{adapter.path}: the adapter changes {missing[0]}, which {where} does not hold{tied}"
                           + (f", and {len(missing) - 1} more" if len(missing) > 1 else "")
                           + "; give the model the adapter was trained on")
    for name in adapter.targets:
        module = name.removesuffix(".weight")
        given = ([tuple(adapter.replaced[name].shape)] if name in adapter.replaced else []) + (
            [adapter.delta_shape(module)] if module in adapter.factors else [])
        wrong = [shape for shape in given if shape != tuple(shapes[name])]
        if wrong:
            raise AdapterError(f"{adapter.path}: the adapter's {name} is {wrong[0]}, {where} holds "
                               f"{tuple(shapes[name])}; give the model the adapter was trained on")


def _copy_tokenizer(adapter: Adapter, out_dir: str) -> None:
    """The tokenizer files the adapter ships (the fine-tuned model's), over the pre-trained model's."""
    for entry in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(adapter.path, entry)):
            shutil.copyfile(os.path.join(adapter.path, entry), os.path.join(out_dir, entry))


def _summary(adapter: Adapter, resized: dict | None = None) -> dict:
    """What a merge did, for the report."""
    return {"adapter": os.path.abspath(adapter.path), "lora_modules": len(adapter.factors),
            "replaced_tensors": sorted(adapter.replaced), "resized_to_vocabulary": sorted(resized or ()),
            "ranks": sorted({f["A"].shape[0] for f in adapter.factors.values()}),
            "base_model_name_or_path": adapter.config.get("base_model_name_or_path")}


def merge_classifier_adapter(adapter: Adapter, pretrained: str, out_dir: str, announce=None) -> dict:
    """``merge_adapter`` for a sequence classifier trained through LoRA (PEFT's SEQ_CLS): its names
    are the classifier's and its head is new, so the merge is made on the classifier built from the
    pre-trained model directory (``pipeline.load_classifier``, as stored) with the adapter's number
    of labels, and saved as a classifier directory. In memory: classifiers are BERT-sized."""
    from transformers.pytorch_utils import Conv1D

    from .pipeline import load_classifier

    model, tokenizer, new = load_classifier(pretrained, num_labels=adapter.num_labels, dtype=None)
    state = model.state_dict()
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    where = f"the classifier built from --pretrained {pretrained}"
    _choose_layouts(adapter, shapes, {name for name, m in model.named_modules() if isinstance(m, Conv1D)})
    resized = _resized_vocabulary(adapter, shapes, "")  # the classifier's own names: no config to read
    embedding = next((n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight), None)
    if embedding in resized:
        model.resize_token_embeddings(resized[embedding][0])  # the rows: the adapter's copy, merged below
        state = model.state_dict()
        shapes = {name: tuple(t.shape) for name, t in state.items()}
    _check_fits(adapter, shapes, where)
    unset = sorted(n for n in new if n not in adapter.replaced)
    if unset:
        raise AdapterError(f"{adapter.path}: the adapter does not hold {unset[0]}, which --pretrained {pretrained} "
                           "lacks too; give the fine-tuned classifier's directory instead")
    if announce is not None:
        announce()
    with torch.no_grad():
        for name in adapter.targets:
            state[name].copy_(adapter.merged(name, state[name]))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _copy_tokenizer(adapter, out_dir)
    return _summary(adapter, resized)
