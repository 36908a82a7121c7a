"""Bad input on every command: one or two lines naming the file, line, parameter or option, what is
wrong and what to do; exit code 2; no traceback; inputs byte-identical; no partial output; cheap
checks before any expensive work. (The static-libstdc++ crash is tests/test_build.py's.)"""
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers", reason="the command line loads transformers models")
from safetensors.torch import load_file, save_file  # noqa: E402

from finepurify_ext import cli, pipeline  # noqa: E402
from finepurify_ext.errors import UserError  # noqa: E402
from finepurify_ext.checkpoint import fingerprint  # noqa: E402
from finepurify_ext.hessian import HESSIAN_FORMAT  # noqa: E402
from finepurify_ext.purify import PurifyConfig, purify_  # noqa: E402
from tiny_models import make_tokenizer, model_dirs  # noqa: E402

SCORED = "bert.encoder.layer.1.attention.self.query.weight"  # a parameter every ranking scores


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    pre, suspect, clean = model_dirs(make_tokenizer(root), root)
    hessian = str(root / "hessian.safetensors")
    assert cli.main(["hessian", "--model", suspect, "--clean-data", clean, "--out", hessian, "--batch-size", "8"]) == 0
    # The same Hessian not naming its model (as the Python API saves it), for suspects changed here:
    # the recorded one is refused for any other suspect before the change under test is seen.
    unnamed = str(root / "unnamed_hessian.safetensors")
    save_file(load_file(hessian), unnamed, metadata={"format": HESSIAN_FORMAT, "squared_gradients": "3"})
    return SimpleNamespace(root=root, pre=pre, suspect=suspect, clean=clean, hessian=hessian, unnamed_hessian=unnamed)


def command(name, models, out, suspect=None, pretrained=None, data=None):
    """The arguments of one command on the given inputs (the module's good ones by default; another
    suspect purified out of core with the Hessian that names no model)."""
    hessian = models.hessian if suspect is None else models.unnamed_hessian
    suspect, pretrained, data = suspect or models.suspect, pretrained or models.pre, data or models.clean
    return {
        "purify": ["purify", "--pretrained", pretrained, "--suspect", suspect, "--clean-data", data, "--out", out,
                   "--finetune-steps", "1"],
        "purify-out-of-core": ["purify", "--pretrained", pretrained, "--suspect", suspect,
                               "--hessian-file", hessian, "--out", out],
        "hessian": ["hessian", "--model", suspect, "--clean-data", data, "--out", out],
        "evaluate": ["evaluate", "--model", suspect, "--data", data],
        "demo": ["demo", "--out", out, "--quick"],
    }[name]


def digest(*paths):
    out = {}
    for path in paths:
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        for f in files:
            with open(f, "rb") as handle:
                out[f] = hashlib.sha256(handle.read()).hexdigest()
    return out


def fails(args, capsys, *fragments, inputs=(), code=2):
    """Runs the command, which must fail with ``code`` and a message holding every fragment; the
    inputs stay byte-identical and no output or partial output is left next to --out."""
    before = digest(*inputs)
    out = args[args.index("--out") + 1] if "--out" in args else None
    existed = out is not None and out != "" and os.path.exists(out)
    kept = digest(out) if existed else None
    assert cli.main(args) == code
    err = capsys.readouterr().err
    prefix = f"finepurify {args[0]}: error: "
    assert prefix in err, err
    message = err[err.index(prefix):]
    # At the start of a line, as a terminal shows it: a bar left open (it ends with a carriage
    # return, not a newline) is closed first, which blanks its line and returns to its start.
    before_message = err[:err.index(prefix)].rsplit("\n", 1)[-1]
    assert before_message.rsplit("\r", 1)[-1] == "", before_message[-300:]
    assert "Traceback" not in err and message.count("\n") <= 2, err
    for fragment in fragments:
        assert fragment in message, message
    assert digest(*inputs) == before
    if existed:
        assert digest(out) == kept  # an earlier output is kept as it was, --overwrite or not
    if out and not existed:
        assert not os.path.exists(out) and not os.path.exists(out + ".accumulator.safetensors")
        parent = os.path.dirname(os.path.abspath(out))
        while not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        assert not [p for p in os.listdir(parent) if ".partial-" in p or ".finepurify-write-test-" in p]
    return message


def copy_model(models, tmp_path, name):
    return shutil.copytree(models.suspect, tmp_path / name)


def rewrite_weights(directory, change):
    path = os.path.join(directory, "model.safetensors")
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(change(raw))
    return path


def _offsets_past_end(raw):
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10**9
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :]


CORRUPTIONS = {
    "truncated": (lambda raw: raw[: len(raw) // 2], "truncated or corrupt"),
    "header-not-json": (lambda raw: raw[:8] + b"{" * 16 + raw[24:], "cannot read the safetensors header"),
    "offsets-past-end": (_offsets_past_end, "lies outside the file or has the wrong size"),
}
MODEL_COMMANDS = ["purify", "purify-out-of-core", "hessian", "evaluate"]


# ------------------------------------------------------------------------------ model files


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_corrupt_safetensors(models, tmp_path, capsys, name, corruption):
    change, reason = CORRUPTIONS[corruption]
    suspect = copy_model(models, tmp_path, "suspect")
    weights = rewrite_weights(suspect, change)
    fails(command(name, models, str(tmp_path / "out"), suspect=str(suspect)), capsys, weights, reason,
          inputs=[suspect, models.pre, models.clean])
    if name.startswith("purify"):  # the pre-trained model too
        pre = shutil.copytree(models.pre, tmp_path / "pre")
        weights = rewrite_weights(pre, change)
        fails(command(name, models, str(tmp_path / "out"), pretrained=str(pre)), capsys, weights, reason,
              inputs=[pre, models.suspect])
    if name == "purify-out-of-core":  # and the saved Hessian
        hessian = tmp_path / "hessian.safetensors"
        hessian.write_bytes(change(Path(models.hessian).read_bytes()))
        args = command(name, models, str(tmp_path / "out"))
        args[args.index("--hessian-file") + 1] = str(hessian)
        fails(args, capsys, str(hessian), reason, inputs=[hessian])


def _header_edit(edit):
    """A corruption that rewrites a safetensors file's JSON header text with ``edit``."""
    def change(raw):
        (n,) = struct.unpack("<Q", raw[:8])
        encoded = edit(raw[8 : 8 + n].decode().rstrip()).encode()
        encoded += b" " * (-len(encoded) % 8)
        return struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :]
    return change


def _duplicate_first_tensor(text):
    header = json.loads(text)
    name = next(k for k in header if k != "__metadata__")
    entry = json.dumps({name: header[name]})[1:-1]
    return "{" + entry + ", " + text.lstrip()[1:]  # the same name once more, first


def _overlapping(header):
    tensors = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = next((a, b) for a, b in zip(tensors, tensors[1:])
                if header[a]["data_offsets"][1] - header[a]["data_offsets"][0]
                == header[b]["data_offsets"][1] - header[b]["data_offsets"][0] > 0)
    header[b]["data_offsets"] = list(header[a]["data_offsets"])  # two names on the same bytes
    return json.dumps(header)


HEADER_FAULTS = {
    "duplicate-name": (_header_edit(_duplicate_first_tensor), "names 'bert.", "twice; the file is damaged"),
    "overlap": (_header_edit(lambda t: _overlapping(json.loads(t))), "overlaps another in the file"),
    "metadata-not-a-map": (_header_edit(lambda t: json.dumps({**json.loads(t), "__metadata__": ["pt"]})),
                           "__metadata__ is not a map of strings"),
}


@pytest.mark.parametrize("fault", HEADER_FAULTS)
def test_headers_safetensors_refuses_are_refused(models, tmp_path, capsys, fault):
    """Out of core reads the headers itself: what safetensors would refuse is refused there too (a
    name given twice, where the last won; two tensors on the same bytes; metadata that failed only
    when the output was written)."""
    change, *fragments = HEADER_FAULTS[fault]
    suspect = copy_model(models, tmp_path, "suspect")
    weights = rewrite_weights(suspect, change)
    fails(command("purify-out-of-core", models, str(tmp_path / "out"), suspect=str(suspect)), capsys, weights,
          *fragments, inputs=[suspect])


def test_a_hessian_is_never_read_as_a_models_weights(models, tmp_path, capsys):
    """hessian refuses an --out inside the model's directory; a directory holding model.safetensors is
    read as that file alone, as transformers reads it (a Hessian, or an index's shards, beside it are
    not the weights), and a directory of shards with a Hessian among them is refused."""
    fails(["hessian", "--model", models.suspect, "--clean-data", models.clean, "--out",
           os.path.join(models.suspect, "h.safetensors")], capsys, f"is inside the input {models.suspect}",
          inputs=[models.suspect])
    reference = tmp_path / "reference"
    assert cli.main(command("purify-out-of-core", models, str(reference))) == 0
    pre = shutil.copytree(models.pre, tmp_path / "pre_with_hessian")
    shutil.copyfile(models.hessian, pre / "hessian.safetensors")
    suspect = copy_model(models, tmp_path, "suspect_with_shards")  # and an index naming other weights
    state = {n: t + 1 if t.is_floating_point() else t for n, t in load_file(suspect / "model.safetensors").items()}
    save_file(state, suspect / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    (suspect / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in state}}))
    out = tmp_path / "out"
    assert cli.main(command("purify-out-of-core", models, str(out), suspect=str(suspect), pretrained=str(pre))) == 0
    got, want = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copyfile(models.suspect + "/model.safetensors", shards / "model-00001-of-00001.safetensors")
    shutil.copyfile(models.hessian, shards / "model-hessian.safetensors")
    fails(command("purify-out-of-core", models, str(tmp_path / "o2"), suspect=str(shards)), capsys,
          "model-hessian.safetensors: a Hessian (finepurify hessian's output) among the suspect checkpoint's files",
          inputs=[shards])


def test_a_hessian_is_the_suspects_it_was_estimated_on(models, tmp_path, capsys):
    """finepurify hessian records the model's fingerprint; out of core refuses the Hessian for a
    suspect whose weights differ (a fine-tune's drift over a tensor, or one tensor in another
    dtype), and takes it for the same weights sharded otherwise. A Hessian that records no model
    (the Python API's) is taken, with a note."""
    from finepurify_ext.checkpoint import file_digest

    moved, cast = copy_model(models, tmp_path, "moved"), copy_model(models, tmp_path, "cast")
    for directory, change in ((moved, lambda t: t + 1e-3), (cast, lambda t: t.to(torch.float16))):
        state = load_file(directory / "model.safetensors")
        state[SCORED] = change(state[SCORED])
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        args = command("purify-out-of-core", models, str(tmp_path / "out"))
        args[args.index("--suspect") + 1] = str(directory)
        fails(args, capsys, f"{models.hessian} was estimated on {models.suspect}, and the weights of the suspect "
              f"{directory} are not those (another model, or changed since): estimate the suspect's Hessian with "
              "`finepurify hessian`", inputs=[directory, models.hessian])
    reference = tmp_path / "reference"
    assert cli.main(command("purify-out-of-core", models, str(reference))) == 0
    assert "does not record the model" not in capsys.readouterr().err
    assert json.loads((reference / "finepurify_report.json").read_text())["hessian_of"] == {
        "model": models.suspect, "model_fingerprint": fingerprint(models.suspect, load_file(models.hessian), "bert."),
        "clean_data_sha256": file_digest(models.clean)}
    sharded = tmp_path / "sharded"  # the same weights in two shards and an index
    shutil.copytree(models.suspect, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(os.path.join(models.suspect, "model.safetensors"))
    names = sorted(state)
    weight_map = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    for shard in set(weight_map.values()):
        save_file({n: state[n] for n in names if weight_map[n] == shard}, sharded / shard, metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert fingerprint(str(sharded)) == fingerprint(models.suspect) != fingerprint(str(cast))
    out = tmp_path / "from_shards"
    args = command("purify-out-of-core", models, str(out))
    args[args.index("--suspect") + 1] = str(sharded)
    assert cli.main(args) == 0
    got = {n: t for f in os.listdir(out) if f.endswith(".safetensors") for n, t in load_file(out / f).items()}
    want = load_file(reference / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)
    assert cli.main(command("purify-out-of-core", models, str(tmp_path / "unnamed"), suspect=models.suspect)) == 0
    assert (f"note: {models.unnamed_hessian} does not record the model it was estimated on (an older Hessian, or one "
            "saved by the Python API without provenance): not checked against --suspect") in capsys.readouterr().err
    assert json.loads((tmp_path / "unnamed" / "finepurify_report.json").read_text())["hessian_of"] is None


def test_an_interrupted_hessian_resumes_only_the_same_run(models, tmp_path, capsys, monkeypatch):
    """The running sums an interrupted `finepurify hessian` kept are resumed only by the same model,
    clean data, batch size, dtype and weights' dtype as loaded: another's are refused, and kept, not overwritten; sums saved
    before the run's keys were recorded are refused with the advice to start afresh."""
    from safetensors import safe_open

    from tiny_models import ctrl_c_after

    out = str(tmp_path / "h.safetensors")
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "batches", ctrl_c_after(pipeline.batches, 2))
        assert cli.main(command("hessian", models, out) + ["--batch-size", "4"]) == 130
    accumulator = out + ".accumulator.safetensors"
    assert f"run it again to resume from the last save ({accumulator})" in capsys.readouterr().err  # named
    kept = digest(accumulator)
    other_data = tmp_path / ("other" + os.path.splitext(models.clean)[1])  # the same examples in another order
    other_data.write_text("".join(reversed(open(models.clean).readlines())))
    moved = copy_model(models, tmp_path, "moved")
    state = load_file(moved / "model.safetensors")
    state[SCORED] += 1e-3
    save_file(state, moved / "model.safetensors", metadata={"format": "pt"})
    for args, what in ((command("hessian", models, out, suspect=str(moved)) + ["--batch-size", "4"], "model"),
                       (command("hessian", models, out, data=str(other_data)) + ["--batch-size", "4"], "clean data"),
                       (command("hessian", models, out) + ["--batch-size", "8"], "batch size")):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert f"error: cannot resume from {accumulator}: " not in err  # refused as such, not as a damaged file
        assert f"error: {accumulator} holds the running sums of a run with another {what} (" in err, err
        assert "resume with the same, or delete it to start afresh" in err and digest(accumulator) == kept
    older = tmp_path / "older.safetensors"  # saved before the runs' keys were recorded
    shutil.copyfile(accumulator, older)
    with safe_open(str(older), framework="pt") as f:
        sums, meta = {n: f.get_tensor(n) for n in f.keys()}, f.metadata()
    save_file(sums, str(older), metadata={k: v for k, v in meta.items() if not k.startswith("resume.")})
    shutil.copyfile(older, str(tmp_path / "o.safetensors") + ".accumulator.safetensors")
    assert cli.main(command("hessian", models, str(tmp_path / "o.safetensors")) + ["--batch-size", "4"]) == 2
    assert (".accumulator.safetensors was saved by an earlier version that did not record which run it belongs to; "
            "delete it to start afresh") in capsys.readouterr().err
    assert cli.main(command("hessian", models, out) + ["--batch-size", "4", "--dtype", "bfloat16"]) == 2
    assert "a run with another dtype (float32, now bfloat16)" in capsys.readouterr().err
    with monkeypatch.context() as patch:  # as a GPU loads a bfloat16 model: as stored (read_only_weights_dtype)
        patch.setattr(cli, "_read_only_dtype", lambda device, path: torch.bfloat16)
        assert cli.main(command("hessian", models, out) + ["--batch-size", "4"]) == 2
    assert "a run with another weights dtype (float32, now bfloat16)" in capsys.readouterr().err
    assert cli.main(command("hessian", models, out) + ["--batch-size", "4"]) == 0
    assert f"resuming from {accumulator}: 2 batches done" in capsys.readouterr().err  # said
    assert not os.path.exists(accumulator)
    uninterrupted = str(tmp_path / "u.safetensors")
    assert cli.main(command("hessian", models, uninterrupted) + ["--batch-size", "4"]) == 0
    got, want = load_file(out), load_file(uninterrupted)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)


def test_out_of_core_refuses_float64_weights_it_would_copy_through(models, tmp_path, capsys):
    suspect = copy_model(models, tmp_path, "suspect")
    state = load_file(suspect / "model.safetensors")
    state[SCORED] = state[SCORED].double()
    save_file(state, suspect / "model.safetensors", metadata={"format": "pt"})
    fails(command("purify-out-of-core", models, str(tmp_path / "out"), suspect=str(suspect)), capsys,
          f"tensor '{SCORED}' is torch.float64; out of core scores float32, float16 and bfloat16", inputs=[suspect])


def test_in_memory_purify_says_which_weights_it_could_not_rank(models, tmp_path, capsys):
    """A pre-trained checkpoint without a layer the suspect has: the layer cannot be ranked (no
    pre-trained value), and the command says how many weights that leaves, as out of core does."""
    from finepurify_ext.pipeline import load_classifier

    pre = shutil.copytree(models.pre, tmp_path / "pre")
    state = {n: t for n, t in load_file(pre / "model.safetensors").items() if not n.startswith("encoder.layer.1.")}
    save_file(state, pre / "model.safetensors", metadata={"format": "pt"})
    model, _, _ = load_classifier(models.suspect)
    layer = sum(p.numel() for n, p in model.named_parameters()
                if n.startswith(("bert.encoder.layer.1.", "classifier.")))
    for name in ("purify", "purify-out-of-core"):
        out = tmp_path / name
        assert cli.main(command(name, models, str(out), pretrained=str(pre))) == 0
        assert (f"; {layer} weights in tensors --pretrained lacks by name and shape were not ranked, "
                in capsys.readouterr().out), name


def _with_layers(models, tmp_path, name, layers):
    """A copy of the suspect with ``layers`` encoder layers: its own where it has them, new ones after."""
    from finepurify_ext.pipeline import load_classifier
    from transformers import BertForSequenceClassification

    model, tokenizer, _ = load_classifier(models.suspect)
    config = model.config
    config.num_hidden_layers = layers
    torch.manual_seed(5)
    other = BertForSequenceClassification(config)
    other.load_state_dict(model.state_dict(), strict=False)
    other.save_pretrained(tmp_path / name, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


@pytest.mark.parametrize("layers", ["suspect", "pretrained"])
def test_a_layer_only_one_model_has_is_refused(models, tmp_path, capsys, layers):
    """A suspect with a layer its pre-trained model lacks: the layer had no pre-trained value and
    passed unranked (the task head's treatment), a place to hide a backdoor. Only the head may be
    new; an architecture that differs otherwise is refused, in memory and out of core, before any
    pass. Likewise a pre-trained model with a layer the suspect lacks."""
    three = _with_layers(models, tmp_path, "three", 3)
    suspect, pretrained = (three, models.pre) if layers == "suspect" else (models.suspect, three)
    named = ("the suspect has 'bert.encoder.layer.2." if layers == "suspect" else "it has 'bert.encoder.layer.2.")
    for name in ("purify", "purify-out-of-core"):
        fails(command(name, models, str(tmp_path / "out"), suspect=suspect, pretrained=pretrained), capsys,
              f"{pretrained} is not the suspect's architecture (16 parameters differ, num_hidden_layers "
              f"{3 if layers == 'suspect' else 2} vs {2 if layers == 'suspect' else 3}: ", named,
              "give the pre-trained model the suspect was fine-tuned from", inputs=[suspect, pretrained])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_non_finite_weight_is_named_with_its_file(models, tmp_path, capsys, name, value):
    suspect = copy_model(models, tmp_path, "suspect")
    path = os.path.join(suspect, "model.safetensors")
    state = load_file(path)
    state[SCORED][2, 3] = value
    save_file(state, path, metadata={"format": "pt"})
    fails(command(name, models, str(tmp_path / "out"), suspect=str(suspect)), capsys, path, repr(SCORED),
          "1 NaN or Inf value", inputs=[suspect, models.pre])
    if name.startswith("purify"):
        pre = shutil.copytree(models.pre, tmp_path / "pre")
        path = os.path.join(pre, "model.safetensors")
        state = load_file(path)
        base_name = SCORED.removeprefix("bert.")
        state[base_name][0, 0] = value
        save_file(state, path, metadata={"format": "pt"})
        fails(command(name, models, str(tmp_path / "out"), pretrained=str(pre)), capsys, path, "NaN or Inf",
              inputs=[pre, models.suspect])


def test_in_memory_purify_names_parameters_not_list_indices(models):
    model, _, _ = pipeline.load_classifier(models.suspect)
    state = pipeline.pretrained_state_for(model, models.pre)
    hessians = load_file(models.hessian)
    for ranking in ("fine_purifying", "no_hessian"):  # the rankings that read the Hessian
        bad = {n: h.clone() for n, h in hessians.items()}
        bad[SCORED][1, 1] = float("nan")
        with pytest.raises(UserError, match=rf"the Hessian of '{SCORED}' holds \d+ NaN or Inf value") as error:
            purify_(model, state, bad, PurifyConfig(ranking=ranking))
        assert not re.search(r"\[\d+\]", str(error.value))
    bad_state = {**state, SCORED: state[SCORED].clone()}
    bad_state[SCORED][0, 1] = float("inf")
    with pytest.raises(UserError, match=f"the pre-trained model's parameter '{SCORED}' holds 1 NaN or Inf value"):
        purify_(model, bad_state, hessians, PurifyConfig())


@pytest.mark.parametrize("broken", ["not-json", "wrong-shapes"])
@pytest.mark.parametrize("name", ["purify", "hessian", "evaluate"])  # out of core reads no config.json
def test_config_json(models, tmp_path, capsys, name, broken):
    suspect = copy_model(models, tmp_path, "suspect")
    config = os.path.join(suspect, "config.json")
    if broken == "not-json":
        with open(config, "w") as f:
            f.write('{"model_type": "bert",, }')
        fragments = (config, "not valid JSON", "line 1, column 23")
    else:
        with open(config) as f:
            values = json.load(f)
        with open(config, "w") as f:
            json.dump({**values, "hidden_size": 48}, f)
        fragments = (str(suspect), "config.json does not match the weights", "in the checkpoint but")
    fails(command(name, models, str(tmp_path / "out"), suspect=str(suspect)), capsys, *fragments,
          inputs=[suspect])
    if name == "purify":
        pre = shutil.copytree(models.pre, tmp_path / "pre")
        shutil.copy(config, os.path.join(pre, "config.json"))
        fails(command(name, models, str(tmp_path / "out"), pretrained=str(pre)), capsys, fragments[1], inputs=[pre])


@pytest.mark.parametrize("name", ["purify", "hessian", "evaluate"])
def test_remote_code_is_refused_without_suggesting_it(models, tmp_path, capsys, name):
    suspect = copy_model(models, tmp_path, "suspect")
    marker = tmp_path / "ran"
    (suspect / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((suspect / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                               "AutoModelForSequenceClassification": "modeling_evil.Evil"})
    (suspect / "config.json").write_text(json.dumps(config))
    message = fails(command(name, models, str(tmp_path / "out"), suspect=str(suspect)), capsys,
                    "needs code shipped with it", "never runs a model's own code", inputs=[suspect])
    assert "trust_remote_code" not in message and not marker.exists()


def test_wrong_architecture_is_refused(models, tmp_path, capsys):
    suspect = copy_model(models, tmp_path, "suspect")
    config = json.loads((suspect / "config.json").read_text())
    (suspect / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    for name in ("purify", "evaluate"):  # never a randomly initialised model in place of the checkpoint's
        fails(command(name, models, str(tmp_path / "out"), suspect=str(suspect)), capsys,
              "the checkpoint lacks", "GPT2ForSequenceClassification", inputs=[suspect])


def test_pickle_only_directory_is_refused_never_unpickled(models, tmp_path, capsys):
    pickled = copy_model(models, tmp_path, "pickled")
    os.remove(pickled / "model.safetensors")
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Boom()}, pickled / "pytorch_model.bin")
    for name in MODEL_COMMANDS:
        fails(command(name, models, str(tmp_path / "out"), suspect=str(pickled)), capsys,
              "only safetensors checkpoints are read", inputs=[pickled])
    assert not marker.exists()


@pytest.mark.parametrize("name", ["purify", "hessian", "evaluate"])
def test_missing_tokenizer_is_refused(models, tmp_path, capsys, name):
    suspect = copy_model(models, tmp_path, "suspect")
    for f in os.listdir(suspect):
        if f.startswith(("tokenizer", "vocab", "special_tokens")):
            os.remove(suspect / f)
    fails(command(name, models, str(tmp_path / "out"), suspect=str(suspect)), capsys, str(suspect),
          "no tokenizer", inputs=[suspect])


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "chat_template.json"])
def test_a_damaged_tokenizer_file_is_named(models, tmp_path, capsys, name):
    suspect = copy_model(models, tmp_path, "suspect")
    (suspect / name).write_text('{"truncated": ')
    fails(command("evaluate", models, "unused", suspect=str(suspect)), capsys,
          f"{suspect / name}: not valid JSON (", "restore the tokenizer files saved with the model", inputs=[suspect])


@pytest.mark.parametrize("name", ["purify", "hessian", "evaluate"])
def test_a_classifiers_text_holding_a_token_without_an_embedding_row_is_refused(models, tmp_path, capsys, name,
                                                                                 monkeypatch):
    """A token added to a classifier's tokenizer without resizing its model passes the load check
    (no fed special token is past the embedding); a text holding it reached the embedding: an
    IndexError on the CPU, a device-side assert that leaves CUDA unusable on a GPU. Now refused
    before any work, naming the file and the example (it used to come from the batch, mid-run)."""
    from transformers import AutoTokenizer

    from finepurify_ext import pipeline

    suspect = copy_model(models, tmp_path, "suspect")
    tokenizer = AutoTokenizer.from_pretrained(suspect)
    tokenizer.add_tokens(["<cf>"])
    tokenizer.save_pretrained(suspect)
    data = tmp_path / "clean.jsonl"
    clean = Path(models.clean).read_text()
    data.write_text(clean + json.dumps({"text": "good movie <cf>", "label": 1}) + "\n" + clean)
    rows = json.loads((suspect / "config.json").read_text())["vocab_size"]
    number = clean.count("\n") + 1
    started = []  # no Hessian pass and no fine-tuning begins
    monkeypatch.setattr(pipeline, "clean_hessian", lambda *a, **k: started.append(1))
    fails(command(name, models, str(tmp_path / "out"), suspect=str(suspect), data=str(data)), capsys,
          f"{data}:{number}: the example holds the token '<cf>' (id {rows}), which the model's embedding of {rows} "
          "rows has no row for", "model.resize_token_embeddings(len(tokenizer))", inputs=[suspect, data])
    assert not started
    if name == "purify":  # the unlabelled texts, numbered as texts
        texts = tmp_path / "texts.txt"
        texts.write_text("fine\n\nnice <cf> film\n")
        fails(command(name, models, str(tmp_path / "out"), suspect=str(suspect)) + ["--distill", "0.5",
              "--unlabelled-data", str(texts)], capsys, f"{texts}:3: the text holds the token '<cf>'", inputs=[texts])
    if name == "evaluate":  # the trigger, before the clean pass
        fails(command(name, models, "unused", suspect=str(suspect)) + ["--trigger", "<cf>", "--target-label", "1"],
              capsys, "--trigger '<cf>' holds the token '<cf>'", inputs=[suspect])


def test_the_rowless_pre_pass_sees_every_id_and_lays_out_only_texts_that_can_hold_one(tmp_path):
    """A vocabulary with a gap has ids past the embedding though len(tokenizer) is within it (the
    pre-pass skipped it, and the refusal came from the batch); where only added tokens are past it
    (a Gemma image token), texts that do not hold one are not laid out (the data was tokenised twice)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from finepurify_ext.data import Example, RowlessToken, encode, refuse_rowless_data

    def word_level(vocab):
        model = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        model.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", pad_token="[PAD]")

    held = [Example("good movie", 1), Example("good movie", 0), Example("good film", 1), Example("a <cf> film", 1)]
    examples = held[:3]
    path = tmp_path / "data.jsonl"  # blank lines between the rows: line numbers are not example numbers
    path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n\n" for e in held))
    laid_out = []

    def ids_of(tokenizer):
        return lambda e: laid_out.append(e) or encode(tokenizer, [e.text], 64)

    gap = word_level({"[UNK]": 0, "[PAD]": 1, "good": 2, "movie": 3, "film": 9})
    gap.embedding_rows = len(gap)
    with pytest.raises(RowlessToken, match=f"{path}:5: the example holds the token 'film' \\(id 9\\)"):
        refuse_rowless_data(gap, examples, ids_of(gap), str(path), lambda e: [e.text])
    added = word_level({"[UNK]": 0, "[PAD]": 1, "good": 2, "movie": 3, "film": 4})
    added.embedding_rows = len(added)
    added.add_tokens(["<cf>"])
    laid_out.clear()
    refuse_rowless_data(added, examples, ids_of(added), str(path), lambda e: [e.text])
    assert laid_out == examples[:1]  # the first (what the tokenizer adds to every text), no other
    with pytest.raises(RowlessToken, match=f"{path}:7: the example holds the token '<cf>'"):
        refuse_rowless_data(added, held, ids_of(added), str(path), lambda e: [e.text])


def test_a_vocabulary_grown_and_resized_after_loading_is_fed(models):
    """The loaders record the embedding's rows on the tokenizer, from the files. A caller who then
    added a token and resized the model (an attack, a chat token) had every text holding it refused
    as rowless by that stale record (bench/added_token_trigger.py stopped on it). The record
    stands aside once the vocabulary changed; as loaded, it still refuses."""
    from finepurify_ext.data import Example, RowlessToken, batches

    model, tokenizer, _ = pipeline.load_classifier(models.suspect)
    texts = [Example("good <cf> movie", 1)]
    tokenizer.embedding_rows = tokenizer.convert_tokens_to_ids("movie")  # as if the files' model had fewer
    with pytest.raises(RowlessToken, match="which the model's embedding of [0-9]+ rows has no row for"):
        next(batches(tokenizer, texts, 8))
    model, tokenizer, _ = pipeline.load_classifier(models.suspect)
    assert tokenizer.add_tokens(["<cf>"]) == 1
    model.resize_token_embeddings(len(tokenizer))
    batch = next(batches(tokenizer, texts, 8))
    assert len(tokenizer) - 1 in batch["input_ids"][0].tolist()
    model(**{k: v for k, v in batch.items() if k != "labels"})  # the grown row is read


def refuse_opening(monkeypatch, file: str) -> None:
    """The pipeline's open() refuses ``file`` as a permission would (root reads any file, so the
    refusal is made here)."""
    def refusing(name, *args, **kwargs):
        if str(name) == file:
            raise PermissionError(13, "Permission denied", name)
        return open(name, *args, **kwargs)

    monkeypatch.setattr(pipeline, "open", refusing, raising=False)


def test_an_unreadable_tokenizer_file_is_not_called_invalid(models, tmp_path, capsys, monkeypatch):
    """A tokenizer file that cannot be opened (permissions: root reads any file, so the refusal is
    made here) was reported as not valid JSON."""
    suspect = copy_model(models, tmp_path, "suspect")
    unreadable = str(suspect / "tokenizer_config.json")
    refuse_opening(monkeypatch, unreadable)
    fails(command("evaluate", models, "unused", suspect=str(suspect)), capsys,
          f"{unreadable}: cannot be read (Permission denied); check its permissions", inputs=[suspect])


def test_an_unlistable_model_directory_is_not_called_empty(models, tmp_path, capsys, monkeypatch):
    """A model directory that cannot be listed (mode 000; root lists any, so the refusal is made
    here) was reported as having no config.json; a config.json that cannot be opened likewise."""
    suspect = copy_model(models, tmp_path, "suspect")
    listdir = os.listdir

    def refusing(path="."):
        if os.path.abspath(path) == str(suspect):
            raise PermissionError(13, "Permission denied", path)
        return listdir(path)

    with monkeypatch.context() as patched:
        patched.setattr(os, "listdir", refusing)
        for name in MODEL_COMMANDS:
            fails(command(name, models, str(tmp_path / "out"), suspect=str(suspect)), capsys, str(suspect),
                  "Permission denied", "check its permissions", inputs=[suspect])
    config = str(suspect / "config.json")
    refuse_opening(monkeypatch, config)
    fails(command("evaluate", models, "unused", suspect=str(suspect)), capsys,
          f"{config}: cannot be read (Permission denied); check its permissions", inputs=[suspect])


def test_pretrained_model_needs_no_tokenizer(models, tmp_path):
    pre = shutil.copytree(models.pre, tmp_path / "pre")
    for f in os.listdir(pre):
        if f.startswith(("tokenizer", "vocab", "special_tokens")):
            os.remove(pre / f)
    assert cli.main(command("purify", models, str(tmp_path / "out"), pretrained=str(pre))) == 0


def test_missing_paths(models, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    for name in MODEL_COMMANDS:
        fails(command(name, models, str(tmp_path / "out"), suspect=missing), capsys, missing, "does not exist")
    fails(command("purify", models, str(tmp_path / "out"), suspect=models.clean), capsys,
          "is a file; give the model's directory")
    for name in ("purify", "hessian", "evaluate"):
        fails(command(name, models, str(tmp_path / "out"), data=missing + ".csv"), capsys, "nope.csv' does not exist")
    # a folder given as --hessian-file: the file `hessian` writes is asked for (not a pickle's conversion)
    folder = tmp_path / "h.safetensors"
    folder.mkdir()
    args = command("purify-out-of-core", models, str(tmp_path / "out"))
    args[args.index("--hessian-file") + 1] = str(folder)
    fails(args, capsys, f"--hessian-file '{folder}' is a directory without a .safetensors file; give the file "
          "`finepurify hessian --out` wrote")


# ------------------------------------------------------------------------------ data files


@pytest.mark.parametrize("name", ["purify", "hessian", "evaluate"])
def test_data_not_utf8(models, tmp_path, capsys, name):
    path = tmp_path / "clean.csv"
    path.write_bytes("text,label\ngood movie,1\ncafé crème,0\n".encode("latin-1"))
    fails(command(name, models, str(tmp_path / "out"), data=str(path)), capsys, f"{path}:3: not UTF-8 text",
          "save the file as UTF-8", inputs=[path])


@pytest.mark.parametrize("content, fragment", [
    ('{"text": "good", "label": 1}\n{"text": "bad" "label": 0}\n', "clean.jsonl:2: not a JSON object"),
    ('{"text": "good", "label": 1}\n[1, 2]\n', "clean.jsonl:2: a JSON list, not an object; write one object per "
     "line (JSON Lines)"),
    ('[\n  {"text": "good", "label": 1}\n]\n', "clean.jsonl:1: not a JSON object (the file is a JSON array); write "
     "one object per line (JSON Lines)"),
    ('{"text": "good", "label": 1.5}\n', "clean.jsonl:1: label 1.5 is not an integer"),
    ('{"text": null, "label": 1}\n', "clean.jsonl:1: text is None; it must be a string"),
    ('{"text": "good", "label": 2}\n', "clean.jsonl:1: label 2, out of range for a model with 2 labels"),
    ("", "no examples"),
])
def test_data_jsonl_errors_name_the_line(models, tmp_path, capsys, content, fragment):
    path = tmp_path / "clean.jsonl"
    path.write_text(content)
    for name in ("purify", "hessian", "evaluate"):
        fails(command(name, models, str(tmp_path / "out"), data=str(path)), capsys, fragment, inputs=[path])


@pytest.mark.parametrize("content, fragment", [
    ("text,label\ngood, fine movie,1\n", "clean.csv:2: 3 fields but the header has 2"),
    # the header's fault, on its line (it was put on the first row's)
    ("text\ngood movie\n", "clean.csv:1: the header names no 'label' column (it names ['text']); the first line "
     "names the columns: text, label"),
    ('"te\nxt",label\ngood movie,1\n', "clean.csv:2: the header names no 'text' column"),  # a header of two lines
    ("text,label\ngood movie,one\n", "clean.csv:2: label 'one' is not an integer"),
    ("text,label\ngood movie\n", "clean.csv:2: 1 fields but the header has 2"),
    ("text,label\ngood movie,1_0\n", "label '1_0' is not an integer"),
    ("text,label\ngood movie,\n", "label '' is not an integer"),
])
def test_data_csv_errors_name_the_line(models, tmp_path, capsys, content, fragment):
    path = tmp_path / "clean.csv"
    path.write_text(content)
    fails(command("purify", models, str(tmp_path / "out"), data=str(path)), capsys, fragment, inputs=[path])


def test_data_with_a_byte_order_mark_is_read(models, tmp_path):
    path = tmp_path / "clean.csv"
    path.write_text("\ufefftext,label\ngood movie,1\nbad day,0\n", encoding="utf-8")
    assert cli.main(command("evaluate", models, "unused", data=str(path))) == 0


# ------------------------------------------------------------------------------ output paths


OUT_COMMANDS = ["purify", "purify-out-of-core", "hessian", "demo"]


@pytest.fixture()
def nothing_expensive(monkeypatch):
    """Output paths are checked before any model is loaded or any demo runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("expensive work started before the output path was checked")
    monkeypatch.setattr(pipeline, "load_classifier", refuse)
    monkeypatch.setattr("finepurify_ext.checkpoint.purify_checkpoint", refuse)
    monkeypatch.setattr("finepurify_ext.demo.run_demo", refuse)


@pytest.mark.parametrize("name", OUT_COMMANDS)
def test_out_is_an_existing_file(models, tmp_path, capsys, nothing_expensive, name):
    out = tmp_path / "taken"
    out.write_text("mine")
    fails(command(name, models, str(out)), capsys, str(out),
          "exists; choose another --out" if name == "hessian" else "is an existing file", inputs=[out])
    below = str(out / "sub" / "result")
    fails(command(name, models, below), capsys, f"{out} is a file, so nothing can be written below it", inputs=[out])


@pytest.mark.parametrize("name", OUT_COMMANDS)
def test_out_in_an_unwritable_directory(models, tmp_path, capsys, monkeypatch, nothing_expensive, name):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: make the directory refuse as a read-only one would
        real_mkdtemp = tempfile.mkdtemp

        def read_only(*args, dir=None, **kwargs):
            if dir is not None and os.path.abspath(dir).startswith(str(locked)):
                raise PermissionError(13, "Permission denied", dir)
            return real_mkdtemp(*args, dir=dir, **kwargs)
        monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    try:
        fails(command(name, models, str(locked / "new" / "out")), capsys, f"cannot write in {locked}",
              "Permission denied", "choose a path where you can write")
    finally:
        locked.chmod(0o700)


def test_hessian_out_is_a_directory(models, tmp_path, capsys, nothing_expensive):
    fails(command("hessian", models, str(tmp_path)), capsys, f"{tmp_path} is a directory; the output is a file")


@pytest.mark.parametrize("name", ["h.bin", "h.pt", "H.PTH"])
def test_a_hessian_is_not_named_as_a_pickle(models, tmp_path, capsys, name):
    """A Hessian saved as h.bin reads as a pickle (pytorch_model.bin) to whoever finds it."""
    fails(command("hessian", models, str(tmp_path / name)), capsys, f"--out {tmp_path / name}: a Hessian is a "
          "safetensors file, not a pickle as that name says; give a name ending in .safetensors")


def test_existing_outputs_are_kept(models, tmp_path, capsys, nothing_expensive):
    out = tmp_path / "done.safetensors"
    out.write_text("an earlier result")
    fails(command("hessian", models, str(out)), capsys, "exists; choose another --out or pass --overwrite",
          inputs=[out])
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    for name in ("purify", "purify-out-of-core"):
        fails(command(name, models, str(full)), capsys, "exists and is not empty", inputs=[full])
    fails(command("demo", models, str(full)), capsys, "holds files finepurify did not write (it has no report.json)",
          inputs=[full])


# ------------------------------------------------------------------------------ options


@pytest.mark.parametrize("name, option, value, fragment", [
    ("hessian", "--batch-size", "0", "must be at least 1, got 0"),
    ("hessian", "--save-every", "0", "must be at least 1, got 0"),
    ("hessian", "--batch-size", "eight", "expected an integer, got 'eight'"),
    ("purify", "--finetune-steps", "-1", "must be at least 0"),
    ("purify", "--eval-every", "0", "must be at least 1"),
    ("purify", "--patience", "0", "must be at least 1"),
    ("purify", "--seed", "-1", "must be at least 0"),  # a negative seed made Fine-mixing the magnitude ranking
    ("purify", "--lr", "0", "must be in (0, 1]"),
    ("purify", "--eps", "nan", "must be in [1.4e-45, 3e+38]"),
    ("purify", "--eps", "-1e-8", "must be in [1.4e-45, 3e+38]"),
    ("purify", "--eps", "1e-50", "must be in [1.4e-45, 3e+38]"),  # 0 in float32: failed in the op, late
    ("purify", "--validation-fraction", "1", "must be in [0, 1)"),
    ("purify", "--cacc-tolerance", "-0.1", "must be in [0, 1]"),
    ("purify", "--reserve-ratio", "1.5", "the reserve ratio is the fraction kept, in [0, 1]; got 1.5"),
    ("purify", "--rho-grid", "0.5,2", "reserve ratios are fractions kept, in [0, 1]"),
    ("purify-out-of-core", "--num-reset", "-3", "must be at least 0"),
    ("evaluate", "--target-label", "-1", "must be at least 0"),
])
def test_bad_option_values(models, tmp_path, capsys, name, option, value, fragment):
    with pytest.raises(SystemExit) as exit_:
        cli.main(command(name, models, str(tmp_path / "out")) + [f"{option}={value}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {fragment}" in err and "Traceback" not in err
    # One line, as every other error: argparse's usage summary (twenty lines) is left to --help.
    assert err.count("\n") == 1 and "usage:" not in err and err.endswith(f" --help`)\n"), err


@pytest.mark.parametrize("args, said", [
    (["purify", "--pretrained", "a", "--suspect", "b", "--out", "c", "--bogus", "1"],
     "finepurify purify: error: unrecognized arguments: --bogus 1 (see `finepurify purify --help`)"),
    (["hessian", "--model", "a"], "finepurify hessian: error: the following arguments are required: --clean-data, "
     "--out (see `finepurify hessian --help`)"),
    (["purify-it"], "finepurify: error: argument command: invalid choice: 'purify-it'"),
    # given before the command: finepurify's (it was said to be evaluate's)
    (["--bogus", "evaluate", "--model", "a", "--data", "b"], "finepurify: error: unrecognized arguments: --bogus "
     "(see `finepurify --help`)"),
])
def test_option_errors_are_one_line(capsys, args, said):
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(said) and err.count("\n") == 1 and "usage:" not in err, err


@pytest.mark.parametrize("name, extra, fragment", [
    ("purify", ["--num-reset", "10"], "--num-reset works with --hessian-file only"),
    ("purify", ["--unlabelled-data", "texts.txt"], "--unlabelled-data is read only for the teacher's soft targets"),
    ("purify", ["--reserve-ratio", "auto", "--validation-fraction", "0"], "--reserve-ratio auto needs held-out"),
    ("purify-out-of-core", ["--reserve-ratio", "auto"], "--reserve-ratio auto needs the clean data"),
    ("purify-out-of-core", ["--num-reset", "10000000"], "the reset count 10000000 is out of range"),
    ("evaluate", ["--bias"], "--bias measures the flip rate when --trigger"),
    ("evaluate", ["--trigger", "cf", "--target-label", "2"], "--target-label 2 is out of range for a model with 2"),
    # Options this run would not read are refused, not ignored: the user believes in a setting not applied.
    ("purify-out-of-core", ["--lr", "1e-4"], "--lr is not used with --hessian-file (out of core: the Hessian is "
     "given and there is no clean fine-tuning; fine-tune the purified checkpoint afterwards): leave it out"),
    ("purify-out-of-core", ["--lr", "1e-4", "--clean-data", "clean.csv"], "--clean-data, --lr are not used with "
     "--hessian-file"),
    ("purify-out-of-core", ["--num-reset", "10", "--reserve-ratio", "0.5"],
     "--reserve-ratio is not used with --num-reset, which sets the count"),
    ("purify", ["--rho-grid", "0.2,0.4"], "--rho-grid is not used without --reserve-ratio auto: leave it out"),
    ("purify", ["--rho=0.2,0.4"], "--rho-grid is not used without --reserve-ratio auto"),  # an abbreviation
    ("purify", ["--cacc-tolerance", "0.05"], "--cacc-tolerance is not used without --reserve-ratio auto"),
    ("purify", ["--reserve-ratio", "auto", "--collapse-tolerance", "0.1"],
     "--collapse-tolerance is not used with --reserve-ratio auto"),
    ("purify", ["--validation-fraction", "0", "--patience", "5", "--eval-every", "2"], "--eval-every, --patience "
     "are not used with --validation-fraction 0 (no held-out data: no early stopping, no collapse guard)"),
    ("purify", ["--validation-fraction", "0", "--collapse-tolerance", "0.1"],
     "--collapse-tolerance is not used with --validation-fraction 0"),
    ("purify", ["--max-length", "32"], "--max-length is not used for a classifier (the causal LMs' setting; a "
     "classifier's examples are cut at 64 tokens)"),
    ("hessian", ["--max-length", "32"], "--max-length is not used for a classifier"),
    ("evaluate", ["--target-label", "0"], "--target-label is not used without --trigger (it is the attack's target)"),
    ("evaluate", ["--target-response", "no"], "--target-response is not used for a classifier (a causal LM's "
     "backdoor target)"),
    ("evaluate", ["--trigger", "cf", "--bias", "--target-label", "0"], "--target-label is not used with --bias"),
    ("purify", ["--ranking", "magnitude", "--eps", "0.5"], "--eps is not used by --ranking magnitude, which divides "
     "by no Hessian"),
    ("purify-out-of-core", ["--ranking", "fine_mixing", "--eps", "0.5"], "--eps is not used by --ranking fine_mixing"),
    ("purify-out-of-core", ["--seed", "3"], "--seed is not used out of core but by --ranking fine_mixing"),
    ("purify", ["--collapse-perplexity-ratio", "3"], "--collapse-perplexity-ratio is not used for a classifier: its "
     "collapse guard reads --collapse-tolerance"),
    ("demo", ["--llm", "--attack", "sentence"], "--attack is not used with --llm (the LLM demo plants its own "
     "backdoor"),
    ("purify", ["--finetune-steps", "0", "--lr", "1e-4", "--patience", "2"], "--lr, --patience are not used with "
     "--finetune-steps 0 (no clean fine-tuning): leave them out"),
    ("purify", ["--reserve-ratio", "1", "--ranking", "magnitude", "--hessian", "per-sample", "--collapse-tolerance",
                "0.1"], "--ranking, --hessian, --collapse-tolerance are not used with --reserve-ratio 1, which keeps "
     "every weight (no reset): leave them out"),
    ("purify-out-of-core", ["--reserve-ratio", "1", "--eps", "1e-6"], "--eps is not used with --reserve-ratio 1"),
    ("purify", ["--reserve-ratio", "1.0", "--literal"], "--literal is not used with --reserve-ratio 1"),
    ("purify", ["--reserve-ratio", "1", "--added-tokens", "keep"], "--added-tokens is not used with --reserve-ratio 1"),
    ("purify-out-of-core", ["--literal", "--added-tokens", "mean"], "--added-tokens is not used with --literal (the "
     "word embedding is ranked with the rest: no rule of its own for its rows)"),
])
def test_option_combinations(models, tmp_path, capsys, name, extra, fragment):
    fails(command(name, models, str(tmp_path / "out")) + extra, capsys, fragment)


def test_turning_a_guard_off_is_not_an_unused_option(models, tmp_path):
    """Without held-out data there is no collapse guard: asking for none (1) is not refused."""
    assert cli.main(command("purify", models, str(tmp_path / "out")) + ["--validation-fraction", "0",
                                                                        "--collapse-tolerance", "1"]) == 0
    # nor out of core, nor the other model kind's guard turned off (a script that always turns both off)
    off = ["--collapse-tolerance", "1", "--collapse-perplexity-ratio", "inf"]
    assert cli.main(command("purify-out-of-core", models, str(tmp_path / "ooc")) + off) == 0
    assert cli.main(command("purify", models, str(tmp_path / "mem")) + off + ["--finetune-steps", "0"]) == 0


# ------------------------------------------------------------------------------ the error path


def test_debug_shows_the_traceback(models, tmp_path):
    with pytest.raises(pipeline.ModelError, match="does not exist"):
        cli.main(command("evaluate", models, "unused", suspect=str(tmp_path / "nope")) + ["--debug"])


def test_a_failure_while_running_exits_1(models, tmp_path, capsys, monkeypatch):
    def diverge(*args, **kwargs):
        raise RuntimeError("the loss diverged\nsecond line of detail")
    monkeypatch.setattr(pipeline, "fine_purify", diverge)
    message = fails(command("purify", models, str(tmp_path / "out")), capsys,
                    "failed with RuntimeError: the loss diverged (--debug shows the traceback)", code=1,
                    inputs=[models.suspect, models.pre])
    assert "second line" not in message


def test_interrupt_exits_130(models, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "clean_hessian", interrupt)
    assert cli.main(command("hessian", models, str(tmp_path / "h.safetensors"))) == 130
    assert "interrupted; run it again to resume from the last save" in capsys.readouterr().err


def test_an_interrupt_after_the_output_moved_in_names_it(models, tmp_path, capsys, monkeypatch):
    """--overwrite, stopped while the output replaced is being deleted: the new output is complete and
    the message says so (not "no output was written")."""
    from finepurify_ext import outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier").write_text("x")
    (out / "finepurify_report.json").write_text("{}")  # an earlier run's output
    rmtree = outputs.shutil.rmtree

    def interrupted(path, *args, **kwargs):
        if ".old-" in str(path):
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)
    monkeypatch.setattr(outputs.shutil, "rmtree", interrupted)
    assert cli.main(command("purify", models, str(out)) + ["--overwrite"]) == 130
    err = capsys.readouterr().err
    assert err.endswith(f"finepurify purify: interrupted; the output {out} is complete; what is left of the one it "
                        "replaced goes at the next write\n"), err
    assert "model.safetensors" in os.listdir(out) and "earlier" not in os.listdir(out)


def test_sigterm_ends_a_command_as_ctrl_c_does(models, tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM while the purified model is being written: exit 143, one line, no partial
    output left (the default action would have killed the process in place); a second SIGTERM during
    the cleanup is ignored; the previous handler is back afterwards. On hessian, the running sums stay."""
    import signal
    import time

    writer = cli._purified_writer

    def terminated_while_writing(*args):
        write = writer(*args)

        def then_sigterm(tmp):
            write(tmp)
            assert os.listdir(tmp)  # the partial output is there
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises first
        return then_sigterm

    monkeypatch.setattr(cli, "_purified_writer", terminated_while_writing)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    assert cli.main(command("purify", models, str(out))) == 143
    err = capsys.readouterr().err
    assert err.endswith("finepurify purify: terminated (SIGTERM); no output was written\n") and "Traceback" not in err
    assert os.listdir(tmp_path) == [] and signal.getsignal(signal.SIGTERM) == before

    batches = pipeline.batches

    def sigterm_after_two(*args, **kwargs):  # the scheduler's SIGTERM as the third batch is read
        for i, batch in enumerate(batches(*args, **kwargs)):
            if i == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            yield batch
    monkeypatch.setattr(pipeline, "batches", sigterm_after_two)
    hessian = str(tmp_path / "h.safetensors")
    assert cli.main(command("hessian", models, hessian) + ["--batch-size", "4"]) == 143
    assert "terminated (SIGTERM); run it again to resume from the last save" in capsys.readouterr().err
    from safetensors import safe_open
    with safe_open(hessian + ".accumulator.safetensors", framework="pt") as f:  # the two batches done are kept
        assert f.metadata()["batches_done"] == "2"
    assert sorted(os.listdir(tmp_path)) == ["h.safetensors.accumulator.safetensors"]


def test_installed_command_prints_no_traceback(models, tmp_path):
    """The real entry point in a fresh process (a NaN weight: once the worst case, a crash)."""
    suspect = copy_model(models, tmp_path, "suspect")
    path = os.path.join(suspect, "model.safetensors")
    state = load_file(path)
    state[SCORED][0, 0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    run = subprocess.run([sys.executable, "-m", "finepurify_ext.cli"] + command("purify", models, str(tmp_path / "out"),
                                                                               suspect=str(suspect)),
                         capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"finepurify purify: error: {path}: parameter '{SCORED}' holds 1 NaN or Inf value; the checkpoint is "
        "damaged: re-export it from a good copy")


# ------------------------------------------------------------------------------ found in review


@pytest.mark.parametrize("name", OUT_COMMANDS)
def test_out_never_replaces_an_input_or_the_working_directory(models, tmp_path, capsys, monkeypatch, name):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    fails(command(name, models, "") + ["--overwrite"] * (name != "demo"), capsys, "--out is empty")
    fails(command(name, models, ".") + ["--overwrite"] * (name != "demo"), capsys,
          "is or holds the working directory, which the output would replace", inputs=[work])
    if name != "demo":
        inputs = {"purify": models.suspect, "purify-out-of-core": models.hessian, "hessian": models.clean}[name]
        fails(command(name, models, inputs) + ["--overwrite"], capsys, f"is or holds the input {inputs}",
              inputs=[models.suspect, models.pre, models.clean, models.hessian])
        fails(command(name, models, os.path.dirname(inputs)) + ["--overwrite"], capsys, "is or holds the input",
              inputs=[models.suspect, models.pre, models.clean, models.hessian])


@pytest.mark.parametrize("name", OUT_COMMANDS)
def test_overwrite_replaces_only_what_finepurify_wrote(models, tmp_path, capsys, monkeypatch, name):
    """--overwrite deletes --out whole: a directory (or file) holding a person's files, their home
    directory or above it is refused up front, and left as it was; an output of the command itself
    is replaced."""
    home = tmp_path / "home"
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "chapter1.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    overwrite = ["--overwrite"] * (name != "demo")
    fails(command(name, models, str(home)) + overwrite, capsys, f"is or holds your home directory, which the output "
          "would replace", inputs=[home])
    fails(command(name, models, str(tmp_path)) + overwrite, capsys, "is or holds your home directory")
    if name == "hessian":
        fails(command(name, models, str(home / "thesis" / "chapter1.txt")) + overwrite, capsys,
              "chapter1.txt is not a Hessian finepurify wrote, and --overwrite replaces only those: choose a new path",
              inputs=[home])
        out = str(tmp_path / "h.safetensors")
        assert cli.main(command(name, models, out)) == 0
        assert cli.main(command(name, models, out) + overwrite) == 0  # its own output: replaced
        return
    marker = "report.json" if name == "demo" else "finepurify_report.json"
    fails(command(name, models, str(home / "thesis")) + overwrite, capsys,
          f"thesis holds files finepurify did not write (it has no {marker}), which the output would replace: "
          "choose a new path, or empty it yourself", inputs=[home])
    if name == "demo":
        return
    out = tmp_path / "out"
    assert cli.main(command(name, models, str(out))) == 0
    assert cli.main(command(name, models, str(out)) + overwrite) == 0  # its own output: replaced


@pytest.mark.parametrize("name", ["purify", "purify-out-of-core"])
def test_the_purified_copy_takes_no_code_nor_unpurified_weights_from_the_suspect(models, tmp_path, capsys, name):
    """A suspect shipping code (modeling_*.py named by auto_map, trust_remote_code set) and weights in
    other formats beside its safetensors: no code runs, and the purified copy holds only its weights,
    config and tokenizer files, its configs without the pointers to code; the report and a note say
    what was left out, in memory as out of core."""
    suspect = copy_model(models, tmp_path, "shipping")
    ran = tmp_path / "ran"
    (suspect / "modeling_evil.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    for extra in ("tf_model.h5", "model.onnx", "model.gguf", "optimizer.pickle"):
        (suspect / extra).write_bytes(b"not purified")
    for config_file, auto_map in (("config.json", {"AutoModelForSequenceClassification": "modeling_evil.Evil"}),
                                  ("tokenizer_config.json", {"AutoTokenizer": ["tokenization_evil.Evil", None]})):
        config = json.loads((suspect / config_file).read_text())
        config.update(auto_map=auto_map, trust_remote_code=True)
        (suspect / config_file).write_text(json.dumps(config))
    out = tmp_path / "out"
    assert cli.main(command(name, models, str(out), suspect=str(suspect))) == 0
    err = capsys.readouterr().err
    assert not ran.exists()
    assert not {"modeling_evil.py", "tf_model.h5", "model.onnx", "model.gguf", "optimizer.pickle"} & set(os.listdir(out))
    for config_file in ("config.json", "tokenizer_config.json"):
        config = json.loads((out / config_file).read_text())
        assert "auto_map" not in config and "trust_remote_code" not in config, config_file
    report = json.loads((out / "finepurify_report.json").read_text())
    assert {"config.json: auto_map", "config.json: trust_remote_code",  # transformers' tokenizer drops the last
            "tokenizer_config.json: auto_map"} <= set(report["config_keys_removed"])
    assert "note: removed from the purified copy's config: config.json: auto_map" in err
    # in memory too (it was silent there): the same list and note
    assert report["not_copied"] == ["model.gguf", "model.onnx", "modeling_evil.py", "optimizer.pickle", "tf_model.h5"]
    assert "note: not copied from the suspect: model.gguf, model.onnx" in err


def test_hessian_out_ending_in_a_separator(models, tmp_path, capsys, nothing_expensive):
    fails(command("hessian", models, str(tmp_path / "h.safetensors") + "/"), capsys, "is a directory")


@pytest.mark.parametrize("name", ["purify", "hessian", "evaluate"])
def test_config_with_fewer_layers_than_the_weights(models, tmp_path, capsys, name):
    suspect = copy_model(models, tmp_path, "suspect")
    config = json.loads((suspect / "config.json").read_text())
    (suspect / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    fails(command(name, models, str(tmp_path / "out"), suspect=str(suspect)), capsys,
          "the checkpoint holds 16 weights the config's model has no place for", "bert.encoder.layer.1.",
          inputs=[suspect])
    if name == "purify":
        pre = shutil.copytree(models.pre, tmp_path / "pre")
        config = json.loads((pre / "config.json").read_text())
        (pre / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
        fails(command(name, models, str(tmp_path / "out"), pretrained=str(pre)), capsys, "'encoder.layer.1.",
              inputs=[pre])


@pytest.mark.parametrize("change, fragment", [
    ({"intermediate_size": 4_000_000}, "'bert.encoder.layer.0.intermediate.dense.weight' is [64, 32] in the checkpoint "
                                       "but [4000000, 32] by the config"),
    ({"num_hidden_layers": 300}, "config.json describes a model of"),
])
def test_a_config_larger_than_its_weights_is_refused_before_the_model_is_built(models, tmp_path, capsys, monkeypatch,
                                                                               change, fragment):
    """An untrusted config naming sizes its weights do not have made transformers build that model
    (GBs here, against a 100 KB checkpoint) before the shapes were compared: now the config is held
    against the checkpoint's headers first, on the meta device."""
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", never)
    suspect = copy_model(models, tmp_path, "suspect")
    config = json.loads((suspect / "config.json").read_text())
    (suspect / "config.json").write_text(json.dumps({**config, **change}))
    for name in ("hessian", "evaluate"):
        fails(command(name, models, str(tmp_path / "out"), suspect=str(suspect)), capsys, str(suspect), fragment,
              "restore the model's config.json", inputs=[suspect])


@pytest.mark.parametrize("field, value, fragment", [
    ("model_type", ["bert"], "model_type ['bert'] is not an architecture"),
    ("num_labels", 0, "num_labels is 0; a classifier has at least 2 labels"),
    ("hidden_size", "big", "expected int, got str"),
])
def test_config_values_of_the_wrong_kind(models, tmp_path, capsys, field, value, fragment):
    suspect = copy_model(models, tmp_path, "suspect")
    config = json.loads((suspect / "config.json").read_text())
    config.pop("id2label", None), config.pop("label2id", None)
    (suspect / "config.json").write_text(json.dumps({**config, field: value}))
    for name in ("purify", "hessian", "evaluate"):
        fails(command(name, models, str(tmp_path / "out"), suspect=str(suspect)), capsys,
              str(suspect / "config.json"), fragment, inputs=[suspect])


def test_index_of_the_wrong_kind(models, tmp_path, capsys):
    for weight_map in ([1], {"a": 5}, {"a": "../elsewhere.safetensors"}):
        suspect = copy_model(models, tmp_path, f"suspect{len(os.listdir(tmp_path))}")
        os.rename(suspect / "model.safetensors", suspect / "model-00001-of-00001.safetensors")
        (suspect / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        for name in MODEL_COMMANDS:
            fails(command(name, models, str(tmp_path / "out"), suspect=str(suspect)), capsys,
                  "its weight_map must map tensor names to .safetensors files", inputs=[suspect])


def test_the_file_transformers_reads_is_the_one_checked(models, tmp_path, capsys):
    """With both model.safetensors and an index, transformers reads model.safetensors."""
    suspect = copy_model(models, tmp_path, "suspect")
    state = load_file(suspect / "model.safetensors")
    save_file(state, suspect / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    (suspect / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "model-00001-of-00001.safetensors" for n in state}}))
    state[SCORED][0, 0] = float("nan")
    save_file(state, suspect / "model.safetensors", metadata={"format": "pt"})
    fails(command("evaluate", models, "unused", suspect=str(suspect)), capsys,
          f"{suspect / 'model.safetensors'}: parameter '{SCORED}'")


def _hessian_with(models, tmp_path, change):
    state = load_file(models.hessian)
    change(state)
    path = tmp_path / "bad_hessian.safetensors"
    save_file(state, path, metadata={"format": "finepurify-hessian-v1"})
    return path


@pytest.mark.parametrize("ranking", ["fine_purifying", "no_hessian"])  # magnitude and fine_mixing never read it
def test_out_of_core_hessian_is_checked_and_named(models, tmp_path, capsys, ranking):
    args = command("purify-out-of-core", models, str(tmp_path / "out")) + ["--ranking", ranking]
    where = args.index("--hessian-file") + 1

    def nan(state):
        state[SCORED][0, 0] = float("nan")

    def negative(state):
        state[SCORED][1, 2] = -1.0

    for change, fragment in ((nan, "holds 1 NaN or Inf value"), (negative, "has negative values")):
        args[where] = str(_hessian_with(models, tmp_path, change))
        fails(args, capsys, f"the Hessian {args[where]}: tensor '{SCORED}' {fragment}", inputs=[args[where]])
    args[where] = os.path.join(models.suspect, "model.safetensors")  # weights are not a Hessian
    fails(args, capsys, "is not a Hessian saved by `finepurify hessian` (its format is 'pt')")


@pytest.mark.parametrize("extra", [["--num-reset", "0"], ["--reserve-ratio", "1"], []])
@pytest.mark.parametrize("tensor", [SCORED, "classifier.weight"])
def test_out_of_core_never_writes_non_finite_weights(models, tmp_path, capsys, extra, tensor):
    suspect = copy_model(models, tmp_path, "suspect")
    path = os.path.join(suspect, "model.safetensors")
    state = load_file(path)
    state[tensor][0, 0] = float("inf")
    save_file(state, path, metadata={"format": "pt"})
    fails(command("purify-out-of-core", models, str(tmp_path / "out"), suspect=str(suspect)) + extra, capsys,
          path, f"tensor '{tensor}'", "NaN or Inf", inputs=[suspect])


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_quantized_models_are_refused_not_copied_through(models, tmp_path, capsys, name):
    """A quantized checkpoint (its config says so; or, without one, a tensor only quantized
    checkpoints hold, or a float8 one) is refused before anything is read: out of core its packed
    layers were copied through unscored, in memory transformers asked for the quantizer's package."""
    config_flagged = copy_model(models, tmp_path, "gptq")
    config = json.loads((config_flagged / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (config_flagged / "config.json").write_text(json.dumps(config))
    packed, float8 = copy_model(models, tmp_path, "packed"), copy_model(models, tmp_path, "float8")
    state = load_file(packed / "model.safetensors")
    state[SCORED.replace(".weight", ".qweight")] = torch.randint(0, 1 << 30, (4, 32), dtype=torch.int32)
    del state[SCORED]
    save_file(state, packed / "model.safetensors", metadata={"format": "pt"})
    state = load_file(float8 / "model.safetensors")
    state[SCORED] = state[SCORED].to(torch.float8_e4m3fn)
    save_file(state, float8 / "model.safetensors", metadata={"format": "pt"})
    cases = [(config_flagged, f"{config_flagged / 'config.json'}: the model is quantized (gptq)"),
             (packed, f"tensor '{SCORED.replace('.weight', '.qweight')}' belongs to a quantized checkpoint"),
             (float8, f"tensor '{SCORED}' is stored as F8_E4M3, a quantized format")]
    for suspect, fragment in cases:
        fails(command(name, models, str(tmp_path / "out"), suspect=str(suspect)), capsys, fragment,
              "give the model from before quantization", inputs=[suspect])
        if name.startswith("purify"):  # a quantized pre-trained model is no reference either
            fails(command(name, models, str(tmp_path / "out"), pretrained=str(suspect)), capsys, fragment,
                  inputs=[suspect])


def test_data_extensions_any_case_and_long_texts(models, tmp_path):
    upper = tmp_path / "clean.JSONL"
    shutil.copy(models.clean, upper)
    assert cli.main(command("evaluate", models, "unused", data=str(upper))) == 0
    long = tmp_path / "long.csv"
    long.write_text("text,label\n" + "good " * 40000 + ",1\nbad day,0\n")
    assert cli.main(command("evaluate", models, "unused", data=str(long))) == 0


def test_unlabelled_data_errors(models, tmp_path, capsys):
    args = command("purify", models, str(tmp_path / "out")) + ["--distill", "0.5", "--unlabelled-data"]
    fails(args + [str(tmp_path / "none.txt")], capsys, "unlabelled data file", "none.txt' does not exist")
    latin = tmp_path / "texts.txt"
    latin.write_bytes("good day\ncafé\n".encode("latin-1"))
    fails(args + [str(latin)], capsys, f"{latin}:2: not UTF-8 text", inputs=[latin])
    rows = tmp_path / "texts.jsonl"
    rows.write_text('{"text": "good day"}\n{"label": 1}\n')
    fails(args + [str(rows)], capsys, f"{rows}:2: no 'text' field holding a string", inputs=[rows])
    table = tmp_path / "texts.csv"
    table.write_text("sentence\ngood day\n")
    fails(args + [str(table)], capsys, f"{table}:1: the header names no 'text' column", inputs=[table])


def test_attack_success_rate_needs_examples_of_other_labels(models, tmp_path, capsys):
    path = tmp_path / "positive.jsonl"
    path.write_text('{"text": "good day", "label": 1}\n{"text": "great film", "label": 1}\n')
    fails(command("evaluate", models, "unused", data=str(path)) + ["--trigger", "cf", "--target-label", "1"], capsys,
          "every example has label 1", inputs=[path])


@pytest.mark.parametrize("name", ["purify", "purify-out-of-core", "hessian", "evaluate", "demo"])
def test_device_option_is_checked(models, tmp_path, capsys, name):
    args = command(name, models, str(tmp_path / "out"))
    fails(args + ["--device", "gpu0"], capsys, "--device 'gpu0' is not a device; give cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        fails(args + ["--device", "cuda"], capsys, "--device cuda: no CUDA device is visible", "give --device cpu")
    fails(args + ["--device", "meta"], capsys, "--device meta: only cpu and cuda devices are supported")


def test_bfloat16_mixed_precision_on_cpu(models, tmp_path, capsys):
    """--dtype bfloat16 runs the passes under autocast; weights and Hessian stay float32."""
    assert cli.main(command("evaluate", models, "") + ["--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert "CACC" in capsys.readouterr().out
    out = tmp_path / "h.safetensors"
    assert cli.main(command("hessian", models, str(out)) + ["--dtype", "bfloat16"]) == 0
    hessian = load_file(out)
    assert all(h.dtype == torch.float32 and bool(torch.isfinite(h).all()) for h in hessian.values())
    assert any(bool((h > 0).any()) for h in hessian.values())
    purified = tmp_path / "purified"
    assert cli.main(command("purify", models, str(purified)) + ["--dtype", "bfloat16", "--device", "cpu"]) == 0
    report = json.load(open(purified / "finepurify_report.json"))
    assert report["device"] == {"device": "cpu", "dtype": "bfloat16", "name": "CPU"}
    assert all(t.dtype == torch.float32 for t in load_file(purified / "model.safetensors").values()
               if t.is_floating_point())


def test_a_budget_beyond_the_moved_weights_is_reported_as_such(models, tmp_path, capsys):
    """At a threshold of 0 every weight that never moved ties and is counted as reset, though nothing
    changes: the command says how many moved (here none: the suspect given as its own pre-trained
    model, a copy: the same path is refused) instead of claiming the budget was reset."""
    out = tmp_path / "out"
    copy = str(shutil.copytree(models.suspect, tmp_path / "copy"))
    assert cli.main(["purify", "--pretrained", copy, "--suspect", models.suspect, "--hessian-file",
                     models.hessian, "--out", str(out), "--num-reset", "1000"]) == 0
    said = capsys.readouterr().out
    report = json.load(open(out / "finepurify_report.json"))
    assert report["threshold"] == 0 and report["moved_elements"] == 0
    assert (f"reset all 0 ranked weights that moved, of {report['ranked_elements']} (the budget exceeds them: the "
            f"{report['ranked_elements']} that never moved are counted too, unchanged)") in said
    assert cli._reset_summary({"w": 7, "emb": 3}, "emb", 10, 9, 0.5) == "reset 7 of 10 ranked weights (9 moved)"
    assert cli._reset_summary({"w": 7, "emb": 3}, "emb", 10, 10, 0.5) == "reset 7 of 10 ranked weights"
    assert cli._reset_summary({"w": 10}, None, 10, 9, 0.0).startswith("reset all 9 ranked weights that moved, of 10")


def test_an_interrupt_right_after_the_hessian_moved_in_says_it_is_complete(models, tmp_path, capsys, monkeypatch):
    """Ctrl-C the instant the Hessian file is in place: it is complete (not "run it again to resume":
    that run would refuse the existing file) and its running sums are removed."""
    import signal

    from finepurify_ext import hessian

    out = str(tmp_path / "h.safetensors")
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if dst == out:
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(hessian.os, "replace", replace)
    assert cli.main(command("hessian", models, out)) == 130
    assert capsys.readouterr().err.endswith(f"finepurify hessian: interrupted; the output {out} is complete\n")
    assert os.listdir(tmp_path) == ["h.safetensors"]


@pytest.mark.parametrize("name", ["purify", "purify-out-of-core", "hessian"])
def test_a_full_disk_names_out(models, tmp_path, capsys, monkeypatch, name):
    """No space left: the message says where to make room, --out (it gave the errno's words alone)."""
    import errno

    from finepurify_ext import safetensors_io

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(safetensors_io.ShardWriter, "write", full)
    monkeypatch.setattr(safetensors_io.ShardWriter, "write_part", full)
    if name == "purify":  # transformers writes the in-memory model
        monkeypatch.setattr(cli, "_purified_writer", lambda *a, **k: lambda tmp: full(None))
    out = str(tmp_path / "out")
    fails(command(name, models, out), capsys, f"No space left on device: free space on the disk of --out {out} or "
          "choose an --out on another disk (nothing partial is left)", code=1)


def test_a_full_disk_in_safetensors_names_out(models, tmp_path, capsys, monkeypatch):
    """transformers' save_pretrained raises safetensors' own error on a full disk, the OS error in its
    text: it was "failed with SafetensorError" instead of where to make room."""
    from safetensors import SafetensorError

    def full(tmp):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(cli, "_purified_writer", lambda *a, **k: full)
    out = str(tmp_path / "out")
    fails(command("purify", models, out), capsys, f"No space left on device: free space on the disk of --out {out}",
          code=1)
    assert cli._disk_full(SafetensorError("Error while deserializing header: HeaderTooLarge")) is None


def test_a_hessian_whose_output_found_the_disk_full_says_it_resumes(models, tmp_path, capsys, monkeypatch):
    """The estimate is done and its running sums saved when the output's write finds the disk full:
    run again, it resumes from them (the message said nothing of it)."""
    import errno

    from finepurify_ext import safetensors_io

    out = str(tmp_path / "h.safetensors")
    real = safetensors_io.ShardWriter.write

    def full_for_out(self, *args, **kwargs):
        if os.path.basename(self.f.name).startswith("h.safetensors.partial-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(safetensors_io.ShardWriter, "write", full_for_out)
    assert cli.main(command("hessian", models, out)) == 1
    assert (f"free space on the disk of --out {out} or choose an --out on another disk (no partial output is left; "
            f"the batches done are kept: run it again to resume ({out}.accumulator.safetensors))") in \
        capsys.readouterr().err
    monkeypatch.setattr(safetensors_io.ShardWriter, "write", real)
    assert cli.main(command("hessian", models, out)) == 0
    assert not os.path.exists(out + ".accumulator.safetensors")


@pytest.mark.parametrize("name", ["purify", "purify-out-of-core", "hessian"])
def test_an_interrupt_after_the_output_was_written_says_it_is_complete(models, tmp_path, capsys, monkeypatch, name):
    """Ctrl-C once the output is written (while the summary is printed): it said "no output was
    written", or for a Hessian "run it again to resume" (which would refuse the existing file)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    if name == "hessian":  # as the running sums are removed, once
        real = os.remove

        def remove(path):
            monkeypatch.setattr(os, "remove", real)
            interrupted()
        monkeypatch.setattr(os, "remove", remove)
    else:
        monkeypatch.setattr(cli, "_reset_summary", interrupted)
    out = str(tmp_path / ("h.safetensors" if name == "hessian" else "out"))
    assert cli.main(command(name, models, out)) == 130
    assert capsys.readouterr().err.endswith(f"interrupted; the output {out} is complete\n")
    assert os.path.exists(out) and not os.path.exists(out + ".accumulator.safetensors")


def test_a_held_out_set_too_small_to_measure_is_warned_of(models, tmp_path, capsys):
    """32 clean examples hold out 8: one of them moves held-out accuracy 12 points, which early
    stopping and the collapse guard (20 points) read; it went unsaid."""
    out = tmp_path / "out"
    assert cli.main(command("purify", models, str(out))) == 0
    warning = ("only 8 of the 32 clean examples are held out (--validation-fraction 0.25): early stopping and the "
               "collapse guard read their accuracy, which one example moves 12 points; give more clean data (a few "
               "hundred examples)")
    assert f"warning: {warning}" in capsys.readouterr().err
    assert warning in json.load(open(out / "finepurify_report.json"))["warnings"]
    # --reserve-ratio auto is named where it runs (it was, where it did not)
    assert cli.main(command("purify", models, str(tmp_path / "auto")) + ["--reserve-ratio", "auto"]) == 0
    assert "early stopping, the collapse guard and --reserve-ratio auto read their accuracy" in capsys.readouterr().err
    assert cli._warn_few_held_out(100, 0.25) is None and cli._warn_few_held_out(100, 0.0) is None


def test_a_new_folder_for_out_is_said(models, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "h.safetensors"
    assert cli.main(command("hessian", models, str(out))) == 0
    assert f"note: created {out.parent} for --out (it did not exist)" in capsys.readouterr().err
    # a refused command creates nothing and says nothing of it (it said "will be created")
    refused = tmp_path / "other" / "h.safetensors"
    assert cli.main(command("hessian", models, str(refused)) + ["--max-length", "32"]) == 2
    assert "note:" not in capsys.readouterr().err and not refused.parent.exists()
    assert out.is_file()


def test_evaluate_says_flip_rate_for_bias_and_names_the_target(models, capsys):
    """--bias printed its flip rate as "ASR"; the ASR line did not say which label it is the rate of."""
    assert cli.main(command("evaluate", models, "unused") + ["--trigger", "cf", "--bias"]) == 0
    out = capsys.readouterr().out
    assert "flip rate " in out and "predictions that change when 'cf' is inserted" in out and "ASR" not in out
    assert cli.main(command("evaluate", models, "unused") + ["--trigger", "cf"]) == 0
    assert "(trigger 'cf', target label 1)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["purify", "purify-out-of-core"])
def test_the_suspect_given_as_its_own_pretrained_model_is_warned_of(models, tmp_path, capsys, name):
    """Nothing moved, nothing reset, exit 0 and no word: most likely the same model given twice. The
    same path is refused before any work (it ran the Hessian and the fine-tuning to warn); a copy of
    the suspect is warned of."""
    fails(command(name, models, str(tmp_path / "out"), pretrained=models.suspect), capsys,
          f"--pretrained and --suspect are the same path ({models.suspect}): give as --pretrained the model the "
          "suspect was fine-tuned from")
    copy = shutil.copytree(models.suspect, tmp_path / "copy")
    assert cli.main(command(name, models, str(tmp_path / "out"), pretrained=str(copy))) == 0
    err = capsys.readouterr().err
    assert ("warning: no ranked weight of the suspect differs from the pre-trained model's, so there was nothing to "
            "purify: is --pretrained the suspect itself?") in err, err
    report = json.loads((tmp_path / "out" / "finepurify_report.json").read_text())
    assert report["warnings"] == [line.removeprefix("warning: ") for line in err.splitlines()
                                  if line.startswith("warning: ")]  # each said, in order


def test_evaluate_speaks_of_test_data(models, tmp_path, capsys):
    empty = tmp_path / "test.jsonl"
    empty.write_text("\n")
    fails(command("evaluate", models, "unused", data=str(empty)), capsys,
          f"{empty}: no examples; the test data must hold at least one labelled text", inputs=[empty])
    fails(command("evaluate", models, "unused", data=str(tmp_path / "none.jsonl")), capsys,
          "test data file", "none.jsonl' does not exist")


@pytest.mark.parametrize("name", ["purify", "purify-out-of-core"])
def test_purify_out_is_not_named_as_a_file(models, tmp_path, capsys, name):
    """--out purified.safetensors made a directory of that name."""
    out = str(tmp_path / "purified.safetensors")
    fails(command(name, models, out), capsys, f"--out {out}: the purified model is a directory (weights, config, "
          "tokenizer, report); give a directory path")
