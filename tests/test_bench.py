"""Benchmarks: the fast paths they time agree with the plain model, and the targets table reports misses."""
from gadget.bench.model_bench import BenchCase, run
from gadget.bench.summary import targets_table


def test_model_bench_paths_agree_and_targets_table_flags_misses():
    case = BenchCase(config="small", coils=4, readout=64, phase=32, acs=6, repeats=1, threads=1)
    results = run(case, ("ours", "ours-static"))
    assert results["base"] == "ours"
    assert results["ours-static"]["max_rel_diff"] < 1e-4
    assert results["ours-static"]["peak_mb"] > 0
    fake_ref = {**results["ours"], "median_s": results["ours-static"]["median_s"] / 0.8, "peak_mb": 1e6}
    results["reference"] = fake_ref
    results["ours-static"]["vs"] = 0.8
    results["ours"]["vs"] = 10.0
    ingests = [{"channels": 32, "samples": 512, "mb_s": {"ours → slices": 250.0, "ismrmrd": 200.0}, "ratio": 1.25},
               {"channels": 16, "samples": 256, "mb_s": {"ours → slices": 400.0, "ismrmrd": 500.0}, "ratio": 0.8}]
    table = targets_table(results, ingests, {"overhead_pct": 1.0})
    lines = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    cpu = lines["CPU wall time vs reference"]
    assert "0.800× (ours-static, max rel. diff" in cpu and cpu.endswith("| NO |")
    assert lines["max relative difference"].endswith("| yes |")
    assert lines["socket → assembled slices, 32 coils x 512 samples"].endswith("| NO |")  # 250 MB/s < 300
    assert lines["socket → assembled slices, 16 coils x 256 samples"].endswith("| NO |")  # slower than ismrmrd
    assert lines["pipeline overhead (model excluded)"].endswith("| yes |")


def test_ingest_bench_readers_all_read_every_acquisition():
    """Each reader of the ingest benchmark reads the whole stream over loopback TCP (the bench raises
    when a reader returns another count, or when an assembled slice is incomplete or misshapen)."""
    from gadget.bench.ingest_bench import READERS, run_ingest_bench

    result = run_ingest_bench(n_acq=2 * 256 + 7, channels=2, samples=16, repeats=1)
    assert set(result["mb_s"]) == set(READERS)
    assert all(v > 0 for v in result["mb_s"].values())
    assert result["ratio"] == result["mb_s"]["ours → slices"] / result["mb_s"]["ismrmrd"]


def test_reduced_precision_rows_count_for_the_gpu_target_only():
    case = BenchCase(config="small", coils=4, readout=64, phase=32, acs=6, repeats=1, threads=1)
    results = run(case, ("ours", "ours-bf16"))
    bf16 = results["ours-bf16"]
    assert 1e-5 < bf16["rel_l2_diff"] < 1.5e-2  # tests/test_precision.py: same bound for the U-Nets in bf16
    results["reference"] = {**results["ours"], "vs": 1.0, "peak_mb": 1e6}
    results["ours"]["vs"], bf16["vs"] = 0.9, 0.4
    pipeline, ingests = {"overhead_pct": 1.0}, []
    cpu = {line.split("|")[1].strip(): line for line in targets_table(results, ingests, pipeline).splitlines()[2:]}
    gpu = {line.split("|")[1].strip(): line
           for line in targets_table(results, ingests, pipeline, "cuda").splitlines()[2:]}
    assert "0.900× (ours, " in cpu["CPU wall time vs reference"] and cpu["CPU wall time vs reference"].endswith("NO |")
    gpu_time = gpu["GPU wall time vs reference"]
    assert f"0.400× (ours-bf16, max rel. diff {bf16['max_rel_diff']:.1e})" in gpu_time and gpu_time.endswith("yes |")
    assert "(ours)" in gpu["max relative difference (fp32 paths)"]  # the 1e-4 bound is checked on the fp32 path


def test_train_bench_checkpointing_gives_the_plain_steps_gradients():
    from gadget.bench.train_bench import format_table
    from gadget.bench.train_bench import run as run_train

    case = BenchCase(config="small", coils=4, readout=64, phase=32, acs=6, repeats=1, threads=1)
    results = run_train(case, ("plain", "checkpointing"))
    assert results["base"] == "plain"
    # the same arithmetic, recomputed in backward; only the per-coil split of the sensitivity U-Net sums its
    # weight gradients in another order (fp32 rounding, measured 3.5e-6; exact in float64: tests/test_train.py)
    assert results["checkpointing"]["grad_rel_diff"] < 1e-5
    assert float((results["plain"]["grads"] ** 2).sum()) > 0
    assert all(results[v]["peak_mb"] > 0 and results[v]["median_s"] > 0 for v in ("plain", "checkpointing"))
    table = format_table(case, results)
    assert "| checkpointing |" in table and "| plain |" in table


def test_refine_bench_times_both_paths_and_tables_their_difference():
    """Reference network, ours and the refine stage timed in one run; the table puts them side by side."""
    from gadget.bench.refine_bench import RefineTimes, format_table, summary
    from gadget.bench.refine_bench import run as run_refine

    results = run_refine([(4, 64, 32)], repeats=1, threads=1)
    assert [r.shape for r in results] == [(4, 64, 32)]
    r = results[0]
    assert r.network_s > 0 and r.refinement_s > 0 and r.refined_s == r.network_s + r.refinement_s
    assert r.reference_s > 0 and r.max_rel_diff < 1e-4  # the same weights in fastMRI's VarNet
    assert 0 < r.repeat_s  # the refine again at a calibrated position
    table = format_table([RefineTimes((4, 64, 32), 0.5, 0.25, 1.0, 2e-6, {"network": [0.5]}, 0.1)], "cpu")
    assert table.splitlines()[-1] == ("| 4 × 64 × 32 | 1000.0 | 500.0 | 0.50 | 2.0e-06 | 250.0 | 0.50 | 750.0 | "
                                      "100.0 | 0.20 |")
    assert summary([RefineTimes((4, 64, 32), 0.5, 0.25, 1.0, 2e-6)]) == {
        "refine_ratio": 0.5, "reference_ratio": 0.5, "max_rel_diff": 2e-6}
    no_reference = format_table([RefineTimes((4, 64, 32), 0.5, 0.25)], "cpu")
    assert no_reference.splitlines()[-1] == "| 4 × 64 × 32 | — | 500.0 | — | — | 250.0 | 0.50 | 750.0 | — | — |"


def test_targets_table_has_the_refinement_row():
    table = targets_table({}, [], {"overhead_pct": 1.0}, refine={"refine_ratio": 0.25})
    assert "| refinement vs network, shipped weights (worst shape) | ≤ 0.3× | 0.25× | yes |" in table
    table = targets_table({}, [], {"overhead_pct": 1.0}, refine={"refine_ratio": 0.45})
    assert "| 0.45× | NO |" in table


def test_infer_bench_runs_both_whole_processes_on_the_same_file_and_weights(monkeypatch):
    """Tiny case: both processes exit 0, each round is timed, and the two reconstructions agree to the
    reference's bound (the same weights, refine none for a fastMRI state dict); a failing process is an
    error naming it."""
    import sys

    import pytest

    from gadget.bench import infer_bench

    case = infer_bench.InferCase(config="small", coils=4, readout=64, phase=48, slices=2, acs=8, repeats=1)
    result = infer_bench.run(case)
    assert all(len(result.seconds[name]) == 1 and result.seconds[name][0] > 0 for name in infer_bench.IMPLEMENTATIONS)
    assert result.max_rel_diff < 1e-5
    table = infer_bench.format_table(result)
    assert "| reference |" in table and "| ours |" in table
    real = infer_bench._command
    monkeypatch.setattr(infer_bench, "_command", lambda name, *args: (
        [sys.executable, "-c", "import sys; sys.exit('no such weights')"] if name == "ours" else real(name, *args)))
    with pytest.raises(RuntimeError, match="ours inference failed .exit 1.:\n.*no such weights"):
        infer_bench.run(infer_bench.InferCase(config="small", coils=4, readout=64, phase=48, slices=1, acs=8))
    assert "device=cpu" in table
    assert real("ours", case, "d", "w", "o")[-2:] == ["--device", "cpu"]  # both sides on the case's device
    assert real("reference", case, "d", "w", "o")[-1] == "cpu"
