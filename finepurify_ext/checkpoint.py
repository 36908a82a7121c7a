"""Out-of-core purification of safetensors checkpoints, tensor by tensor.

The pre-trained and suspect checkpoints (a directory with ``model.safetensors.index.json``, a
directory of ``*.safetensors`` shards, or one file) and the Hessian (safetensors) are matched by
tensor name, never by shard. Passes: the threshold search reads every scored tensor once per
histogram level (summing the histograms, ``threshold.threshold_from_histograms``), then the reset
pass writes the suspect's shards anew, tensor by tensor. Peak memory is a few pieces, not the model:
tensors are read in pieces with plain file reads into reused buffers, the next piece of a pass on
threads while one is scored (no memory map, whose touched pages would count against the process),
and shards are written streaming, header first.

The output directory is written under a temporary name and renamed at the end; a crash leaves no
directory that looks complete. The inputs are opened read-only. Headers are JSON; nothing is unpickled.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from . import ops
from .errors import UserError
from .outputs import check_output_dir, save_atomically
from .hessian import HESSIAN_FORMAT, decode_ids
from .purify import (NOTHING_MOVED, CANDIDATES_MIN_WEIGHTS, CANDIDATES_ON, FLOOR_SAMPLES, SAMPLE_RUN, PurifyConfig,
                     candidate_range, row_sum, sample_keys, sample_quantile, set_rows_, sum_float64, unrankable,
                     unseen_added_rows, unseen_added_warning, unseen_mask, vocabulary_resizes)
from .safetensors_io import DTYPES, ShardWriter, numel_of as _numel  # noqa: F401 (ShardWriter: part of this API)
from .threshold import (BETWEEN_BINS, CANDIDATE_COUNTS, LEVEL_BINS, piece_room, search_ranges,
                        threshold_from_histograms)

# Names of the word-embedding matrix in common architectures (embeddings="separate").
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight", "embed_in.weight",
                      "tok_embeddings.weight")

# The keys a threshold pass out of core may keep (64 MB; purify_ keeps 16 MB, CANDIDATE_KEYS): a pass
# here reads every checkpoint again, seconds at a billion weights, and with this room and the sample
# below one pass holds the threshold of checkpoints up to about 5B to 8B weights at the default
# reserve, as more of them moved (the sample's bracket holds 0.2 to 0.35 % of them).
OUT_OF_CORE_KEYS = 16 << 20
# The pre-pass reads every weight anyway, so the sample that brackets the threshold is larger here
# than purify_'s (a bracket's share of the weights shrinks as the square root of the sample): one
# weight of every OUT_OF_CORE_SAMPLE_EVERY, at least purify_'s million and at most 8M (96 MB of
# float32 values). With the default reserve the room above then holds the bracket of about 5B to 8B
# weights in one pass, against 1.6B to 2.9B with purify_'s million (threshold.keys_room).
OUT_OF_CORE_SAMPLES = 8 << 20
OUT_OF_CORE_SAMPLE_EVERY = 256

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SCORED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEADER = 100 << 20

# What only a quantized checkpoint holds: tensors in 8-, 6- or 4-bit float formats, and the packed
# integers, scales and states of GPTQ/AWQ, bitsandbytes, FP8 and compressed-tensors checkpoints.
# Such a checkpoint would be copied through with its quantized layers unscored: refused instead.
QUANTIZED_CODES = ("F8_", "F6_", "F4", "E8M0")
QUANTIZATION_TENSORS = (".qweight", ".qzeros", ".g_idx", ".weight_packed", ".weight_scale", ".weight_scale_inv",
                        ".absmax", ".quant_map", ".SCB", ".weight_format")
DEQUANTIZE = ("Fine-purifying compares float weights with their pre-trained values: give the model from before "
              "quantization, or dequantize this one and save it")


def check_not_quantized(config: dict, file: str) -> None:
    """Refuses a model whose config (``file``, parsed) says it is quantized."""
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown method") if isinstance(quantization, dict) else "?"
        raise CheckpointError(f"{file}: the model is quantized ({method}); {DEQUANTIZE}")


def _check_config_not_quantized(path: str) -> None:
    """A checkpoint directory's config.json, where it has one, does not describe a quantized model."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # not the weights: the loaders that read it say what is wrong with it
    if isinstance(config, dict):
        check_not_quantized(config, file)


class CheckpointError(UserError):
    """A checkpoint that cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class TensorEntry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: str) -> tuple[dict, int, dict]:
    """(tensor entries by name, data start offset, metadata) of one safetensors file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} is impossible)")
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicate_keys)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read the safetensors header ({error})") from None
    except _DuplicateKey as key:  # the last would win here, and another reader may take the first
        raise CheckpointError(f"{path}: the safetensors header names {key} twice; the file is damaged") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path}: the safetensors header's __metadata__ is not a map of strings; the file "
                              "is damaged")
    start = 8 + n
    entries = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            code = info.get("dtype") if isinstance(info, dict) else None
            if isinstance(code, str) and code.startswith(QUANTIZED_CODES):
                raise CheckpointError(f"{path}: tensor {name!r} is stored as {code}, a quantized format; "
                                      f"{DEQUANTIZE}") from None
            raise CheckpointError(f"{path}: tensor {name!r} has an unreadable header entry {info!r}") from None
        nbytes = _numel(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or start + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file or has the wrong size; "
                                  "the file is truncated or corrupt")
        entries[name] = TensorEntry(path, dtype, shape, start + begin, nbytes)
    end = start
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].nbytes)):
        if e.begin < end:  # two tensors on the same bytes: writing one would change the other's input
            raise CheckpointError(f"{path}: tensor {name!r} overlaps another in the file; the file is damaged")
        end = e.begin + e.nbytes
    return entries, start, meta


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKey(repr(next(k for k in keys if keys.count(k) > 1)))
    return dict(pairs)


def _value_range(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a floating tensor by one reduction (NaN propagates into both): no boolean
    temporaries, which made ``isfinite(t).all()`` take 27 ms for a 32 MB piece here against 1 ms."""
    if t.numel() == 0:
        return 0.0, 0.0
    low, high = torch.stack(torch.aminmax(t)).tolist()  # one read from the device
    return low, high


def _check_finite(piece: torch.Tensor, file: str, name: str) -> None:
    """A floating piece of the suspect being written holds no NaN or Inf (the output would carry it)."""
    if piece.is_floating_point() and not all(map(math.isfinite, _value_range(piece))):
        raise CheckpointError(f"{file}: tensor {name!r} holds NaN or Inf values; the checkpoint is damaged: "
                              "use an undamaged copy")


def _check_hessian(h: torch.Tensor, what: str) -> None:
    low, high = _value_range(h)
    if low >= 0 and math.isfinite(high):  # NaN fails both; the slow scan below only names the fault
        return
    error = unrankable([(what, h)])
    if error is not None:
        raise CheckpointError(str(error))


class Checkpoint:
    """The tensors of a safetensors checkpoint by name, read one at a time on demand."""

    def __init__(self, path: str, role: str = "checkpoint", pin_scratch: bool = False):
        self.path = path
        self.index = None  # the index the files were found by
        if os.path.isfile(path):
            files = [path]
        elif os.path.isdir(path):
            index = os.path.join(path, INDEX)
            if os.path.isfile(os.path.join(path, SINGLE)):  # what transformers reads where both are there
                files = [os.path.join(path, SINGLE)]
            elif os.path.isfile(index):
                self.index = index
                try:
                    with open(index, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                except (OSError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as error:
                    raise CheckpointError(f"{index}: not a safetensors index ({error}); restore it") from None
                if not isinstance(weight_map, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) and v.endswith(".safetensors")
                        and os.path.basename(v) == v for k, v in weight_map.items()):
                    raise CheckpointError(f"{index}: its weight_map must map tensor names to .safetensors files "
                                          "in the same directory; restore it")
                files = sorted({os.path.join(path, f) for f in weight_map.values()})
                missing = [f for f in files if not os.path.isfile(f)]
                if missing:
                    raise CheckpointError(f"{index} names shards that are missing: {missing[:3]}")
            else:
                files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files and role == "hessian":
                raise CheckpointError(f"--hessian-file {path!r} is a directory without a .safetensors file; give the "
                                      "file `finepurify hessian --out` wrote")
            if not files:
                raise CheckpointError(f"{role} {path!r} holds no .safetensors file; only safetensors checkpoints "
                                      "are read (convert a pickle checkpoint yourself, from a source you trust)")
        else:
            raise CheckpointError(f"{role} {path!r} does not exist")
        self.files = files
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self.pin_scratch = pin_scratch  # for pieces bound for a GPU: copied there without a staging copy
        self.entries: dict[str, TensorEntry] = {}
        self.file_order: dict[str, list[str]] = {}
        self.metadata: dict[str, dict] = {}
        headers = {file: _read_header(file) for file in files}
        hessians = [file for file, (_, _, meta) in headers.items() if meta.get("format") == HESSIAN_FORMAT]
        if hessians and len(hessians) < len(files):  # a Hessian saved into a directory of shards
            raise CheckpointError(f"{hessians[0]}: a Hessian (finepurify hessian's output) among the {role}'s "
                                  "files, which would be read as its weights; move it out of the model's directory")
        for file, (entries, _, meta) in headers.items():
            for name in entries:
                if name in self.entries:
                    raise CheckpointError(f"tensor {name!r} is in both {self.entries[name].file} and {file}")
            self.entries.update(entries)
            self.file_order[file] = sorted(entries, key=lambda n: entries[n].begin)
            self.metadata[file] = meta
        quantized = next((n for n in self.entries if n.endswith(QUANTIZATION_TENSORS) or ".quant_state." in n), None)
        if quantized is not None:
            raise CheckpointError(f"{self.entries[quantized].file}: tensor {quantized!r} belongs to a quantized "
                                  f"checkpoint; {DEQUANTIZE}")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str, start: int = 0, count: int | None = None, reuse: bool = False,
             into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, or with ``count`` the flat elements [start, start + count), into a fresh buffer;
        with ``reuse``, into this checkpoint's one scratch buffer: valid until its next ``reuse`` read;
        with ``into`` (a large enough uint8 buffer), there (safe from several threads at once).
        A fresh buffer costs a page fault per 4 KB (reads ran at 1.6 GB/s into fresh buffers against
        10 GB/s into a reused one here), so the passes over pieces reuse."""
        e = self.entries[name]
        item = e.dtype.itemsize
        nbytes = e.nbytes if count is None else count * item
        if into is not None:
            buffer = into[:nbytes]
        elif reuse:
            if self._scratch.numel() < nbytes:
                self._scratch = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_scratch)
            buffer = self._scratch[:nbytes]
        else:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        with open(e.file, "rb") as f:
            f.seek(e.begin + start * item)
            if nbytes and f.readinto(memoryview(buffer.numpy())) != nbytes:
                raise CheckpointError(f"{e.file}: tensor {name!r} is truncated")
        flat = buffer.view(e.dtype)
        return flat.reshape(e.shape) if count is None else flat

    def numel(self, name: str) -> int:
        e = self.entries[name]
        return e.nbytes // e.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


# ------------------------------------------------------------------------------- fingerprints

# Windows of each tensor's bytes a fingerprint reads: a fine-tune moves nearly every tensor, and 8
# windows of 64 bytes (32 bfloat16 weights each) spread over a tensor almost surely see a moved one.
FINGERPRINT_WINDOWS, FINGERPRINT_BYTES = 8, 64


def fingerprint(checkpoint: "str | Checkpoint", names=None, prefix: str = "") -> str:
    """A digest that tells one model's weights from another's, read in a few hundred bytes per
    tensor: each tensor's name, dtype, shape and ``FINGERPRINT_WINDOWS`` windows of its bytes, in
    name order (the same however the checkpoint is sharded). With ``names`` (a model's parameters,
    or a Hessian's tensors), those tensors alone, each found with or without the base model's
    ``prefix`` and digested under the name given: a checkpoint stored without the prefix, or with
    buffers and tied copies another lacks, gives the same digest for the same weights. It tells
    which model a Hessian was estimated on, as a fine-tune moves most of every tensor it trains; a
    few weights changed by hand may go unseen, and it is no proof that a file was not forged."""
    import hashlib

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    digest = hashlib.blake2b(digest_size=16)
    fds = {file: os.open(file, os.O_RDONLY) for file in ckpt.files}
    try:
        for name in sorted(ckpt.entries if names is None else names):
            stored = next((n for n in names_with_prefix(name, prefix) if n in ckpt), None)
            if stored is None:
                digest.update(f"{name}\0absent\0".encode())
                continue
            e = ckpt.entries[stored]
            digest.update(f"{name}\0{str(e.dtype)}\0{list(e.shape)}\0".encode())
            if e.nbytes <= FINGERPRINT_WINDOWS * FINGERPRINT_BYTES:
                digest.update(os.pread(fds[e.file], e.nbytes, e.begin))
                continue
            step = (e.nbytes - FINGERPRINT_BYTES) // (FINGERPRINT_WINDOWS - 1)
            for k in range(FINGERPRINT_WINDOWS):
                digest.update(os.pread(fds[e.file], FINGERPRINT_BYTES, e.begin + k * step))
    finally:
        for fd in fds.values():
            os.close(fd)
    return digest.hexdigest()


def file_digest(path: str) -> str:
    """The SHA-256 of a file (a clean data set's: what a Hessian was estimated from)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------- purification


# The files of a model directory a purified copy takes beside its weights: config and tokenizer.
# Anything else the suspect holds (weights in another format, which were not purified; Python code
# for trust_remote_code) is left out and listed in the report.
SIDE_FILES = frozenset({"generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                        "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json"})
CODE_KEYS = ("auto_map", "trust_remote_code", "custom_pipelines")  # a config's pointers to code beside it
CONFIG_FILES = ("config.json", "tokenizer_config.json")  # where they may be


def config_without_code(config: dict) -> tuple[dict, list[str]]:
    """``config`` without the keys that make transformers run code shipped with a model (under
    trust_remote_code): a purified copy is loaded as the built-in architecture it was read as."""
    return {k: v for k, v in config.items() if k not in CODE_KEYS}, [k for k in CODE_KEYS if k in config]


def copy_config_without_code(src: str, dst: str) -> list[str]:
    """Copies config.json without its code keys (as it is where it has none); returns those removed."""
    with open(src, "rb") as f:
        raw = f.read()
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        config = None
    if not isinstance(config, dict) or not any(k in config for k in CODE_KEYS):
        with open(dst, "wb") as f:
            f.write(raw)
        return []
    kept, removed = config_without_code(config)
    with open(dst, "w") as f:
        json.dump(kept, f, indent=2)
    return removed


@dataclass
class CheckpointReport:
    reserve_ratio: float | None
    num_reset: int
    threshold: float | None
    ranked_elements: int
    moved_elements: int
    reset_per_tensor: dict[str, int] = field(default_factory=dict)
    copied_unscored: list[str] = field(default_factory=list)
    copied_unscored_weights: int = 0  # their floating elements (a new head's, say): left as the suspect has them
    hessian_floor: float | None = None
    embedding_tensor: str | None = None
    embedding_rows_reset: int = 0
    embedding_rule: str | None = None  # "hessian" or "seen_tokens", as in purify.PurifyReport
    bytes_read: int = 0
    bytes_written: int = 0
    threshold_passes: int = 0  # the reads of every ranked weight the threshold search took (not the pre-pass)
    timings_s: dict[str, float] = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)  # the paths read (as the caller names them) and what was merged
    # the model the Hessian was estimated on (checked to be the suspect) and its clean data's digest;
    # None where the Hessian records none
    hessian_of: dict | None = None
    # the suspect's files left out of the output: weights in other formats (not purified), code, others
    not_copied: list[str] = field(default_factory=list)
    config_keys_removed: list[str] = field(default_factory=list)  # "config.json: auto_map": pointers to code
    # tensors a resized vocabulary grew (purify.added_rows); the added rows are copied
    added_rows: dict[str, dict[str, int]] = field(default_factory=dict)
    # tensors a resized vocabulary cut (purify.removed_rows): ranked against the pre-trained first rows
    removed_rows: dict[str, dict[str, int]] = field(default_factory=dict)
    # the input embedding's added rows the clean data never reaches (purify.unseen_added_rows)
    unseen_added_rows: list[int] = field(default_factory=list)
    added_rows_reset: int = 0  # how many of them were reset to the pre-trained rows' mean (purify.PurifyReport's)
    # a tied output layer stored beside its embedding, the same values: written as the purified embedding
    tied_copies: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the PurifyConfig it ran with (ranking, eps, seed...), as in memory
    warnings: list[str] = field(default_factory=list)  # what the command says on stderr besides

    def to_dict(self) -> dict:
        return asdict(self)


def _hessian_of(hessian: str, h_ckpt: Checkpoint, suspect: str, sus_ckpt: Checkpoint, prefix: str) -> dict | None:
    """The model the Hessian records it was estimated on, checked to be the suspect (its weights
    under the Hessian's names); None where it records none (saved by the Python API without one,
    or before Hessians recorded it)."""
    meta = next((m for m in h_ckpt.metadata.values() if "model_fingerprint" in m), None)
    if meta is None:
        return None
    expected = fingerprint(sus_ckpt, h_ckpt.entries, prefix)
    if meta["model_fingerprint"] != expected:
        raise CheckpointError(f"{hessian} was estimated on {meta.get('model', 'a model it does not name')}, and the "
                              f"weights of the suspect {suspect} are not those (another model, or changed since): "
                              "estimate the suspect's Hessian with `finepurify hessian`")
    return {"model": meta.get("model"), "model_fingerprint": expected,
            "clean_data_sha256": meta.get("clean_data_sha256")}


def search_device(device) -> torch.device | None:
    """Where the threshold search from a sample scores the pieces of its passes, for a run on
    ``device``: there where its candidates kernel has run against the CPU's (``CANDIDATES_ON``),
    else on the CPU, whose scores are the device's to the bit (tests/test_cuda.py compares every
    score op's), so the threshold resets the same weights there; None where the CPU's has not
    either (the histogram passes run on ``device``)."""
    device = torch.device(device)
    if device.type in CANDIDATES_ON:
        return device
    return torch.device("cpu") if "cpu" in CANDIDATES_ON else None


def embedding_tensor_of(names, layout: "ModelLayout | None" = None) -> str | None:
    """The word-embedding matrix among a checkpoint's tensor names: the model's input embedding where
    its config tells it (BART's and T5's ``shared``, as in memory), else by the usual suffixes; or None."""
    if layout is not None and layout.input_embedding is not None:
        found = [n for n in names if n in layout.names_of(layout.input_embedding)]
        if found:
            return found[0]
    found = [n for n in names if n.endswith(EMBEDDING_SUFFIXES)]
    return min(found, key=len) if found else None


def names_with_prefix(name: str, prefix: str) -> tuple[str, str, str]:
    """The names a tensor may have in a checkpoint: its own, without the base model's prefix (a base
    checkpoint's), with it (a task model's)."""
    return name, name.removeprefix(prefix), prefix + name


@dataclass(frozen=True)
class ModelLayout:
    """What a checkpoint directory's config.json tells of its model (built on the meta device)."""
    prefix: str  # the base model's, which a base checkpoint's names lack
    input_embedding: str | None
    parameters: frozenset[str]
    output_embedding: str | None = None  # the output layer's weight where it is not the input embedding
    tied: bool = False  # the output layer is the input embedding
    tied_output: str | None = None  # the output layer's weight by its own name, where it is tied (stored once)

    def names_of(self, name: str) -> tuple[str, ...]:
        return names_with_prefix(name, self.prefix)

    def is_parameter(self, name: str) -> bool:
        return any(n in self.parameters for n in self.names_of(name))

    def not_loaded(self, checkpoint: "Checkpoint") -> set[str]:
        """The checkpoint's tensors the model does not load (old GPT-2 files' attention-mask buffers,
        say): where every parameter of the model is in the checkpoint by its own name, the others
        cannot be ones transformers renames into a parameter. Empty otherwise."""
        if not all(any(n in checkpoint for n in self.names_of(p)) for p in self.parameters):
            return set()
        return {n for n in checkpoint.entries if not self.is_parameter(n)}


def model_layout(directory: str) -> ModelLayout | None:
    """The ``ModelLayout`` of the model in ``directory`` (a causal LM or a classifier), or None where
    it has no config transformers can build a model from (the names alone are used then)."""
    from .pipeline import directory_skeleton
    from .purify import word_embedding_name

    skeleton = directory_skeleton(directory)
    if skeleton is None:
        return None
    out, inp = skeleton.get_output_embeddings(), skeleton.get_input_embeddings()
    tied = out is not None and inp is not None and out.weight is inp.weight
    output = None if out is None or tied else next((n for n, p in skeleton.named_parameters() if p is out.weight), None)
    tied_output = next((n + ".weight" for n, m in skeleton.named_modules() if m is out), None) if tied else None
    return ModelLayout(skeleton.base_model_prefix + ".", word_embedding_name(skeleton),
                       frozenset(n for n, _ in skeleton.named_parameters()), output, tied, tied_output)


def not_copied_from(given: str, written: str) -> list[str]:
    """The files of the suspect's directory as given (``given``; a LoRA adapter's, not those of the
    model it was merged into) that the purified copy in ``written`` lacks: weights in other formats,
    code, anything unknown. The weights the copy replaces, and an adapter's own files, are not listed."""
    from .adapters import CONFIG as ADAPTER_CONFIG, WEIGHTS as ADAPTER_WEIGHTS

    if not os.path.isdir(given):  # a GGUF file: nothing beside it was read
        return []
    replaced = {INDEX, ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    return sorted(f for f in os.listdir(given) if os.path.isfile(os.path.join(given, f))
                  and not f.endswith(".safetensors") and f not in replaced and not os.path.exists(os.path.join(written, f)))


def stored_tied_output(layout: ModelLayout | None, checkpoint: "Checkpoint", chunk: int) -> tuple:
    """A model whose output layer is its input embedding, with the output layer stored under its own
    name too (some exporters write both): transformers ties them where the values are equal and
    loads the stored output layer untied where they differ. (the layout as transformers loads the
    checkpoint, {the stored copy's name: the embedding's} where it is tied, else {})."""
    if layout is None or not layout.tied or layout.tied_output is None or layout.input_embedding is None:
        return layout, {}
    output = next((n for n in layout.names_of(layout.tied_output) if n in checkpoint), None)
    embedding = next((n for n in layout.names_of(layout.input_embedding) if n in checkpoint), None)
    if output is None or embedding is None:
        return layout, {}
    equal = checkpoint.entries[output].shape == checkpoint.entries[embedding].shape
    for start in range(0, checkpoint.numel(output) if equal else 0, chunk):  # the values as loaded (float32)
        count = min(chunk, checkpoint.numel(output) - start)
        if not torch.equal(checkpoint.read(output, start, count).float(),
                           checkpoint.read(embedding, start, count, reuse=True).float()):
            equal = False
            break
    parameters = layout.parameters | {layout.tied_output}
    if equal:  # a copy of the tied embedding: written as the purified embedding, so that it stays tied
        return (ModelLayout(layout.prefix, layout.input_embedding, parameters, None, True, layout.tied_output),
                {output: embedding})
    return ModelLayout(layout.prefix, layout.input_embedding, parameters, layout.tied_output, False, None), {}


def purify_checkpoint(
    pretrained: str,
    suspect: str,
    hessian: str,
    out_dir: str,
    config: PurifyConfig = PurifyConfig(),
    num_reset: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    chunk_bytes: int = 32 << 20,
    device: torch.device | str = "cpu",
    inputs: dict | None = None,
    given_suspect: str | None = None,
) -> CheckpointReport:
    """Purifies the suspect checkpoint against the pre-trained one with the Hessian, tensor by tensor,
    and writes the result (same shards and index as the suspect, plus a report) to ``out_dir``.

    Scored: every floating tensor of the suspect that the pre-trained checkpoint holds with the same
    shape (the others, e.g. a new head, are copied unchanged); each needs a Hessian of its shape.
    ``config`` as in ``purify.purify_``, with the same scoring spec (``purify.scoring_for``): every
    ranking (Fine-mixing's random mask draws the values ``purify_`` draws), the reserve ratio (or
    ``num_reset``), eps, the Hessian floor, counting the ratio over moved weights, and the separate
    embedding budget (the word-embedding matrix, found by name, kept out of the ranking; its rows
    with a Hessian of exactly zero that moved are reset). Tensors are streamed in pieces of
    ``chunk_bytes`` (float32): peak memory is about nine pieces (two sets of three read-ahead
    buffers, and three for the tensors copied as they are), whatever the largest tensor. On a CUDA
    ``device`` the pieces are reset there (the files are still read and written by the CPU), and
    scored there for the threshold where ``search_device`` says so, else on the CPU. The report
    records ``inputs`` (by default the three paths read), and what the suspect's directory holds
    that the copy lacks (``not_copied``; from ``given_suspect``, where ``suspect`` is its merge or
    conversion: ``not_copied_from``).

    A Hessian that records the model it was estimated on (``finepurify hessian`` does) must be the
    suspect's: the suspect's ``fingerprint`` must be the one it records."""
    times = {}
    start_all = time.perf_counter()
    pin = torch.device(device).type == "cuda"
    for path in (pretrained, suspect):
        if os.path.isdir(path):
            _check_config_not_quantized(path)
    pre_ckpt, sus_ckpt, h_ckpt = (Checkpoint(path, role, pin_scratch=pin) for path, role in (
        (pretrained, "pre-trained checkpoint"), (suspect, "suspect checkpoint"), (hessian, "hessian")))
    formats = {meta.get("format") for meta in h_ckpt.metadata.values()} - {None}
    if formats - {HESSIAN_FORMAT}:
        raise CheckpointError(f"{hessian} is not a Hessian saved by `finepurify hessian` (its format is "
                              f"{sorted(formats)[0]!r}); estimate one with `finepurify hessian`")
    check_output_dir(out_dir, overwrite, option="output directory")  # fail before the long passes
    scored, unscored, pre_name, not_weights = [], [], {}, set()
    layout = model_layout(suspect) if os.path.isdir(suspect) else None
    layout, tied_copies = stored_tied_output(layout, sus_ckpt, max(1, chunk_bytes // 4))
    if layout is not None and os.path.isdir(pretrained):
        from .pipeline import check_same_architecture_of

        check_same_architecture_of(suspect, pretrained)  # only the task head may lack a pre-trained value
    not_loaded = layout.not_loaded(sus_ckpt) if layout is not None else set()
    hessian_of = _hessian_of(hessian, h_ckpt, suspect, sus_ckpt, layout.prefix if layout is not None else "")
    # A suspect with its own output layer, from a model whose output layer is its input embedding:
    # that embedding is the output layer's pre-trained value (as in memory).
    pre_layout = model_layout(pretrained) if layout is not None and layout.output_embedding else None
    tied_to = (next((n for n in pre_layout.names_of(pre_layout.input_embedding) if n in pre_ckpt), None)
               if pre_layout is not None and pre_layout.tied and pre_layout.input_embedding else None)

    def base_name(name):  # a task model's names may carry its base model's prefix ("bert.", "model.") that a
        return name if name in pre_ckpt else name.split(".", 1)[-1]  # base checkpoint lacks; the exact name wins

    # A resized vocabulary (resize_token_embeddings: tokens added, or a padded vocabulary cut) changes
    # the rows of the vocabulary's tensors: the rows both have are ranked, the added tokens' copied
    # (as purify.resized_rows in memory).
    vocabulary = embedding_tensor_of(list(sus_ckpt.entries), layout)
    vocab = ((sus_ckpt.entries[vocabulary].shape[0], pre_ckpt.entries[base_name(vocabulary)].shape[0])
             if vocabulary is not None and base_name(vocabulary) in pre_ckpt else None)

    def resized(e, p):
        return (vocab is not None and len(e.shape) == len(p.shape) >= 1
                and (e.shape[0], p.shape[0]) == vocab and e.shape[1:] == p.shape[1:])

    pretrained_rows = {}  # of the tensors a resized vocabulary changed, by name
    for name, e in sus_ckpt.entries.items():
        if name in tied_copies:
            continue  # written as its embedding is (below)
        base = base_name(name)
        if base not in pre_ckpt and tied_to is not None and name in layout.names_of(layout.output_embedding):
            base = tied_to
        p = pre_ckpt.entries.get(base)
        pre_name[name] = base
        if name not in h_ckpt and name in not_loaded:
            unscored.append(name)  # not a weight of the model (transformers does not load it): no Hessian
            not_weights.add(name)
            continue
        matches = p is not None and (p.shape == e.shape or resized(e, p))
        if matches and e.dtype.is_floating_point and e.dtype not in SCORED_DTYPES:
            # Copied through, a layer stored so would escape purification.
            raise CheckpointError(f"{e.file}: tensor {name!r} is {e.dtype}; out of core scores float32, float16 "
                                  "and bfloat16 tensors: purify in memory (which reads it as float32) or store it "
                                  "in one of those")
        if matches and e.dtype in SCORED_DTYPES:
            if not p.dtype.is_floating_point:  # (a floating one is read rounded to the suspect's dtype)
                raise CheckpointError(f"{p.file}: tensor {base!r} is {p.dtype}, where the suspect's {name!r} is "
                                      f"{e.dtype}: not the weights of its pre-trained model; pass that model")
            h = h_ckpt.entries.get(name)
            if h is None or h.shape != e.shape:
                raise CheckpointError(f"the hessian {hessian!r} has no tensor {name!r} of shape {list(e.shape)}; "
                                      "estimate it on this model (finepurify_ext.hessian) and save it")
            scored.append(name)
            if p.shape != e.shape:
                pretrained_rows[name] = p.shape[0]
        else:
            unscored.append(name)
    added_rows, removed_rows = vocabulary_resizes({n: tuple(sus_ckpt.entries[n].shape) for n in pretrained_rows},
                                                  pretrained_rows)
    # The elements ranked of each scored tensor: all, or a resized one's rows both have (the first elements).
    scored_numel = {name: min(sus_ckpt.numel(name), pre_ckpt.numel(pre_name[name])) for name in scored}
    if not scored:
        raise CheckpointError(f"no tensor of {suspect!r} matches {pretrained!r} by name and shape: "
                              "mismatched architectures")
    embedding = None
    if config.embeddings == "separate":
        embedding = embedding_tensor_of(scored, layout)
        if embedding is not None and len(sus_ckpt.entries[embedding].shape) != 2:
            embedding = None
    # A Hessian of a model whose embedding is tied to the output carries the clean inputs' token ids:
    # they, not zero Hessian rows, tell the rows the clean data never reaches (as purify_ does).
    seen_texts = {meta["seen_tokens"] for meta in h_ckpt.metadata.values() if "seen_tokens" in meta}
    try:
        seen_tokens = decode_ids(seen_texts.pop()) if seen_texts else None
    except ValueError:
        raise CheckpointError(f"{hessian}: its seen_tokens metadata is damaged; estimate the Hessian again with "
                              "`finepurify hessian`") from None
    ranked = [n for n in scored if n != embedding]
    bytes_read = 0
    unseen_added = []  # purify.unseen_added_rows: the embedding's added rows the clean data never reaches
    if vocabulary in added_rows and (seen_tokens is not None or vocabulary in h_ckpt):
        rows, width = sus_ckpt.entries[vocabulary].shape[0], math.prod(sus_ckpt.entries[vocabulary].shape[1:])
        start = pretrained_rows[vocabulary]
        if seen_tokens is not None:
            unseen_added = unseen_added_rows(start, rows, seen_tokens)
        else:  # the added rows' Hessian, a block of rows at a time (as small as a pass's pieces)
            block = max(1, chunk_bytes // 4 // max(width, 1))
            for first in range(start, rows, block):
                count = min(block, rows - first)
                added_h = h_ckpt.read(vocabulary, first * width, count * width, reuse=True).view(-1, width)
                _check_hessian(added_h.float(), f"the Hessian {h_ckpt.entries[vocabulary].file}: tensor {vocabulary!r}")
                unseen_added += unseen_added_rows(first, first + count, None, added_h)
    chunk = max(1, chunk_bytes // 4)
    # A tied output layer's stored copy is written as its embedding: read with the embedding's
    # pre-trained value and Hessian, it takes the same resets (it is not ranked a second time).
    source_of = {copy: emb for copy, emb in tied_copies.items() if emb in scored}
    for copy, emb in source_of.items():
        pre_name[copy], scored_numel[copy] = pre_name[emb], scored_numel[emb]
    unscored += [copy for copy in tied_copies if copy not in source_of]  # as its embedding is
    # the dtype each tensor's pre-trained values are rounded to: the suspect's (its embedding's, for a
    # tied copy stored in another dtype: the values the tied model was fine-tuned from)
    as_stored = {name: sus_ckpt.entries[source_of.get(name, name)].dtype for name in scored_numel}
    # The rankings that read no Hessian value per element never read the Hessian's pieces.
    reads_hessian = config.ranking == "fine_purifying"

    # Each piece of a pass is read while the one before it is used: its (up to) three reads run at
    # once on threads (file reads release the GIL) into one of two sets of scratch buffers, taken in
    # turn, so a set is refilled only once the caller has moved past the piece it held.
    piece_bytes = [chunk * max((c.entries[n].dtype.itemsize for n in names), default=1)
                   for c, names in ((sus_ckpt, ranked), (pre_ckpt, [pre_name[n] for n in ranked]), (h_ckpt, ranked))]
    slots = []

    def pieces(names, with_hessian=True, with_weights=True, to=device):
        """(name, start, finetuned, pretrained, float32 hessian) over the flat pieces of ``chunk``
        elements of ``names``, in order, on ``to`` (None for what is not read); a piece is valid
        until the next one is asked for."""
        nonlocal bytes_read
        if not slots:
            slots.extend([torch.empty(n, dtype=torch.uint8, pin_memory=pin) for n in piece_bytes] for _ in range(2))
        jobs = [(name, start, min(chunk, scored_numel[name] - start))
                for name in names for start in range(0, scored_numel[name], chunk)]
        files = ([0, 1] if with_weights else []) + ([2] if with_hessian else [])  # into slot buffers 0-2
        with ThreadPoolExecutor(max(1, len(files)), thread_name_prefix="finepurify-read") as readers:

            def submit(k):
                name, start, count = jobs[k]
                reads = [(sus_ckpt, name), (pre_ckpt, pre_name[name]), (h_ckpt, source_of.get(name, name))]
                return [readers.submit(reads[f][0].read, reads[f][1], start, count, into=slots[k % 2][f])
                        for f in files]

            pending = submit(0) if jobs else []
            for k, (name, start, count) in enumerate(jobs):
                got = dict(zip(files, (f.result() for f in pending)))
                pending = submit(k + 1) if k + 1 < len(jobs) else []
                # the pre-trained values as the suspect stores them (a bfloat16 fine-tune of a float32
                # model started from them rounded): an unmoved weight's drift is exactly 0 (as in memory)
                ft, pre = (got[0].to(to), got[1].to(to, as_stored[name]).to(got[0].dtype)) if with_weights \
                    else (None, None)
                h = got[2].to(to).float() if with_hessian else None
                bytes_read += sum(t.numel() * t.element_size() for t in got.values())
                yield name, start, ft, pre, h
                del got, ft, pre, h

    # Pre-pass: what must be known before any threshold pass, and only what the ranking needs: the
    # Hessian's check, its mean per tensor (no_hessian) and the floor's sample (the one purify_
    # takes: every stride-th value). Where the one-pass threshold search can run
    # (purify.CANDIDATES_ON), every ranking takes one: it reads the weights too and keeps a denser
    # sample of their values, which brackets the threshold, so that the pre-pass and one pass replace
    # the three histogram passes.
    ranked_elements = sum(scored_numel[n] for n in ranked)
    if num_reset is not None and not 0 <= num_reset <= ranked_elements:  # from the headers, before any read
        raise CheckpointError(f"the reset count {num_reset} is out of range [0, {ranked_elements}]: the checkpoints "
                              f"hold {ranked_elements} scored weights")
    h_mean, floor = {}, None
    wants_floor = config.hessian_floor_quantile is not None and config.ranking in ("fine_purifying", "no_hessian")
    reset_on, search_on = torch.device(device), search_device(device)
    one_pass = search_on is not None and ranked_elements >= CANDIDATES_MIN_WEIGHTS
    reads_hessian_first = wants_floor or config.ranking == "no_hessian" or (one_pass and reads_hessian)
    score_sample = {}  # name: [(finetuned, pretrained, hessian or None) at the sampled elements of each piece]
    if reads_hessian_first or one_pass:
        samples, h_sum = [], {name: 0.0 for name in ranked}
        stride = max(1, ranked_elements // FLOOR_SAMPLES)  # the floor's sample: purify_'s
        score_stride = max(1, ranked_elements // min(OUT_OF_CORE_SAMPLES,
                                                     max(FLOOR_SAMPLES, ranked_elements // OUT_OF_CORE_SAMPLE_EVERY)))
        bar = tqdm(total=ranked_elements, desc="pre-pass", unit=" weights", unit_scale=True, disable=not progress,
                   leave=False)
        # Checked and summed on the CPU.
        for name, start, ft, pre, h in pieces(ranked, reads_hessian_first, with_weights=one_pass, to="cpu"):
            if h is not None:
                _check_hessian(h, f"the Hessian {h_ckpt.entries[name].file}: tensor {name!r}")  # before its floor
            if config.ranking == "no_hessian":
                h_sum[name] += sum_float64(h)
            if wants_floor:
                samples.append(h[(-start) % stride::stride].clone())
            if one_pass:
                picked = slice((-start) % score_stride, None, score_stride)
                score_sample.setdefault(name, []).append(
                    (ft[picked].clone(), pre[picked].clone(), h[picked].clone() if reads_hessian else None))
            bar.update((h if h is not None else ft).numel())
            del h, ft, pre
        bar.close()
        if config.ranking == "no_hessian":
            h_mean = {name: total / max(scored_numel[name], 1) for name, total in h_sum.items()}
        if wants_floor:
            floor = sample_quantile(torch.cat(samples), config.hessian_floor_quantile)
        del samples
    times["pre_pass"] = time.perf_counter() - start_all

    eps = 1.0 if config.ranking == "magnitude" else config.eps
    # The one-element Hessians (no_hessian: each tensor's floored mean), made once, not per piece,
    # on each device that scores: the one that resets, the one that searches, and the CPU (the sample).
    constants = {on: (torch.zeros(1, device=on),
                      {name: torch.tensor([max(m, floor or 0.0)], dtype=torch.float32, device=on)
                       for name, m in h_mean.items()})
                 for on in {reset_on, search_on or reset_on, torch.device("cpu")}}

    def piece_inputs(name, start, h, on=reset_on):
        """(hessian passed, ops.Ranking) of one piece on ``on``: the scoring spec of purify.scoring_for."""
        zero, scalar_h = constants[on]
        name = source_of.get(name, name)
        if config.ranking == "fine_purifying":
            return h, ops.Ranking(hessian_floor=floor or 0.0)
        if config.ranking == "no_hessian":
            return scalar_h[name], ops.PLAIN
        if config.ranking == "fine_mixing":
            return zero, ops.Ranking(random_seed=config.seed, random_keys=(ops.tensor_key(name),),
                                     random_offsets=(start,))
        return zero, ops.PLAIN  # magnitude

    def refuse_unrankable(name, ft, pre):
        """A pass found unrankable scores in a piece of ``name``: the tensor and its file named."""
        raise unrankable([(f"{sus_ckpt.entries[name].file}: tensor {name!r}", ft),
                          (f"{pre_ckpt.entries[pre_name[name]].file}: tensor {pre_name[name]!r}", pre)]) \
            or CheckpointError(f"cannot rank {name!r}: its scores overflow float32; use a larger eps")

    threshold_passes = 0

    def histogram_of(level, prefix):
        nonlocal threshold_passes
        threshold_passes += 1
        counts = torch.zeros(LEVEL_BINS[level] + 2, dtype=torch.int64)
        bar = tqdm(total=ranked_elements, desc=f"histogram pass {level + 1}/3", unit=" weights", unit_scale=True,
                   disable=not progress, leave=False)
        for name, start, ft, pre, h in pieces(ranked, reads_hessian):
            if level == 0 and reads_hessian and not reads_hessian_first:  # not checked by a pre-pass
                _check_hessian(h, f"the Hessian {h_ckpt.entries[name].file}: tensor {name!r}")
            hs, ranking = piece_inputs(name, start, h)
            piece = ops.score_histogram([ft], [pre], [hs], eps, level, prefix, ranking).cpu()  # one read
            if piece[LEVEL_BINS[level]] > 0:
                refuse_unrankable(name, ft, pre)
            counts += piece
            bar.update(ft.numel())
            del ft, pre, h, hs
        bar.close()
        return counts

    def candidates_pass(low, high, capacity):
        """One score_candidates pass over every piece: the counts summed, and each piece's keys
        strictly inside the range, sorted descending (None once more than ``capacity`` are)."""
        nonlocal threshold_passes
        threshold_passes += 1
        counts, kept = torch.zeros(CANDIDATE_COUNTS + BETWEEN_BINS, dtype=torch.int64), []
        # The kept keys go into one buffer: a small copy per piece left between the pieces' large
        # outputs on the heap kept their freed pages resident (peak RSS up to 1.4 GB against 0.65).
        store = torch.empty(capacity, dtype=torch.int32)
        bar = tqdm(total=ranked_elements, desc="threshold pass", unit=" weights", unit_scale=True,
                   disable=not progress, leave=False)
        for name, start, ft, pre, h in pieces(ranked, reads_hessian, to=search_on):
            hs, ranking = piece_inputs(name, start, h, on=search_on)
            used = int(counts[2])
            # Never more room than the piece's elements or what is left; a piece that holds more
            # keys than piece_room gives it, and fits what is left, is scored again with room for
            # exactly its keys.
            left = min(max(0, capacity - used), ft.numel()) if kept is not None else 0
            room = min(left, piece_room(capacity, ft.numel(), ranked_elements))
            piece, keys = ops.score_candidates([ft], [pre], [hs], eps, low, high, room, ranking)
            inside = int(piece[2])
            if room < inside <= left:
                piece, keys = ops.score_candidates([ft], [pre], [hs], eps, low, high, inside, ranking)
                room = inside
            piece = piece.cpu()
            if piece[4] > 0:
                refuse_unrankable(name, ft, pre)
            counts += piece
            if kept is not None and inside <= room:
                store[used:used + inside] = keys[:inside]
                kept.append(store[used:used + inside])  # each piece's keys, sorted descending
            else:
                kept = None
            bar.update(ft.numel())
            del keys, ft, pre, h, hs
        bar.close()
        return counts, kept

    def one_pass_search():
        """The sample's bracket and the pass over it (purify._candidate_pass out of core), or None
        for an empty sample."""
        names, fts, pres, hs = list(score_sample), [], [], []
        for n in names:  # each tensor's pieces joined, and let go of, in turn: never two copies of the sample
            taken = score_sample.pop(n)
            fts.append(torch.cat([ft for ft, _, _ in taken]))
            pres.append(torch.cat([pre for _, pre, _ in taken]))
            hs.append(piece_inputs(n, 0, torch.cat([h for _, _, h in taken]) if reads_hessian else None,
                                   on=torch.device("cpu"))[0])
            del taken
        # Every element of the sample kept (a run of SAMPLE_RUN at every SAMPLE_RUN-th, but the last
        # few of a tensor), with one Ranking for every tensor: Fine-mixing's draws by list position
        # (a sampled weight's draw is not its own, but the draws are as even, and the pass is exact).
        ranking = (ops.Ranking(random_seed=config.seed) if config.ranking == "fine_mixing"
                   else piece_inputs(names[0], 0, None)[1] if names else ops.PLAIN)
        sampled = ops.score_sample(fts, pres, hs, eps, SAMPLE_RUN, ranking)
        planned = candidate_range(*sample_keys(*sampled), ranked_elements, config, num_reset, OUT_OF_CORE_KEYS)
        if planned is None:
            return None
        low, high, capacity = planned
        counts, kept = candidates_pass(low, high, capacity)
        return counts, kept, low, high

    start_threshold = time.perf_counter()
    level0 = candidates = None
    if one_pass:
        candidates = one_pass_search()
    score_sample.clear()
    if candidates is None:
        level0 = histogram_of(0, 0) if ranked_elements else torch.zeros(LEVEL_BINS[0] + 2, dtype=torch.int64)
    moved = ranked_elements - int(level0[-1] if level0 is not None else candidates[0][5])
    counted = moved if config.count_moved_only or config.ranking == "fine_mixing" else ranked_elements
    reserve_from_config = num_reset is None
    # a reserve ratio of 1 (or --num-reset 0) keeps every weight, the embedding's unseen rows too (as in memory)
    rows_too = config.reserve_ratio < 1.0 if reserve_from_config else num_reset > 0
    if num_reset is None:
        num_reset = ops.num_reset_for(counted, config.reserve_ratio)
    threshold = None
    if num_reset > 0 and candidates is not None:  # narrowed where it held too many keys or missed
        threshold = search_ranges(candidates, candidates_pass, num_reset, ranked_elements, OUT_OF_CORE_KEYS)
    elif num_reset > 0:  # no one-pass search
        threshold = threshold_from_histograms(
            lambda level, prefix: level0 if level == 0 and level0 is not None else histogram_of(level, prefix),
            num_reset, ranked_elements)  # k is in range
    times["threshold"] = time.perf_counter() - start_threshold

    # The added tokens' rows the clean data never reaches, reset under the embedding rule to the
    # pre-trained rows' mean (as purify_ does); else kept, and warned of.
    resets_added = bool(unseen_added) and rows_too and config.added_tokens == "mean" and embedding == vocabulary
    from .pipeline import tokenizer_in  # (pipeline imports this module)
    # Reset pass: the suspect's shards written anew, with the same names and order.
    report = CheckpointReport(config.reserve_ratio if reserve_from_config else None, num_reset, threshold,
                              ranked_elements, moved, copied_unscored=unscored, hessian_floor=floor,
                              copied_unscored_weights=sum(sus_ckpt.numel(n) for n in unscored if n not in not_weights
                                                          and sus_ckpt.entries[n].dtype.is_floating_point),
                              embedding_tensor=embedding, threshold_passes=threshold_passes,
                              config=asdict(config), warnings=([NOTHING_MOVED] if ranked_elements and not moved else [])
                              + ([unseen_added_warning(unseen_added, added_rows, tokenizer_in(suspect))]
                                 if unseen_added and not resets_added else []),
                              embedding_rule=None if embedding is None or not rows_too else
                              "hessian" if seen_tokens is None else "seen_tokens",
                              inputs=inputs or {"pretrained": os.path.abspath(pretrained),
                                                "suspect": os.path.abspath(suspect),
                                                "hessian": os.path.abspath(hessian)},
                              hessian_of=hessian_of, added_rows=added_rows, removed_rows=removed_rows,
                              unseen_added_rows=unseen_added, tied_copies=dict(source_of))
    ranked_set = set(ranked)

    def copy_as_is(name, writer, start=0):
        """Elements ``start`` on of ``name``, copied unchanged (finite: checked)."""
        nonlocal bytes_read
        numel = sus_ckpt.numel(name)
        for offset in range(start, numel, chunk):
            piece = sus_ckpt.read(name, offset, min(chunk, numel - offset), reuse=True)
            _check_finite(piece, sus_ckpt.entries[name].file, name)
            writer.write_part(name, piece)
            bytes_read += piece.numel() * piece.element_size()
            del piece

    def reset_embedding_rows(name, writer):
        """The embedding's rows of tokens the clean data never reaches (Hessian row exactly zero) that
        moved take their pre-trained values; a block of rows at a time. (Its tied copy's the same.)"""
        source = source_of.get(name, name)
        nonlocal bytes_read
        width = sus_ckpt.entries[name].shape[1]
        rows = scored_numel[name] // max(width, 1)  # a grown one's added rows are copied after
        block = max(1, chunk // max(width, 1))
        reset = 0
        unseen_by_tokens = None if seen_tokens is None else unseen_mask(seen_tokens, rows)
        pre_sum = torch.zeros(width, dtype=torch.float64) if resets_added else None
        for row in range(0, rows, block):
            count = min(block, rows - row) * width
            ft = sus_ckpt.read(name, row * width, count, reuse=True).view(-1, width)
            pre = pre_ckpt.read(pre_name[name], row * width, count, reuse=True).view(-1, width).to(
                as_stored[name]).to(ft.dtype)
            bytes_read += count * (ft.element_size() + pre_ckpt.entries[pre_name[name]].dtype.itemsize)
            if pre_sum is not None:
                pre_sum += row_sum(pre)
            if unseen_by_tokens is None:  # the rows of zero Hessian; the seen-token rule reads none (as in memory)
                h = h_ckpt.read(source, row * width, count, reuse=True).view(-1, width)
                bytes_read += count * h.element_size()
                _check_hessian(h.float(), f"the Hessian {h_ckpt.entries[source].file}: tensor {source!r}")
                unseen = (h == 0).all(dim=1)
                del h
            else:
                unseen = unseen_by_tokens[row : row + len(ft)]
            unseen = unseen & (ft != pre).any(dim=1) & rows_too
            ft[unseen] = pre[unseen]
            reset += int(unseen.sum())
            writer.write_part(name, ft.reshape(-1))
            del ft, pre
        if pre_sum is None:
            copy_as_is(name, writer, rows * width)
            return reset
        mean, total_rows = pre_sum / pre_ckpt.entries[pre_name[name]].shape[0], sus_ckpt.entries[name].shape[0]
        if not bool(torch.isfinite(mean).all()):
            raise CheckpointError(f"{pre_ckpt.entries[pre_name[name]].file}: tensor {pre_name[name]!r} holds NaN or Inf "
                                  "values (its rows' mean, which added tokens' rows are reset to, is not finite); the "
                                  "checkpoint is damaged: use an undamaged copy")
        for row in range(rows, total_rows, block):  # the added rows: the unseen ones set to the mean
            count = min(block, total_rows - row) * width
            ft = sus_ckpt.read(name, row * width, count, reuse=True).view(-1, width)
            _check_finite(ft, sus_ckpt.entries[name].file, name)
            bytes_read += count * ft.element_size()
            set_rows_(ft, [i - row for i in unseen_added if row <= i < row + len(ft)], mean)
            writer.write_part(name, ft.reshape(-1))
            del ft
        report.added_rows_reset = len(unseen_added)
        return reset

    def write(tmp):
        nonlocal bytes_read
        start = time.perf_counter()
        bar = tqdm(total=sus_ckpt.nbytes, desc="reset pass", unit="B", unit_scale=True, disable=not progress,
                   leave=False)
        # The ranked tensors' pieces, read ahead in the order the shards take them; closed (its reads
        # finished, its threads gone) however the loop ends.
        reset_pieces = pieces([n for names in sus_ckpt.file_order.values() for n in names
                               if source_of.get(n, n) in ranked_set and source_of.get(n, n) != embedding
                               and threshold is not None], reads_hessian)
        with contextlib.closing(reset_pieces):
            for file, names in sus_ckpt.file_order.items():
                layout = [(n, sus_ckpt.entries[n].dtype, sus_ckpt.entries[n].shape) for n in names]
                writer = ShardWriter(os.path.join(tmp, os.path.basename(file)), layout, sus_ckpt.metadata[file])
                for name in names:
                    if embedding is not None and source_of.get(name, name) == embedding:
                        rows_reset = reset_embedding_rows(name, writer)
                        if name == embedding:  # a tied copy's are the embedding's, counted once
                            report.embedding_rows_reset = rows_reset
                            report.reset_per_tensor[name] = rows_reset * sus_ckpt.entries[name].shape[1]
                    elif source_of.get(name, name) in ranked_set and threshold is not None:
                        resets = 0
                        for _ in range(math.ceil(scored_numel[name] / chunk)):
                            piece_name, piece_start, ft, pre, h = next(reset_pieces)
                            assert piece_name == name, (piece_name, name)
                            hs, ranking = piece_inputs(name, piece_start, h)
                            resets += int(ops.masked_reset_([ft], [pre], [hs], threshold, eps, ranking=ranking)[0])
                            writer.write_part(name, ft.cpu())  # finite: the histogram passes refused NaN/Inf
                            del ft, pre, h, hs
                        if name not in source_of:
                            report.reset_per_tensor[name] = resets
                        copy_as_is(name, writer, scored_numel[name])  # a grown tensor's added rows
                    else:  # copied as it is (nothing to reset: no need to read pre-trained values and Hessian)
                        if name in ranked_set:
                            report.reset_per_tensor[name] = 0
                        copy_as_is(name, writer)
                    report.bytes_written += sus_ckpt.entries[name].nbytes
                    bar.update(sus_ckpt.entries[name].nbytes)
                writer.close()
        bar.close()
        if os.path.isdir(suspect):  # the index, config and tokenizer files; nothing else of the suspect's
            for extra in sorted(os.listdir(suspect)):
                src = os.path.join(suspect, extra)
                if not os.path.isfile(src) or extra.endswith(".safetensors") or (extra == INDEX and
                                                                                 sus_ckpt.index is None):
                    continue  # the weights, written above (an index beside a model.safetensors was not read)
                if extra in CONFIG_FILES:
                    report.config_keys_removed += [f"{extra}: {k}" for k in
                                                   copy_config_without_code(src, os.path.join(tmp, extra))]
                elif extra in SIDE_FILES or extra == INDEX:
                    shutil.copyfile(src, os.path.join(tmp, extra))
        # other weights (unpurified: .h5, .onnx, .gguf, pickles), code, anything unknown: listed from
        # the suspect as given (an adapter's own files, not those of the model it was merged into)
        report.not_copied = not_copied_from(given_suspect or suspect, tmp)
        times["reset_pass"] = time.perf_counter() - start
        report.timings_s = times
        report.bytes_read = bytes_read
        with open(os.path.join(tmp, "finepurify_report.json"), "w") as f:
            json.dump(report.to_dict(), f, indent=2)

    save_atomically(out_dir, write, overwrite=overwrite)
    return report
