"""The GPU profiling helper's parts that run without a GPU (bench/ncu_kernels.py): its driver over
every pass, on the CPU, and the parsing of Nsight Compute's CSV details and source pages."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
import ncu_kernels  # noqa: E402

DETAILS = '''==PROF== Connected to process 123
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","123","python3","h","void finepurify::cuda::score_histogram_kernel<float, false, true>(...)","1","7","(256, 1, 1)","(528, 1, 1)","0","9.0","GPU Speed Of Light Throughput","DRAM Throughput","%","85.12"
"0","123","python3","h","void finepurify::cuda::score_histogram_kernel<float, false, true>(...)","1","7","(256, 1, 1)","(528, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","usecond","412.35"
"1","123","python3","h","void finepurify::cuda::masked_reset_kernel<float, false>(...)","1","7","(256, 1, 1)","(396, 1, 1)","0","9.0","Occupancy","Achieved Occupancy","%","48.2"
==PROF== Disconnected from process 123
'''


def test_details_page_parsed_per_launch():
    launches = ncu_kernels.parse(DETAILS)
    assert [launch["id"] for launch in launches] == [0, 1]
    first = launches[0]
    assert "score_histogram_kernel" in first["kernel"] and first["grid"] == "(528, 1, 1)"
    assert first["metrics"] == {"GPU Speed Of Light Throughput: DRAM Throughput (%)": "85.12",
                                "GPU Speed Of Light Throughput: Duration (usecond)": "412.35"}
    assert launches[1]["metrics"] == {"Occupancy: Achieved Occupancy (%)": "48.2"}


SOURCE = '''==PROF== Connected to process 123
"Kernel Name","void finepurify::cuda::score_histogram_kernel<BFloat16Bits, 0, 1>(LaunchTable<3>, ScoreSpec)"
"# Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","Thread Instructions Executed","Predicated-On Thread Instructions Executed","Divergent Branches"
"00007f0000000100","LDG.E.128 R4, desc[UR4][R2.64]","1,200","1000","32000","32000","0"
"00007f0000000110","@P0 BRA 0x7f0000000200","40","1000","32000","20000","300"
"00007f0000000120","MUFU.RCP R9, R8","10","400","4000","4000","0"
"00007f0000000130","EXIT","0","0","0","0","0"
'''


def test_source_page_parsed_per_instruction():
    """Where a warp's lanes sit idle, instruction by instruction: the divergent path (400 warp
    instructions of 10 threads) heads the list, unexecuted instructions are left out."""
    sass = ncu_kernels.parse_source(SOURCE)
    assert sass["kernel"].startswith("void finepurify::cuda::score_histogram_kernel<BFloat16Bits")
    assert [r[0] for r in sass["instructions"]] == ["00007f0000000100", "00007f0000000110", "00007f0000000120"]
    assert sass["instructions"][0][1:] == ["LDG.E.128 R4, desc[UR4][R2.64]", 1000, 32000, 32000, 0, 1200]
    assert sass["instructions"][1][4:6] == [20000, 300]
    assert sass["warp_instructions"] == 2400 and sass["thread_instructions"] == 68000
    assert sass["active_threads_per_instruction"] == round(68000 / 2400, 2)
    assert sass["most_idle_lanes"][0][1] == "MUFU.RCP R9, R8" and sass["most_idle_lanes"][0][-1] == 10.0
    with pytest.raises(ValueError, match="no source table"):
        ncu_kernels.parse_source(DETAILS)


def test_driver_runs_every_pass_on_the_cpu():
    ncu_kernels.drive("tiny", "cpu")  # what ncu profiles on a GPU; raises if a pass cannot run
    ncu_kernels.drive("tiny", "cpu", unmoved=0.5)


def test_gpu_bench_runs_every_case_on_the_cpu(tmp_path):
    """bench/bench_cuda.py at the tiny size on the CPU: every case a GPU check times runs (the
    searches from a sample checked against score_threshold inside), so a lent GPU's minutes are
    not lost to a script error."""
    import json
    import subprocess

    out = tmp_path / "ops.json"
    subprocess.run([sys.executable, os.path.join(HERE, "..", "bench", "bench_cuda.py"), "--device", "cpu", "--sizes",
                    "tiny", "--repeats", "1", "--baseline-budget-s", "0.05", "--out", str(out)],
                   check=True, capture_output=True)
    cases = {(r["case"], r["weight_dtype"]) for r in json.loads(out.read_text())["results"]}
    for dtype in ("float32", "bfloat16"):
        names = {c for c, d in cases if d == dtype}
        assert {"score_threshold", "detect_and_reset", "accumulate_sq_grads_"} <= names
        assert any(c.startswith("score_threshold (sample + ") for c in names)
        assert any(c.startswith("detect_and_reset (search='sample'") for c in names)


def test_search_bench_compares_the_two_searches(tmp_path):
    """bench/bench_search.py at two small sizes: both searches timed (it checks they agree), the
    sample's search in one candidates pass."""
    import json
    import subprocess

    out = tmp_path / "search.json"
    subprocess.run([sys.executable, os.path.join(HERE, "..", "bench", "bench_search.py"), "--sizes", "40000", "200000",
                    "--tensors", "7", "--repeats", "1", "--out", str(out)], check=True, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["weights"] for r in rows] == [39998, 199997]
    assert all(r["histogram_passes_ms"] > 0 and r["sample_and_candidates_ms"] > 0 for r in rows)
    assert all(r["candidates_passes"] == 1 for r in rows)
    assert all(r["sample_extra_mib"] is not None and r["histograms_extra_mib"] is not None for r in rows)


def test_search_bench_over_ranks(tmp_path):
    """bench/bench_search.py --ranks 2: both distributed searches timed over two gloo processes (it
    checks they agree), a row per size."""
    import json
    import subprocess

    out = tmp_path / "search.json"
    subprocess.run([sys.executable, os.path.join(HERE, "..", "bench", "bench_search.py"), "--ranks", "2", "--sizes",
                    "40000", "--tensors", "7", "--repeats", "1", "--out", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["device"] == "cpu (gloo)" and [(r["weights"], r["ranks"]) for r in result["rows"]] == [(39998, 2)]
    assert all(r["histograms_ms"] > 0 and r["sample_ms"] > 0 for r in result["rows"])


def test_sharded_purify_bench_over_ranks(tmp_path):
    """bench/bench_sharded.py: purify_ of an FSDP2 model over two gloo processes against the op on
    the same shards (it checks they reset the same weights), a row per ranking, with its targets."""
    import json
    import subprocess

    from finepurify_ext.purify import RANKINGS

    out = tmp_path / "sharded.json"
    subprocess.run([sys.executable, os.path.join(HERE, "..", "bench", "bench_sharded.py"), "--ranks", "2", "--weights",
                    "300000", "--layers", "3", "--repeats", "1", "--out", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert [r["ranking"] for r in result["rows"]] == list(RANKINGS)
    assert all(r["ranks"] == 2 and r["op_ms"] > 0 and r["purify_ms"] > 0 and r["reset"] > 0 for r in result["rows"])
    assert len(result["targets"]) == 2 * len(RANKINGS)


def test_checkpoint_bench_runs_every_mode(tmp_path):
    """bench/bench_checkpoint.py at its tiny size: every mode runs in its own process, the out-of-core
    ones report their threshold passes, and each configuration's modes reset the same weights."""
    import json
    import subprocess

    out = tmp_path / "ooc.json"
    modes = ["out_of_core", "out_of_core_default", "out_of_core_default_million", "out_of_core_default_histograms",
             "in_memory_pytorch", "in_memory_pytorch_topk"]
    subprocess.run([sys.executable, os.path.join(HERE, "..", "bench", "bench_checkpoint.py"), "--size", "tiny",
                    "--dir", str(tmp_path / "ckpt"), "--reserve", "0.3", "--modes", *modes, "--out", str(out)],
                   check=True, capture_output=True)
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert sorted(runs) == sorted(modes) and all(runs[m]["time_s"] > 0 for m in modes), runs
    assert result["reserve_ratio"] == 0.3 and "memory_target_met" in result  # (not met by torch alone at this size)
    assert all(runs[m]["threshold_passes"] >= 1 for m in modes if m.startswith("out_of_core"))
    literal = {runs[m]["num_reset"] for m in ("out_of_core", "in_memory_pytorch", "in_memory_pytorch_topk")}
    default = {runs[m]["num_reset"] for m in modes if m.startswith("out_of_core_default")}
    assert len(literal) == 1 and len(default) == 1 and literal != {0}


def test_host_overhead_bench_writes_a_row_per_label(tmp_path):
    """bench/bench_host.py, as gpu_check.sh runs it on a GPU, on the CPU: a row per label, every
    ranking with purify_'s and the op's times and its steps."""
    import json
    import subprocess

    out = tmp_path / "host.json"
    for label in ("a", "b"):
        subprocess.run([sys.executable, os.path.join(HERE, "..", "bench", "bench_host.py"), "--layout", "opt-125m",
                        "--repeats", "1", "--label", label, "--out", str(out)], check=True, capture_output=True)
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"a", "b"} and runs["a"]["tensors"] == 196
    for row in runs["b"]["rankings"].values():
        # tiny widths: below purify.CANDIDATES_MIN_WEIGHTS, the histogram passes
        assert row["purify_ms"] > 0 and row["op_ms"] > 0 and "threshold_from_histograms" in row["steps_ms"]


def test_end_to_end_bench_runs_every_command_on_the_cpu(tmp_path):
    """bench/gpu_e2e.py, the GPU check's end-to-end step, on a tiny causal LM on the CPU: every
    command succeeds and the report holds both paths' results (a broken step costs a GPU lease)."""
    import json
    import subprocess

    out = tmp_path / "e2e.json"
    subprocess.run([sys.executable, os.path.join(HERE, "..", "bench", "gpu_e2e.py"), "--model", "llama-tiny",
                    "--device", "cpu", "--timeout", "300", "--out", str(out)], check=True, capture_output=True)
    report = json.loads(out.read_text())
    assert [s["rc"] for s in report["steps"]] == [0, 0, 0]
    assert report["in_memory"]["num_reset"] > 0 and report["out_of_core"]["num_reset"] > 0
    assert report["out_of_core"]["threshold_passes"] >= 1 and report["device"] == "CPU"


def test_the_cuda_tests_name_only_what_the_package_has():
    """tests/test_cuda.py runs only on a lent GPU: every attribute it reads from the package's modules
    and every name it monkeypatches there exists, so a rename here does not cost a GPU lease."""
    import ast

    from finepurify_ext import checkpoint, hessian, ops, pipeline, purify
    from finepurify_ext import reference

    modules = {"purify_module": purify, "checkpoint_module": checkpoint, "ops": ops, "ref": reference,
               "hessian_module": hessian, "pipeline": pipeline}
    tree = ast.parse(open(os.path.join(HERE, "test_cuda.py")).read())
    missing, patched = [], 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if not hasattr(modules[node.value.id], node.attr):
                missing.append(f"{node.value.id}.{node.attr}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"
                and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in modules):
            names = [node.args[1]] if isinstance(node.args[1], ast.Constant) else []
            patched += len(names)
            missing += [f"{node.args[0].id}.{n.value}" for n in names if not hasattr(modules[node.args[0].id], n.value)]
        if isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple):  # `for name, value in (("NAME", v), ...)`
            for item in node.iter.elts:
                if isinstance(item, ast.Tuple) and isinstance(item.elts[0], ast.Constant) and \
                        isinstance(item.elts[0].value, str) and item.elts[0].value.isupper():
                    patched += 1
                    if not hasattr(checkpoint, item.elts[0].value):
                        missing.append(f"checkpoint_module.{item.elts[0].value}")
    assert patched >= 5 and not missing, (patched, missing)


def test_reset_only_curves_plots_are_named_after_out(tmp_path):
    """Another --out wrote its plots over the committed reset_only_curves_<trigger>.png."""
    import reset_only_curves

    curve = [{"reserve_ratio": r, "asr": 0.5 - r / 2, "cacc": 0.9} for r in (0.1, 0.5)]
    names = reset_only_curves.plot({"word": {"curves": {"fine_purifying": curve}}}, str(tmp_path / "rerun"))
    assert names == ["rerun_word.png"] and os.listdir(tmp_path) == ["rerun_word.png"]
