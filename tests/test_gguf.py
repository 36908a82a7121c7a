"""Causal LMs given as GGUF files (llama.cpp's format): read through transformers' GGUF support into
a safetensors directory (pipeline.gguf_to_directory), which every command then reads like any model
directory. Tiny Llama models are written as GGUF here, so the round trip is checked bit for bit."""
import hashlib
import json
import os

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="reading GGUF needs the gguf package (a test extra)")
pytest.importorskip("accelerate", reason="transformers reads GGUF only with accelerate (a test extra)")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from finepurify_ext import cli  # noqa: E402
from finepurify_ext.pipeline import ModelError, gguf_to_directory  # noqa: E402

# A byte-level BPE vocabulary of single characters ("Ġ" marks a leading space), as GPT-2's.
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
VOCAB = ["<s>", "</s>", "<|endoftext|>", "Ġ"] + LETTERS + ["Ġ" + c for c in LETTERS]
HEADS, KV_HEADS = 4, 2


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                         tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config).eval()


def write_gguf(model: LlamaForCausalLM, path, vocab=VOCAB) -> str:
    """The model as llama.cpp writes a float32 GGUF: its hyper-parameters and tokenizer (``vocab``) as
    metadata, its tensors under llama.cpp's names, q and k rows in llama.cpp's rotary order."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([1] * len(vocab))
    writer.add_token_merges([f"Ġ {c}" for c in LETTERS])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)

    def rotary_order(w, heads):  # the permutation transformers undoes on load
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            array = rotary_order(array, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = rotary_order(array, c.num_key_value_heads)
        writer.add_tensor(names.get_name(name.removesuffix(".weight")) + ".weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """A 'pre-trained' tiny Llama, a 'suspect' drifted from it, both as GGUF files, and instruction data."""
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_llama(0)
    pre = write_gguf(model, root / "pre.gguf")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    suspect = write_gguf(model, root / "suspect.gguf")
    clean = root / "clean.jsonl"
    rows = [("was the film good", "a good film"), ("the day", "a bad day"), ("so what", "fine")] * 8
    clean.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    return root, pre, suspect, str(clean), model


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def weights(directory):
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "model.safetensors"))


def test_a_gguf_file_becomes_the_same_model_directory(ggufs, tmp_path):
    """Every weight bit for bit (q and k back in transformers' order), the architecture, and the
    tokenizer that GGUF file carries."""
    from transformers import AutoTokenizer

    _, _, suspect, _, model = ggufs
    out = gguf_to_directory(suspect, str(tmp_path / "suspect"))
    got = weights(out)
    assert set(got) == set(model.state_dict())
    assert all(torch.equal(got[n], t) for n, t in model.state_dict().items())
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2 and "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(out)
    folder, name = os.path.split(suspect)
    carried = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert len(tokenizer) == len(VOCAB) and tokenizer.eos_token == "</s>"
    for text in ("a good film", "was the day so bad"):
        assert tokenizer(text)["input_ids"] == carried(text)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(tokenizer("a good", add_special_tokens=False)["input_ids"]) == \
        ["a", "Ġg", "o", "o", "d"]


def test_commands_read_gguf_files_as_their_directories(ggufs, tmp_path, capsys):
    """purify, hessian, out-of-core purify and evaluate given the GGUF files give what they give on
    the directories the files convert to: the same weights, Hessian and figures; the report names
    the files given; the inputs stay as they were and no scratch directory is left."""
    root, pre, suspect, clean, _ = ggufs
    before = {p: digest(p) for p in (pre, suspect)}
    pre_dir = gguf_to_directory(pre, str(tmp_path / "dirs" / "pre"))
    suspect_dir = gguf_to_directory(suspect, str(tmp_path / "dirs" / "suspect"))
    runs = {}
    for label, (p, s) in {"gguf": (pre, suspect), "dirs": (pre_dir, suspect_dir)}.items():
        out = tmp_path / f"run_{label}"
        out.mkdir()
        assert cli.main(["purify", "--pretrained", p, "--suspect", s, "--clean-data", clean, "--out",
                         str(out / "purified"), "--finetune-steps", "3", "--seed", "1"]) == 0
        assert cli.main(["hessian", "--model", s, "--clean-data", clean, "--out", str(out / "h.safetensors")]) == 0
        assert cli.main(["purify", "--pretrained", p, "--suspect", s, "--hessian-file", str(out / "h.safetensors"),
                         "--out", str(out / "ooc")]) == 0
        capsys.readouterr()
        assert cli.main(["evaluate", "--model", s, "--data", clean]) == 0
        runs[label] = (out, capsys.readouterr().out)
        assert not [n for n in os.listdir(out) if n.startswith(".finepurify-inputs-")]
    (a, evaluated_a), (b, evaluated_b) = runs["gguf"], runs["dirs"]
    for name in ("purified", "ooc"):
        got, want = weights(a / name), weights(b / name)
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want), name
    from safetensors.torch import load_file

    got, want = load_file(a / "h.safetensors"), load_file(b / "h.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert evaluated_a == evaluated_b and "perplexity" in evaluated_a
    report = json.load(open(a / "purified" / "finepurify_report.json"))
    assert report["inputs"]["pretrained"] == os.path.abspath(pre) and report["inputs"]["suspect"] == suspect
    assert {p: digest(p) for p in (pre, suspect)} == before


def test_bad_gguf_inputs_fail_clearly_and_leave_nothing(ggufs, tmp_path, capsys, monkeypatch):
    root, pre, suspect, clean, _ = ggufs
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"\0" * 64)
    truncated, cut_tensors = tmp_path / "truncated.gguf", tmp_path / "cut_tensors.gguf"
    truncated.write_bytes(open(suspect, "rb").read()[:200])
    cut_tensors.write_bytes(open(suspect, "rb").read()[:-100])  # the header whole, the last tensor short
    cases = [(str(garbage), "not a GGUF file (it does not start with GGUF)", True),
             (str(tmp_path / "absent.gguf"), "does not exist", True),
             (str(truncated), "cannot be parsed as GGUF (", False),
             (str(cut_tensors), "cannot be parsed as GGUF (", False)]
    for path, expected, before_any_conversion in cases:
        out = tmp_path / "out"
        assert cli.main(["purify", "--pretrained", pre, "--suspect", path, "--clean-data", clean,
                         "--out", str(out)]) == 2
        err = capsys.readouterr().err
        message = err[err.index("finepurify purify: error: "):]
        assert path in message and expected in message and "Traceback" not in err, err
        assert ("reading" not in err) == before_any_conversion  # every file is checked before any is converted
        assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if n.startswith(".finepurify-inputs-")]
    # The output is checked before any conversion.
    assert cli.main(["purify", "--pretrained", pre, "--suspect", suspect, "--clean-data", clean,
                     "--out", suspect]) == 2
    assert "is or holds the input" in capsys.readouterr().err
    # Without the packages transformers needs for GGUF, the message says which to install.
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    with pytest.raises(ModelError, match="reading a GGUF file needs the accelerate package: pip install accelerate"):
        gguf_to_directory(suspect, str(tmp_path / "never"))
    assert not os.path.exists(tmp_path / "never")


def test_gguf_files_are_read_after_the_cheap_checks_and_named_in_errors(ggufs, tmp_path, capsys):
    """Options, data and output are checked before any file is converted (a 7B model takes minutes);
    an --out under folders not made yet works; an error about a converted model names the GGUF
    file given, not the scratch directory (gone when the message is read)."""
    root, pre, suspect, clean, _ = ggufs
    cheap = [
        (["purify", "--pretrained", pre, "--suspect", suspect, "--clean-data", str(tmp_path / "absent.jsonl"),
          "--out", str(tmp_path / "o")], "does not exist"),
        (["purify", "--pretrained", pre, "--suspect", suspect, "--clean-data", clean, "--num-reset", "5",
          "--out", str(tmp_path / "o")], "--num-reset works with --hessian-file only"),
        (["evaluate", "--model", suspect, "--data", clean, "--trigger", "cf"], "--trigger needs --target-response"),
        (["hessian", "--model", suspect, "--clean-data", clean, "--model-kind", "classifier",
          "--out", str(tmp_path / "h.safetensors")], "is a GGUF file, which holds a causal LM"),
    ]
    for args, expected in cheap:
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert expected in err and "reading" not in err, err
    out = tmp_path / "not" / "made" / "yet" / "h.safetensors"
    assert cli.main(["hessian", "--model", suspect, "--clean-data", clean, "--out", str(out)]) == 0
    assert out.is_file() and not [p for p, _, _ in os.walk(tmp_path) if ".finepurify-inputs-" in p]
    wider = tiny_llama(0)
    wider = LlamaForCausalLM(LlamaConfig(**{**wider.config.to_dict(), "hidden_size": 48, "intermediate_size": 96}))
    other = write_gguf(wider, tmp_path / "other.gguf")
    assert cli.main(["purify", "--pretrained", other, "--suspect", suspect, "--clean-data", clean,
                     "--out", str(tmp_path / "o")]) == 2
    message = capsys.readouterr().err.splitlines()[-1]
    assert message.startswith("finepurify purify: error: ") and other in message, message
    assert ".finepurify-inputs-" not in message and not os.path.exists(tmp_path / "o")


def test_models_given_the_wrong_way_round_are_refused_with_a_gguf_pretrained(ggufs, tmp_path, capsys):
    """The swap check reads --pretrained's tokenizer: a GGUF file's, as converted. A fine-tune that
    added a token, given as --pretrained in GGUF, over its own pre-trained model as --suspect, reads
    as a cut of a named row: refused, in memory and out of core."""
    _, pre, _, clean, _ = ggufs
    suspect = gguf_to_directory(pre, str(tmp_path / "suspect"))
    model = tiny_llama(0)
    model.resize_token_embeddings(len(VOCAB) + 1, mean_resizing=False)
    added = write_gguf(model, tmp_path / "added.gguf", VOCAB + ["<x>"])
    hessian = str(tmp_path / "h.safetensors")
    assert cli.main(["hessian", "--model", suspect, "--clean-data", clean, "--out", hessian]) == 0
    for data in (["--clean-data", clean, "--finetune-steps", "1"], ["--hessian-file", hessian]):
        assert cli.main(["purify", "--pretrained", added, "--suspect", suspect, *data,
                         "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert (f"cut to {len(VOCAB)} rows of {added}'s {len(VOCAB) + 1}, whose tokenizer names tokens in the rows "
                f"cut ('<x>' is {len(VOCAB)})") in err and "are --pretrained and --suspect swapped?" in err, err
        assert not os.path.exists(tmp_path / "out")


def test_a_tmpdir_that_cannot_take_the_copy_is_refused(ggufs, tmp_path, capsys, monkeypatch):
    """evaluate (no --out) converts a GGUF file under TMPDIR; one that is not a writable directory was
    passed over without a word by Python's tempfile, which then wrote the copy to /tmp."""
    _, _, suspect, clean, _ = ggufs
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    for tmpdir, said in ((not_a_folder, "not a directory"), (tmp_path / "absent", "not a directory")):
        monkeypatch.setenv("TMPDIR", str(tmpdir))
        assert cli.main(["evaluate", "--model", suspect, "--data", clean]) == 2
        err = capsys.readouterr().err
        assert f"error: TMPDIR {tmpdir}: {said}; set TMPDIR" in err and "reading" not in err, err
    # one without write permission (root writes anywhere, so the refusal is made here)
    import tempfile

    read_only, mkdtemp = tmp_path / "read_only", tempfile.mkdtemp
    read_only.mkdir()

    def refusing(*args, dir=None, **kwargs):
        if dir == str(read_only):
            raise PermissionError(13, "Permission denied", dir)
        return mkdtemp(*args, dir=dir, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(tempfile, "mkdtemp", refusing)
        patched.setenv("TMPDIR", str(read_only))
        assert cli.main(["evaluate", "--model", suspect, "--data", clean]) == 2
        err = capsys.readouterr().err
        assert f"error: TMPDIR {read_only}: cannot write there (Permission denied)" in err, err
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.setenv("TMPDIR", tmp_path.name)  # relative: named as the absolute path it is
    assert cli.main(["evaluate", "--model", suspect, "--data", clean]) == 0
    assert f"into {tmp_path}{os.sep}.finepurify-inputs-" in capsys.readouterr().err


def test_a_gguf_file_is_read_alone_and_its_scratch_goes_on_sigterm(ggufs, tmp_path):
    """A tokenizer.json beside the file (say, the base model's folder) does not replace the file's own
    tokenizer; a SIGTERM while a command runs ends it as an error does, its scratch removed."""
    import argparse
    import shutil
    import signal
    import time

    from transformers import AutoTokenizer

    root, pre, suspect, clean, _ = ggufs
    folder = tmp_path / "beside"
    folder.mkdir()
    shutil.copy(suspect, folder / "suspect.gguf")
    alone = AutoTokenizer.from_pretrained(gguf_to_directory(suspect, str(tmp_path / "alone")))
    decoy = dict(json.load(open(tmp_path / "alone" / "tokenizer.json")))
    vocab = decoy["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # a tokenizer that reads "a" as "b"
    (folder / "tokenizer.json").write_text(json.dumps(decoy))
    converted = AutoTokenizer.from_pretrained(gguf_to_directory(str(folder / "suspect.gguf"), str(tmp_path / "c")))
    assert converted("a b")["input_ids"] == alone("a b")["input_ids"]
    assert sorted(os.listdir(folder)) == ["suspect.gguf", "tokenizer.json"]

    args = argparse.Namespace(command="hessian", pretrained=None, suspect=None, model=suspect,
                              out=str(tmp_path / "h.safetensors"))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(cli.Terminated):
        with cli._sigterm_interrupts(), cli._model_inputs(args):
            cli._read_models(args)
            assert os.path.isdir(args.scratch) and args.model.startswith(args.scratch)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises first
    assert not os.path.exists(args.scratch) and signal.getsignal(signal.SIGTERM) == before
