"""LoRA adapters (PEFT's format) as suspect models: merged into the pre-trained checkpoint exactly as
PEFT's merge_and_unload merges them, then purified, scored and evaluated like any model directory."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from finepurify_ext import cli
from finepurify_ext.adapters import merge_adapter

from test_causal_lm import EXAMPLES, _digest
from tiny_models import make_tokenizer, write_instructions

peft = pytest.importorskip("peft", reason="peft (a test dependency: pip install -e .[test]) is the merge's oracle")


def llama(tied=False, dtype=torch.float32):
    config = LlamaConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).to(dtype).eval()


def gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=24, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


# (base model, LoRA options): every rule of PEFT's merge that the merge here follows.
CASES = {
    "patterns": (llama, dict(target_modules=["q_proj", "v_proj", "gate_proj", "embed_tokens", "lm_head"],
                             rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3},
                             modules_to_save=["norm"])),  # and the embedding layers PEFT saves whole
    "rslora": (llama, dict(target_modules=["q_proj", "down_proj"], use_rslora=True)),
    "conv1d": (gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),  # GPT-2's [in, out] weights
    # PEFT rounds an embedding's product to bfloat16 before adding it, a linear layer's after
    "bfloat16": (lambda: llama(dtype=torch.bfloat16), dict(target_modules=["q_proj", "up_proj", "embed_tokens"])),
    # A config whose fan_in_fan_out is wrong for the square attn.c_proj (as one adapting Conv1D and
    # Linear layers has for some of them): PEFT goes by each layer's type, and so does the merge here.
    "conv1d-flag": (gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True), {"fan_in_fan_out": False}),
    # A checkpoint of the bare model (no "transformer." prefix): its square attn.c_proj is still a Conv1D.
    "bare-gpt2": (lambda: gpt2().transformer, dict(target_modules=["attn.c_proj"], task_type=None)),
    # LoRA on a tied embedding: PEFT merges into the tie (its own weight saved beside the factors)
    "tied-embedding": (lambda: llama(tied=True), dict(target_modules=["q_proj", "embed_tokens"])),
    # a tied embedding trained whole with ensure_weight_tying: the output layer saved too, the same values
    "tied-ensured": (lambda: llama(tied=True), dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                     ensure_weight_tying=True)),
}


def randomise_training(model):
    """Every LoRA factor and fully trained copy of a PEFT model drawn at random, as if trained (PEFT
    starts B, or an embedding's A, at zero: a product of zero would hide a wrong merge)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.normal_(0, 0.5)


def lora_adapter(base, root, seed=0, edit=None, **options):
    """``base`` saved to root/pre (in two shards with an index), and a LoRA adapter trained on it
    (every factor random: PEFT starts B, or an embedding's A, at zero) saved to root/adapter."""
    torch.manual_seed(seed)
    base.save_pretrained(root / "pre", safe_serialization=True, max_shard_size="20KB")
    model = peft.get_peft_model(base, peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM", **options}))
    randomise_training(model)
    model.save_pretrained(root / "adapter")
    if edit:
        config = json.loads((root / "adapter" / "adapter_config.json").read_text())
        (root / "adapter" / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    return root / "pre", root / "adapter"


def weights(directory):
    """Every tensor of a checkpoint directory, whatever its shards."""
    out = {}
    for shard in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        out.update(load_file(os.path.join(directory, shard)))
    return out


def peft_merged(pre, adapter, cls, dtype):
    base = cls.from_pretrained(pre, dtype=dtype)
    return peft.PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()


@pytest.mark.parametrize("case", CASES)
def test_the_merge_is_peft_merge_and_unload_bit_for_bit(tmp_path, case):
    make, options, *edit = CASES[case]
    base = make()
    cls, dtype = type(base), next(base.parameters()).dtype
    pre, adapter = lora_adapter(base, tmp_path, edit=edit[0] if edit else None, **options)
    before = _digest(pre), _digest(adapter)
    summary = merge_adapter(str(adapter), str(pre), str(tmp_path / "merged"))
    assert (_digest(pre), _digest(adapter)) == before
    shards = sorted(f for f in os.listdir(pre) if f.endswith(".safetensors"))
    assert len(shards) > 1 and sorted(f for f in os.listdir(tmp_path / "merged") if f.endswith(".safetensors")) == shards
    for shard in shards:  # each tensor in the shard it was in, in its dtype
        assert ({n: t.dtype for n, t in load_file(tmp_path / "merged" / shard).items()}
                == {n: t.dtype for n, t in load_file(pre / shard).items()})
    merged = weights(tmp_path / "merged")
    expected = peft_merged(pre, adapter, cls, dtype)
    stored = {n: t for n, t in expected.items() if n in merged}  # a tied lm_head is stored once
    assert set(stored) == set(merged)
    for name, tensor in stored.items():
        assert torch.equal(merged[name], tensor), name
    original = weights(pre)
    changed = {n for n in merged if not torch.equal(merged[n], original[n])}
    lora = {n for n in merged if any(n.endswith(f"{m}.weight") for m in options["target_modules"])}
    assert lora and lora <= changed and summary["lora_modules"] == len(lora) and summary["ranks"] in ([4], [2, 4])
    assert set(summary["replaced_tensors"]) >= changed - lora  # what changed beyond the products was saved whole
    for name in ("config.json", "model.safetensors.index.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (pre / name).read_bytes()


@pytest.fixture(scope="module")
def lm_adapter(tmp_path_factory):
    """A tiny Llama 'pre-trained' directory with its tokenizer, a LoRA adapter of it, the same adapter
    merged by PEFT and saved as a model directory, and instruction data."""
    root = tmp_path_factory.mktemp("lora")
    tokenizer = make_tokenizer(root)
    tokenizer.eos_token = "[SEP]"
    pre, adapter = lora_adapter(llama(), root, target_modules=["q_proj", "v_proj", "down_proj"])
    tokenizer.save_pretrained(pre)
    tokenizer.save_pretrained(adapter)  # as PEFT users often ship it
    merged = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(pre), adapter).merge_and_unload()
    merged.save_pretrained(root / "merged", safe_serialization=True)
    tokenizer.save_pretrained(root / "merged")
    clean = root / "clean.jsonl"
    write_instructions(clean, EXAMPLES * 8)
    return root


def test_commands_take_an_adapter_as_the_model_peft_merges(lm_adapter, tmp_path, capsys):
    """purify (in memory and out of core), hessian and evaluate given the adapter write and print what
    they do given PEFT's merged model; the inputs stay as they were, no scratch copy is left, and the
    report names the adapter, and the adapter's own files not copied (not --pretrained's)."""
    root = lm_adapter
    (root / "pre" / "LICENSE.txt").write_text("the pre-trained model's")  # copied from --pretrained by the merge
    (root / "adapter" / "README.md").write_text("the adapter's card")
    before = _digest(root / "pre"), _digest(root / "adapter")
    outputs = {}
    for suspect in ("adapter", "merged"):
        out = tmp_path / f"purified_{suspect}"
        assert cli.main(["purify", "--pretrained", str(root / "pre"), "--suspect", str(root / suspect),
                         "--clean-data", str(root / "clean.jsonl"), "--out", str(out), "--finetune-steps", "2",
                         "--max-length", "32", "--device", "cpu"]) == 0
        h = tmp_path / f"h_{suspect}.safetensors"
        given = ["--pretrained", str(root / "pre")] if suspect == "adapter" else []
        assert cli.main(["hessian", "--model", str(root / suspect), *given, "--clean-data", str(root / "clean.jsonl"),
                         "--out", str(h), "--batch-size", "8", "--max-length", "32"]) == 0
        ooc = tmp_path / f"ooc_{suspect}"
        assert cli.main(["purify", "--pretrained", str(root / "pre"), "--suspect", str(root / suspect),
                         "--hessian-file", str(h), "--out", str(ooc), "--reserve-ratio", "0.3"]) == 0
        capsys.readouterr()
        assert cli.main(["evaluate", "--model", str(root / suspect), *given, "--data", str(root / "clean.jsonl"),
                         "--target-response", "bad day", "--max-length", "32"]) == 0
        captured = capsys.readouterr()
        outputs[suspect] = (weights(out), load_file(h), weights(ooc),
                            captured.out, json.loads((out / "finepurify_report.json").read_text()))
        if suspect == "adapter":
            assert f"merging the LoRA adapter {root / 'adapter'} into {root / 'pre'}" in captured.err
    for got, want in zip(outputs["adapter"][:3], outputs["merged"][:3]):
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)
    assert outputs["adapter"][3] == outputs["merged"][3]  # perplexity and false-target rate
    report = outputs["adapter"][4]
    assert report["inputs"]["suspect"] == str(root / "adapter") and report["inputs"]["suspect_adapter"]["lora_modules"] == 6
    ooc_report = json.loads((tmp_path / "ooc_adapter" / "finepurify_report.json").read_text())["inputs"]
    assert ooc_report == {"pretrained": str(root / "pre"), "suspect": str(root / "adapter"),
                          "hessian": str(tmp_path / "h_adapter.safetensors"),
                          "suspect_adapter": report["inputs"]["suspect_adapter"]}
    assert json.loads((tmp_path / "ooc_merged" / "finepurify_report.json").read_text())["inputs"]["suspect_adapter"] is None
    # listed: the adapter's card; not --pretrained's files, which the merged scratch copy held
    assert report["not_copied"] == ["README.md"]
    assert json.loads((tmp_path / "ooc_adapter" / "finepurify_report.json").read_text())["not_copied"] == ["README.md"]
    hessian_of = json.loads((tmp_path / "ooc_adapter" / "finepurify_report.json").read_text())["hessian_of"]
    assert hessian_of["model"] == f"{root / 'adapter'} (merged into {root / 'pre'})"  # as estimated
    assert report["purify"]["num_reset"] == outputs["merged"][4]["purify"]["num_reset"] > 0
    assert (_digest(root / "pre"), _digest(root / "adapter")) == before
    assert not [p for p, _, _ in os.walk(tmp_path) if ".finepurify-inputs-" in p]


def test_factors_saved_with_the_adapters_name_merge_as_peft_loads_them(lm_adapter, tmp_path):
    """Older savers kept the adapter's name in the factors' names (lora_A.default.weight,
    lora_embedding_A.default); PEFT loads those, and the merge here gives the same weights. Another
    adapter's name, which PEFT skips with a warning (merging nothing), is refused, as is a factor
    saved under both names."""
    import shutil

    from safetensors.torch import save_file

    from finepurify_ext.adapters import AdapterError, read_adapter

    root = lm_adapter
    pre, adapter = lora_adapter(llama(), tmp_path / "embedding", target_modules=["q_proj", "embed_tokens"])
    for source in (root / "adapter", adapter):
        saved = load_file(source / "adapter_model.safetensors")
        named = {}
        for name, tensor in saved.items():
            name = re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", name)
            named[re.sub(r"(lora_embedding_[AB])$", r"\1.default", name)] = tensor
        assert named.keys() != saved.keys()
        renamed = tmp_path / f"{source.parent.name}_named"
        shutil.copytree(source, renamed)
        save_file(named, str(renamed / "adapter_model.safetensors"))
        base = source.parent / "pre"
        merge_adapter(str(renamed), str(base), str(tmp_path / f"{source.parent.name}_ours"))
        ours = weights(tmp_path / f"{source.parent.name}_ours")
        expected = peft_merged(base, renamed, LlamaForCausalLM, torch.float32)
        assert expected.keys() >= ours.keys() and all(torch.equal(ours[n], expected[n]) for n in ours)
        assert any(not torch.equal(ours[n], t) for n, t in weights(base).items())
        both = {**named, **{n: t.clone() for n, t in saved.items()}}
        save_file(both, str(renamed / "adapter_model.safetensors"))
        with pytest.raises(AdapterError, match="saved twice .with and without the adapter's name.; the file is "
                                               "damaged"):
            read_adapter(str(renamed))
    other = {n.replace(".lora_A.weight", ".lora_A.other.weight"): t
             for n, t in load_file(root / "adapter" / "adapter_model.safetensors").items()}
    shutil.copytree(root / "adapter", tmp_path / "other")
    save_file(other, str(tmp_path / "other" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="lora_A.other.weight' is not one of LoRA's factors"):
        read_adapter(str(tmp_path / "other"))


def test_late_errors_name_the_adapter_and_killed_runs_scratch_goes(lm_adapter, tmp_path, capsys):
    """An error found in the merged model (here a NaN in --pretrained) names the adapter and the model
    it was merged into, not the scratch copy's shard files, gone when the message is read. The
    scratch a killed run left (under today's prefix or the one GGUF inputs had before) is removed by
    the next command that merges or converts there."""
    import shutil

    from safetensors.torch import save_file

    from test_outputs import backdate, killed_run

    root = lm_adapter
    pre = tmp_path / "pre"
    shutil.copytree(root / "pre", pre)
    shard = sorted(pre.glob("*.safetensors"))[-1]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    killed = [killed_run(tmp_path, prefix) for prefix in (".finepurify-inputs-", ".finepurify-gguf-")]
    backdate(*killed)
    adapter = root / "adapter"
    assert cli.main(["purify", "--pretrained", str(pre), "--suspect", str(adapter), "--clean-data",
                     str(root / "clean.jsonl"), "--out", str(tmp_path / "out"), "--max-length", "32"]) == 2
    err = capsys.readouterr().err
    message = err.splitlines()[-1]
    assert message.startswith(f"finepurify purify: error: {adapter} (merged into {pre}): parameter "), message
    assert "holds 1 NaN or Inf value" in message and ".finepurify-inputs-" not in message and "model-0" not in message
    assert all(f"removed {path}" in err for path in killed) and not any(os.path.exists(p) for p in killed)
    assert sorted(os.listdir(tmp_path)) == ["pre"]


def write_adapter(root, config=None, tensors=None, bin_only=False):
    """An adapter directory from a config's changes and tensors (by default a valid one of llama())."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    full = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "task_type": "CAUSAL_LM", **(config or {})}
    (root / "adapter_config.json").write_text(json.dumps(full))
    if tensors is None:
        module = "base_model.model.model.layers.0.self_attn.q_proj"
        tensors = {f"{module}.lora_A.weight": torch.randn(2, 32), f"{module}.lora_B.weight": torch.randn(32, 2)}
    if bin_only:
        (root / "adapter_model.bin").write_bytes(b"pickle")
    else:
        save_file(tensors, str(root / "adapter_model.safetensors"))
    return str(root)


def test_adapters_that_cannot_be_merged_here_are_refused_in_one_line(lm_adapter, tmp_path, capsys):
    root = lm_adapter
    pre, clean = str(root / "pre"), str(root / "clean.jsonl")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    from finepurify_ext.adapters import UNSUPPORTED

    cases = [(write_adapter(tmp_path / option, {option: {"x": 1} if option.endswith("config") else True}),
              f"{option} is set ({what})") for option, what in UNSUPPORTED.items()]
    cases += [
        (write_adapter(tmp_path / "pissa", {"init_lora_weights": "pissa_niter_4"}),
         "init_lora_weights is 'pissa_niter_4', which changes the base weights as well"),
        (write_adapter(tmp_path / "ranks", {"rank_pattern": ["q_proj"]}),
         "rank_pattern is ['q_proj']; expected module names mapped to positive numbers"),
        (write_adapter(tmp_path / "alphas", {"alpha_pattern": {"q_proj": "8"}}), "alpha_pattern is {'q_proj': '8'}"),
        # Keys PEFT matches as regular expressions (inside its own): ones it could not compile.
        (write_adapter(tmp_path / "unmatched", {"alpha_pattern": {"(q_proj": 2}}),
         "alpha_pattern key '(q_proj' is not a regular expression PEFT can match (missing ), unterminated subpattern"),
        (write_adapter(tmp_path / "flags", {"rank_pattern": {"(?i)q_proj": 2}}),
         "rank_pattern key '(?i)q_proj' is not a regular expression PEFT can match (global flags not at the start"),
        (write_adapter(tmp_path / "ia3", {"peft_type": "IA3"}), "peft_type 'IA3'; only LoRA adapters are merged"),
        (write_adapter(tmp_path / "pickle", bin_only=True), "adapter_model.bin is a pickle, which is never loaded"),
        (write_adapter(tmp_path / "wide", tensors={f"{q}.lora_A.weight": torch.randn(2, 48),
                                                   f"{q}.lora_B.weight": torch.randn(32, 2)}),
         "the adapter's model.layers.0.self_attn.q_proj.weight is (32, 48), --pretrained"),
        (write_adapter(tmp_path / "elsewhere", tensors={"base_model.model.model.other.lora_A.weight": torch.randn(2, 4),
                                                        "base_model.model.model.other.lora_B.weight": torch.randn(4, 2)}),
         "the adapter changes model.other.weight, which --pretrained"),
        (write_adapter(tmp_path / "half", tensors={f"{q}.lora_A.weight": torch.randn(2, 32)}),
         "has lora_A without lora_B"),
        (write_adapter(tmp_path / "rank", tensors={f"{q}.lora_A.weight": torch.randn(3, 32),
                                                   f"{q}.lora_B.weight": torch.randn(32, 3)}),
         "do not have the rank 2 its config gives"),
        (write_adapter(tmp_path / "nan", tensors={f"{q}.lora_A.weight": torch.randn(2, 32),
                                                  f"{q}.lora_B.weight": torch.full((32, 2), float("inf"))}),
         f"tensor '{q}.lora_B.weight' holds NaN or Inf values; the adapter is damaged"),
    ]
    for adapter, message in cases:
        out = tmp_path / "out"
        assert cli.main(["purify", "--pretrained", pre, "--suspect", adapter, "--clean-data", clean,
                         "--out", str(out), "--max-length", "32"]) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not [p for p, _, _ in os.walk(tmp_path) if ".finepurify-inputs-" in p]
    adapter = str(root / "adapter")
    for argv, message in [
        (["hessian", "--model", adapter, "--clean-data", clean, "--out", str(tmp_path / "h.safetensors")],
         f"--model {adapter} is a LoRA adapter (adapter_config.json): give --pretrained"),
        (["evaluate", "--model", str(root / "merged"), "--pretrained", pre, "--data", clean],
         "--pretrained is read only where --model is a LoRA adapter"),
        (["purify", "--pretrained", adapter, "--suspect", str(root / "merged"), "--clean-data", clean,
          "--out", str(tmp_path / "o")], f"--pretrained {adapter} is a LoRA adapter"),
    ]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_a_classifiers_adapter_is_merged_onto_its_new_head_and_purified_as_peft_merges_it(tmp_path, capsys):
    """A classifier trained through LoRA (PEFT's SEQ_CLS: the head saved whole, a base model without
    one as --pretrained): the merge is PEFT's bit for bit, the labels are the head's, and purify,
    hessian and evaluate given the adapter do what they do given PEFT's merged classifier."""
    from transformers import BertForSequenceClassification

    from finepurify_ext import data
    from finepurify_ext.adapters import merge_classifier_adapter, read_adapter
    from tiny_models import save_model, tiny_model, toy_examples

    tokenizer = make_tokenizer(tmp_path)
    pre = save_model(tiny_model(tokenizer).bert, tokenizer, tmp_path / "pre")  # no head
    torch.manual_seed(1)
    classifier = BertForSequenceClassification.from_pretrained(pre, num_labels=3)
    model = peft.get_peft_model(classifier, peft.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS",
                                                             target_modules=["query", "value", "dense"]))
    randomise_training(model)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    reference = peft.PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(pre, num_labels=3),
                                               tmp_path / "adapter").merge_and_unload()
    save_model(reference, tokenizer, tmp_path / "merged")
    adapter = read_adapter(str(tmp_path / "adapter"))
    assert adapter.num_labels == 3
    merge_classifier_adapter(adapter, pre, str(tmp_path / "ours"))
    ours, expected = weights(tmp_path / "ours"), weights(tmp_path / "merged")
    assert ours.keys() == expected.keys() and all(torch.equal(ours[n], expected[n]) for n in ours)

    clean = tmp_path / "clean.jsonl"
    data.save_examples(str(clean), toy_examples(32, 4))
    results = {}
    for suspect in ("adapter", "merged"):
        given = ["--pretrained", pre] if suspect == "adapter" else []
        out, h = tmp_path / f"purified_{suspect}", tmp_path / f"h_{suspect}.safetensors"
        assert cli.main(["purify", "--pretrained", pre, "--suspect", str(tmp_path / suspect), "--clean-data",
                         str(clean), "--out", str(out), "--finetune-steps", "2", "--device", "cpu"]) == 0
        assert cli.main(["hessian", "--model", str(tmp_path / suspect), *given, "--clean-data", str(clean),
                         "--out", str(h), "--batch-size", "8"]) == 0
        capsys.readouterr()
        assert cli.main(["evaluate", "--model", str(tmp_path / suspect), *given, "--data", str(clean),
                         "--trigger", "cf", "--target-label", "2"]) == 0
        results[suspect] = weights(out), load_file(h), capsys.readouterr().out
    for got, want in zip(results["adapter"][:2], results["merged"][:2]):
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)
    assert results["adapter"][2] == results["merged"][2] and "CACC" in results["adapter"][2]
    bad = tmp_path / "labels.jsonl"
    data.save_examples(str(bad), [data.Example("good movie", 3)])
    assert cli.main(["hessian", "--model", str(tmp_path / "adapter"), "--pretrained", pre, "--clean-data", str(bad),
                     "--out", str(tmp_path / "h.safetensors")]) == 2
    assert "label 3, out of range for a model with 3 labels" in capsys.readouterr().err  # the head's, not the base's 2


def test_out_of_core_merges_an_adapter_into_a_single_checkpoint_file(lm_adapter, tmp_path):
    """--hessian-file with --pretrained a single safetensors file: the adapter is merged into a copy
    of that file, and the output is what PEFT's merged checkpoint gives."""
    import shutil

    root = lm_adapter
    single = tmp_path / "pre.safetensors"
    from safetensors.torch import save_file
    save_file(weights(root / "pre"), str(single))
    h = tmp_path / "h.safetensors"
    assert cli.main(["hessian", "--model", str(root / "merged"), "--clean-data", str(root / "clean.jsonl"),
                     "--out", str(h), "--batch-size", "8", "--max-length", "32"]) == 0
    merged_file = tmp_path / "merged_only"
    merged_file.mkdir()
    shutil.copyfile(root / "merged" / "model.safetensors", merged_file / "model.safetensors")
    for suspect, out in ((root / "adapter", tmp_path / "a"), (merged_file, tmp_path / "m")):
        assert cli.main(["purify", "--pretrained", str(single), "--suspect", str(suspect), "--hessian-file", str(h),
                         "--out", str(out), "--reserve-ratio", "0.3"]) == 0
    got, want = weights(tmp_path / "a"), weights(tmp_path / "m")
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)


def test_a_classifier_adapter_on_an_llm_is_a_classifier_and_no_input_is_overwritten(lm_adapter, tmp_path, capsys,
                                                                                      monkeypatch):
    """A LoRA classifier on a causal LM (PEFT's SEQ_CLS on Llama: its score head saved whole) is read
    as a classifier by its task type, where --pretrained's config says causal LM; evaluate gives what
    it gives on PEFT's merged classifier, and its scratch copy (in the temporary directory) goes. An
    --out naming --pretrained is refused even with --overwrite."""
    from transformers import LlamaForSequenceClassification

    from finepurify_ext import data
    from tiny_models import save_model, toy_examples

    root = lm_adapter
    tokenizer = make_tokenizer(tmp_path)
    torch.manual_seed(2)
    classifier = LlamaForSequenceClassification.from_pretrained(root / "pre", num_labels=2, pad_token_id=0)
    model = peft.get_peft_model(classifier, peft.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS",
                                                             target_modules=["q_proj", "v_proj"]))
    randomise_training(model)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    pre = tmp_path / "pre"  # the Llama with a padding token, as a classifier batch needs
    base = LlamaForCausalLM.from_pretrained(root / "pre")
    base.config.pad_token_id = 0
    save_model(base, tokenizer, pre)
    reference = peft.PeftModel.from_pretrained(LlamaForSequenceClassification.from_pretrained(pre, num_labels=2),
                                               tmp_path / "adapter").merge_and_unload()
    save_model(reference, tokenizer, tmp_path / "merged")
    labelled = tmp_path / "labelled.jsonl"
    data.save_examples(str(labelled), toy_examples(24, 5))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    printed = []
    for model_dir, given in ((tmp_path / "adapter", ["--pretrained", str(pre)]), (tmp_path / "merged", [])):
        assert cli.main(["evaluate", "--model", str(model_dir), *given, "--data", str(labelled)]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and printed[0].startswith("CACC") and os.listdir(scratch) == []
    before = _digest(pre)
    assert cli.main(["hessian", "--model", str(tmp_path / "adapter"), "--pretrained", str(pre), "--clean-data",
                     str(labelled), "--out", str(pre), "--overwrite"]) == 2
    assert f"--out {pre} is or holds the input {pre}" in capsys.readouterr().err and _digest(pre) == before
    # Out of core merges into --pretrained's own tensors, which hold no classifier head: refused up front.
    h = tmp_path / "h.safetensors"
    assert cli.main(["hessian", "--model", str(tmp_path / "adapter"), "--pretrained", str(pre), "--clean-data",
                     str(labelled), "--out", str(h), "--batch-size", "8"]) == 0
    capsys.readouterr()
    assert cli.main(["purify", "--pretrained", str(pre), "--suspect", str(tmp_path / "adapter"), "--hessian-file",
                     str(h), "--out", str(tmp_path / "ooc"), "--reserve-ratio", "0.3"]) == 2
    assert (f"error: --suspect {tmp_path / 'adapter'} is a classifier's LoRA adapter, merged only in memory onto the "
            "classifier built from --pretrained: purify it with --clean-data instead of --hessian-file"
            ) in capsys.readouterr().err and not (tmp_path / "ooc").exists()


# Module names, and keys as PEFT's configs write them and as an attacker might.
MODULES = ["base_model.model.model.layers.31.self_attn.q_proj", "model.layers.3.mlp.down_proj", "q_proj"]
KEYS = ["model.layers.3.mlp.down_proj", r".*\.layers\.(0|3)\..*_proj", "[a-z]+_proj", r"layers\.\d+\.mlp\.\w+",
        r".*\.layers\.\d+\..*\.\w+_proj", r"(\d{1,2}\.){2}", "q_proj", "layers.31.self_attn.q_proj"]
# Each of these took from seconds to minutes per module name under Python's re.
BACKTRACKING = ["(?:.?.?.?){12}X", "(.?){24}.{24}X", "(a+)+b", "(.*a){20}"]


def test_pattern_keys_match_as_peft_matches_them_and_never_hang(monkeypatch):
    """rank_pattern and alpha_pattern keys give what PEFT's re.match gives; keys that backtrack
    without end under re give their answer at once; a key the matcher gives up on names the config
    and the key."""
    from finepurify_ext import adapters

    for key in KEYS:
        for module in MODULES:
            want = 2 if re.match(rf"(.*\.)?({key})$", module) else 8
            assert adapters._pattern_value({key: 2}, module, 8, "config") == want, (key, module)
    for key in BACKTRACKING:
        assert adapters._pattern_value({key: 2}, MODULES[0], 8, "config") == 8
    monkeypatch.setattr(adapters, "PATTERN_TIMEOUT_S", 1e-9)
    with pytest.raises(adapters.AdapterError) as error:
        adapters._pattern_value({r"(.*)*(.*)*(.*)*\5X": 2}, MODULES[0], 8, "a/adapter_config.json: rank_pattern")
    assert str(error.value) == ("a/adapter_config.json: rank_pattern key '(.*)*(.*)*(.*)*\\\\5X' took over 1e-09 s "
                                f"to match the module name {MODULES[0]!r}; give module names, or a simpler pattern")


@pytest.mark.parametrize("tied", [False, True])
def test_an_adapter_of_a_resized_vocabulary_merges_as_peft_and_is_purified(tmp_path, capsys, tied):
    """Tokens added before LoRA training: the adapter saves the embedding (and the output layer)
    whole, with more rows than the checkpoint's. The merge is PEFT's on the resized model, bit for
    bit, with the config's vocabulary size; purify takes the adapter and keeps the added rows. It was
    refused as an adapter of another model. (Tied: trained with ensure_weight_tying, which saves the
    output layer beside the embedding, the same values.)"""
    from tiny_models import make_tokenizer

    base = llama(tied=tied)
    base.save_pretrained(tmp_path / "pre", safe_serialization=True)
    tokenizer = make_tokenizer(tmp_path)
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(tmp_path / "pre")
    base.resize_token_embeddings(27)
    saved = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=saved,
                                                      task_type="CAUSAL_LM", ensure_weight_tying=tied))
    randomise_training(model)
    model.save_pretrained(tmp_path / "adapter")
    summary = merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "pre"), str(tmp_path / "merged"))
    grown = ["model.embed_tokens.weight"] if tied else ["lm_head.weight", "model.embed_tokens.weight"]
    assert summary["resized_to_vocabulary"] == grown
    resized = LlamaForCausalLM.from_pretrained(tmp_path / "pre")
    resized.resize_token_embeddings(27)
    expected = peft.PeftModel.from_pretrained(resized, tmp_path / "adapter").merge_and_unload().state_dict()
    merged = weights(tmp_path / "merged")
    assert all(torch.equal(merged[n], expected[n]) for n in merged) and {n: merged[n].shape[0] for n in grown} == \
        dict.fromkeys(grown, 27)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 27
    clean = tmp_path / "clean.jsonl"
    write_instructions(clean, EXAMPLES * 8)
    out = tmp_path / "purified"
    assert cli.main(["purify", "--pretrained", str(tmp_path / "pre"), "--suspect", str(tmp_path / "adapter"),
                     "--clean-data", str(clean), "--out", str(out), "--finetune-steps", "0", "--max-length", "32",
                     "--device", "cpu"]) == 0
    report = json.loads((out / "finepurify_report.json").read_text())
    assert sorted(report["purify"]["added_rows"]) == sorted(grown) and report["purify"]["num_reset"] > 0
    purified = weights(out)
    # the input embedding's added rows (no token of the clean data) reset to the pre-trained rows' mean;
    # an untied output layer's kept
    pre_rows = weights(tmp_path / "pre")["model.embed_tokens.weight"]
    mean = (pre_rows.double().sum(dim=0) / 24).float()
    assert report["purify"]["added_rows_reset"] == 3
    assert all(torch.equal(purified["model.embed_tokens.weight"][i], mean) for i in range(24, 27))
    assert all(torch.equal(purified[n][24:], merged[n][24:]) for n in grown if n != "model.embed_tokens.weight")


def test_an_adapter_untying_a_tied_embedding_is_refused(tmp_path):
    """An input embedding saved whole (modules_to_save) of a model that ties it to its output layer,
    trained without ensure_weight_tying: PEFT's merge unties them, the output layer keeping the
    pre-trained values. The merge here kept them tied, the output layer taking the trained copy: not
    the model the adapter describes."""
    from finepurify_ext.adapters import AdapterError

    pre, adapter = lora_adapter(llama(tied=True), tmp_path, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    with pytest.raises(AdapterError, match=r"saves model.embed_tokens.weight whole, which --pretrained .* ties to its "
                                           r"output layer; PEFT's merge unties them"):
        merge_adapter(str(adapter), str(pre), str(tmp_path / "merged"))
    merged = peft_merged(pre, adapter, LlamaForCausalLM, torch.float32)
    assert not torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])  # why



def test_a_classifiers_adapter_of_a_resized_vocabulary_merges_as_peft(tmp_path):
    """A classifier trained through LoRA after tokens were added: its word embedding is saved whole,
    with more rows. The merge resizes the classifier built from --pretrained first: PEFT's, bit for
    bit; purify takes the adapter and keeps the added rows."""
    from transformers import BertForSequenceClassification

    from finepurify_ext import data
    from finepurify_ext.adapters import merge_classifier_adapter, read_adapter
    from tiny_models import save_model, tiny_model, toy_examples

    tokenizer = make_tokenizer(tmp_path)
    pre = save_model(tiny_model(tokenizer).bert, tokenizer, tmp_path / "pre")
    vocab = tokenizer.vocab_size

    def resized():
        classifier = BertForSequenceClassification.from_pretrained(pre, num_labels=2)
        classifier.resize_token_embeddings(vocab + 2)
        return classifier
    torch.manual_seed(1)
    model = peft.get_peft_model(resized(), peft.LoraConfig(r=4, task_type="SEQ_CLS", target_modules=["query"],
                                                           modules_to_save=["word_embeddings"]))
    randomise_training(model)
    model.save_pretrained(tmp_path / "adapter")
    # PEFT saves a resized embedding with its wrapper's copies beside it (modules_to_save, original_module)
    # and loads the embedding's own: made to differ here, so that the merge has to read that one.
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    inner = [n for n in saved if ".modules_to_save." in n or ".original_module." in n]
    assert inner
    save_file({n: t + 1 if n in inner else t for n, t in saved.items()},
              str(tmp_path / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    expected = peft.PeftModel.from_pretrained(resized(), tmp_path / "adapter").merge_and_unload().state_dict()
    summary = merge_classifier_adapter(read_adapter(str(tmp_path / "adapter")), pre, str(tmp_path / "ours"))
    assert summary["resized_to_vocabulary"] == ["bert.embeddings.word_embeddings.weight"]
    ours = weights(tmp_path / "ours")
    assert all(torch.equal(ours[n], expected[n]) for n in ours) and ours[summary["resized_to_vocabulary"][0]].shape[0] \
        == vocab + 2
    clean = tmp_path / "clean.jsonl"
    data.save_examples(str(clean), toy_examples(32, 4))
    out = tmp_path / "purified"
    assert cli.main(["purify", "--pretrained", pre, "--suspect", str(tmp_path / "adapter"), "--clean-data", str(clean),
                     "--out", str(out), "--finetune-steps", "0", "--device", "cpu"]) == 0
    report = json.loads((out / "finepurify_report.json").read_text())
    assert list(report["purify"]["added_rows"]) == ["bert.embeddings.word_embeddings.weight"]


def _resized_adapter(root, rows=27, **options):
    """A Llama saved to root/pre, resized to ``rows`` (3 tokens added), and a LoRA adapter trained on
    the resized model."""
    base = llama()
    base.save_pretrained(root / "pre", safe_serialization=True)
    base.resize_token_embeddings(rows)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, task_type="CAUSAL_LM", **options))
    randomise_training(model)
    model.save_pretrained(root / "adapter")
    return root / "pre", root / "adapter"


@pytest.mark.parametrize("rows", [27, 21])  # tokens added; a padded vocabulary cut
def test_lora_on_a_resized_embedding_merges_as_peft(tmp_path, rows):
    """LoRA on the embedding and output layer of a resized model: their own weights are saved with the
    new rows beside factors of the new size. It was refused as an adapter of another model."""
    pre, adapter = _resized_adapter(tmp_path, rows, target_modules=["q_proj", "embed_tokens", "lm_head"])
    summary = merge_adapter(str(adapter), str(pre), str(tmp_path / "merged"))
    assert summary["resized_to_vocabulary"] == ["lm_head.weight", "model.embed_tokens.weight"]
    resized = LlamaForCausalLM.from_pretrained(pre)
    resized.resize_token_embeddings(rows)
    expected = peft.PeftModel.from_pretrained(resized, adapter).merge_and_unload().state_dict()
    merged = weights(tmp_path / "merged")
    assert all(torch.equal(merged[n], expected[n]) for n in merged) and merged["lm_head.weight"].shape[0] == rows
    assert LlamaForCausalLM.from_pretrained(tmp_path / "merged").config.vocab_size == rows  # loads


def test_lora_on_a_resized_embedding_is_ranked_out_of_core_against_a_single_checkpoint_file(tmp_path):
    """LoRA on the embedding and output layer of a resized model, --pretrained a single safetensors
    file (no config to tell the vocabulary): the merged tensors are ranked on the rows both have, as
    against the directory, and the added rows reset alike; none is copied unranked."""
    pre, adapter = _resized_adapter(tmp_path, target_modules=["q_proj", "embed_tokens", "lm_head"])
    single = tmp_path / "pre.safetensors"
    save_file(weights(pre), str(single))
    merge_adapter(str(adapter), str(pre), str(tmp_path / "merged"))
    tokenizer = make_tokenizer(tmp_path)
    tokenizer.eos_token = "[SEP]"
    tokenizer.add_tokens(["<new0>", "<new1>", "<new2>"])
    tokenizer.save_pretrained(tmp_path / "merged")
    clean = tmp_path / "clean.jsonl"
    write_instructions(clean, EXAMPLES * 8)
    h = tmp_path / "h.safetensors"
    assert cli.main(["hessian", "--model", str(tmp_path / "merged"), "--clean-data", str(clean), "--out", str(h),
                     "--batch-size", "8", "--max-length", "32"]) == 0
    reports = {}
    for name, pretrained in (("directory", pre), ("file", single)):
        assert cli.main(["purify", "--pretrained", str(pretrained), "--suspect", str(adapter), "--hessian-file", str(h),
                         "--out", str(tmp_path / name), "--reserve-ratio", "0.3"]) == 0
        reports[name] = json.loads((tmp_path / name / "finepurify_report.json").read_text())
    for report in reports.values():
        assert report["copied_unscored"] == [] and report["added_rows_reset"] == 3
        assert sorted(report["added_rows"]) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert reports["directory"]["num_reset"] == reports["file"]["num_reset"] > 0
    got, want = weights(tmp_path / "file"), weights(tmp_path / "directory")
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in got)


def test_a_resized_embedding_without_its_output_layer_is_refused(tmp_path):
    """The embedding saved whole with the new rows, the untied output layer not (PEFT's automatic
    check could not reach the base model's config): the merged model would not load."""
    from finepurify_ext.adapters import AdapterError

    pre, adapter = _resized_adapter(tmp_path, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    with pytest.raises(AdapterError, match=r"holds model.embed_tokens.weight with 27 rows \(the vocabulary resized\) "
                                           r"but not lm_head.weight, which --pretrained .* holds with 24: the merged "
                                           r"model would not load"):
        merge_adapter(str(adapter), str(pre), str(tmp_path / "merged"))

