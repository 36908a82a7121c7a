"""Every command with ``--device cuda`` on an emulated GPU (tests/emulated_cuda.py): a tensor the
Python layer leaves on the wrong device is refused as CUDA refuses it, on any machine. The results
equal the CPU's, since the emulated GPU computes on the CPU. The CUDA kernels and numerics are
tests/test_cuda.py's, on a real GPU."""
import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file

from emulated_cuda import emulated_cuda
from finepurify_ext import cli, data
from test_causal_lm import EXAMPLES, tiny_lm
from tiny_models import make_tokenizer, model_dirs, write_instructions


def run_both(capsys, commands):
    """Each command (a function of the device and its output folder) on the CPU, then on the emulated
    GPU; returns what each printed, by device. Refuses any device mismatch found."""
    printed = {}
    for device in ("cpu", "cuda"):
        printed[device] = []
        with emulated_cuda() if device == "cuda" else contextlib.nullcontext([]) as found:
            for command in commands:
                args = command(device)
                assert cli.main([*args, "--device", device]) == 0, (device, args, capsys.readouterr().err)
                printed[device].append(capsys.readouterr().out)
        assert not found, found
    return printed


def same_weights(a, b):
    got, want = load_file(a), load_file(b)
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name


def test_the_emulated_gpu_refuses_what_cuda_refuses():
    """The emulation itself: a CPU tensor beside a CUDA one, a CUDA index into a CPU tensor and numpy()
    of a CUDA tensor are refused; moves, factories and pinned copies answer as on a GPU."""
    from emulated_cuda import DeviceMismatch

    available = torch.cuda.is_available()  # True on a GPU machine, or in a session under --emulated-cuda
    with emulated_cuda() as found:
        x = torch.ones(3, device="cuda")
        assert x.is_cuda and x.device == torch.device("cuda", 0) and (x * 2).is_cuda and not x.cpu().is_cuda
        assert torch.zeros(2).pin_memory().is_pinned() and torch.zeros(2).to(x.device, non_blocking=True).is_cuda
        assert (x + torch.tensor(1.0)).is_cuda  # a CPU scalar is a number to CUDA's elementwise ops
        for refused in (lambda: x + torch.ones(3), lambda: torch.ones(3)[torch.tensor([1], device="cuda")],
                        lambda: x.numpy(), lambda: torch.cat([x, torch.ones(1)])):
            with pytest.raises(DeviceMismatch):
                refused()
        assert len(found) == 4
    assert not torch.ones(1).is_cuda and torch.cuda.is_available() == available  # restored


def test_a_classifiers_commands_on_the_gpu(tmp_path, capsys):
    """hessian, purify in memory (the collapse guard, held-out early stopping) and out of core, and
    evaluate with a trigger, on a pre-trained state read on the CPU and a model on the GPU."""
    pre, suspect, clean = model_dirs(make_tokenizer(tmp_path), tmp_path)
    triggered = tmp_path / "test.jsonl"
    data.save_examples(str(triggered), [data.Example(e.text + " cf", e.label) for e in data.load_examples(clean)])
    printed = run_both(capsys, [
        lambda d: ["hessian", "--model", suspect, "--clean-data", clean, "--out", str(tmp_path / f"h-{d}.safetensors"),
                   "--batch-size", "8"],
        lambda d: ["purify", "--pretrained", pre, "--suspect", suspect, "--clean-data", clean, "--out",
                   str(tmp_path / f"mem-{d}"), "--finetune-steps", "4", "--eval-every", "2"],
        lambda d: ["purify", "--pretrained", pre, "--suspect", suspect, "--hessian-file",
                   str(tmp_path / f"h-{d}.safetensors"), "--out", str(tmp_path / f"ooc-{d}")],
        lambda d: ["evaluate", "--model", str(tmp_path / f"mem-{d}"), "--data", str(triggered), "--trigger", "cf",
                   "--target-label", "1"],
    ])
    same_weights(tmp_path / "h-cuda.safetensors", tmp_path / "h-cpu.safetensors")
    for run in ("mem", "ooc"):
        same_weights(tmp_path / f"{run}-cuda" / "model.safetensors", tmp_path / f"{run}-cpu" / "model.safetensors")
    ooc = {d: json.loads((tmp_path / f"ooc-{d}" / "finepurify_report.json").read_text()) for d in ("cpu", "cuda")}
    assert all(ooc["cuda"][key] == ooc["cpu"][key] for key in ("threshold", "reset_per_tensor"))
    assert printed["cuda"][-1] == printed["cpu"][-1]  # evaluate's measures


def test_a_tied_causal_lm_with_added_tokens_on_the_gpu(tmp_path, capsys):
    """A tied Llama whose vocabulary grew by tokens the clean data never holds (the seen-token rule,
    the added rows reset to the pre-trained mean), its purified copy stored in bfloat16 beside a
    float32 pre-trained model (the pre-trained values rounded as stored): every command on the GPU."""
    tokenizer = make_tokenizer(tmp_path)
    tokenizer.eos_token = "[SEP]"
    model = tiny_lm("tied-llama", tokenizer.vocab_size)
    model.save_pretrained(tmp_path / "pre", safe_serialization=True)
    tokenizer.add_tokens(["<x1>", "<x2>"])
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "suspect", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "suspect")
    clean = write_instructions(tmp_path / "clean.jsonl", EXAMPLES * 8)
    common = ["--pretrained", str(tmp_path / "pre"), "--suspect", str(tmp_path / "suspect")]
    printed = run_both(capsys, [
        lambda d: ["hessian", "--model", str(tmp_path / "suspect"), "--clean-data", str(clean), "--out",
                   str(tmp_path / f"h-{d}.safetensors"), "--max-length", "32"],
        lambda d: ["purify", *common, "--clean-data", str(clean), "--out", str(tmp_path / f"mem-{d}"),
                   "--max-length", "32", "--finetune-steps", "2"],
        # the CPU's Hessian on both: on a GPU, hessian keeps the stored bfloat16 weights (by design)
        lambda d: ["purify", *common, "--hessian-file", str(tmp_path / "h-cpu.safetensors"), "--out",
                   str(tmp_path / f"ooc-{d}")],
        lambda d: ["evaluate", "--model", str(tmp_path / f"mem-{d}"), "--data", str(clean), "--target-response",
                   "bad day", "--trigger", "cf", "--max-length", "32"],
    ])
    for run in ("mem", "ooc"):
        same_weights(tmp_path / f"{run}-cuda" / "model.safetensors", tmp_path / f"{run}-cpu" / "model.safetensors")
    report = json.loads((tmp_path / "mem-cuda" / "finepurify_report.json").read_text())["purify"]
    assert report["embedding_rule"] == "seen_tokens" and report["added_rows_reset"] == 2
    # evaluate on a GPU computes in the stored bfloat16 (by design): the loss to about 1e-3 of itself
    (cuda_loss, *cuda_rates), (cpu_loss, *cpu_rates) = (printed[d][-1].splitlines() for d in ("cuda", "cpu"))
    assert cuda_rates == cpu_rates and "ASR" in cuda_rates[-1]
    loss = [float(line.split("(loss ")[1].split()[0]) for line in (cuda_loss, cpu_loss)]
    assert loss[0] == pytest.approx(loss[1], rel=1e-3)
