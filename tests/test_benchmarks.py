"""The benchmark scripts that are cheap enough to run here."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accountant_benchmark_checks_our_figures_equal_opacus_and_prints_ratios():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "accountant.py"), "--sizes", "800", "--steps", "4", "--repeat", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]  # the script exits non-zero when a figure differs from Opacus'
    (row,) = [line.split() for line in out.stdout.splitlines() if line.split()[:1] == ["800"]]
    assert row[1] == "0.0200" and float(row[2]) > 0 and float(row[5]) > 0 and float(row[8]) > 0


def test_dp_ops_benchmark_finds_one_norm_per_clipped_tensor_and_times_all_six_steps():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import dp_ops
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    r = dp_ops.extra_ops("ffa-lora", 2, 8, timed_steps=1)
    # Flat clipping: each sample's norm per trainable tensor, then their total; a plain step has none.
    norms = sum(row["extra_calls"] for row in r["rows"] if row["op"] == "aten::linalg_vector_norm")
    assert r["hooked_tensors"] == 14  # FFA-LoRA: B of 12 query/value targets, the head's weight and bias
    assert norms == r["hooked_tensors"] + 1
    # The mean reduction's factor multiplies the rank-8 side of each LoRA B, never its
    # 2 x 8 x 384 output gradient (as Opacus' own hooks do) ...
    muls = {row["shapes"]: row["extra_calls"] for row in r["rows"] if row["op"] == "aten::mul"}
    assert muls.get("[[2, 8, 8], []]") == 12 and "[[2, 8, 384], []]" not in muls
    # ... and no LoRA B's per-sample gradient is copied into a zero-filled buffer.
    fills = {row["shapes"] for row in r["rows"] if row["op"] == "aten::fill_"}
    assert not fills & {"[[2, 384, 8], []]", "[[2, 8, 384], []]"}, fills
    assert set(r["seconds"]) == {
        "plain",
        "dp, no noise",
        "dp, no noise, Opacus' rescaling and buffers",
        "dp, no noise, Opacus' Linear einsum",
        "dp, no noise, Opacus' module hooks",
        "dp, seeded noise",
        "dp, secure noise",
    }
    assert all(v > 0 for v in r["seconds"].values())
    assert set(r["paired_ratio"]) == set(r["seconds"]) and r["paired_ratio"]["plain"] == 1.0
    # The DP work was timed inside every DP step: hooks, then clipping and noise.
    assert set(r["hook_seconds"]) == set(r["clip_noise_seconds"]) == set(r["seconds"]) - {"plain"}
    assert all(v > 0 for v in [*r["hook_seconds"].values(), *r["clip_noise_seconds"].values()])
    # Both Linear samplers ran (and were timed) in the timed steps.
    assert set(r["linear_sampler_seconds"]) == {"dp, no noise", "dp, no noise, Opacus' Linear einsum"}
    assert all(v > 0 for v in r["linear_sampler_seconds"].values())


def test_layers_benchmark_times_both_ways_on_the_same_batches(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import layers
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    # No SST-2 under tmp_path: the synthetic task, as a run would fall back.
    r = layers.step_seconds("-3,-2,-1", batch_size=16, micro=8, steps=2, data_dir=str(tmp_path))
    # FFA-LoRA trains B of query and value (384 x 8 each) per adapted block, and the head (384 x 2 + 2).
    assert r[""]["trained"] == 6 * 2 * 384 * 8 + 770 and r["-3,-2,-1"]["trained"] == 3 * 2 * 384 * 8 + 770
    assert r[""]["median_s"] > 0 and r["-3,-2,-1"]["median_s"] > 0


def test_flwr_run_scale_reads_the_start_up_off_the_runs_log(tmp_path):
    import threading
    import time

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import flwr_run_scale
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    log = tmp_path / "run.log"
    cpu, memory, stop = {}, {"peak": 0, "processes": 0, "round1": None}, threading.Event()
    started = time.monotonic()
    # No process carries this marker, so only the log is watched; the log appears later, as flwr run's does.
    sampler = threading.Thread(target=flwr_run_scale._sample, args=(cpu, memory, b"FLWR_HOME=/nonexistent", str(log), started, stop), daemon=True)
    sampler.start()
    try:
        time.sleep(0.7)
        log.write_text("Starting local SuperLink\nround 0 (initial model)\n")
        time.sleep(0.7)
        assert memory["round1"] is None  # round 0 is still start-up
        written = time.monotonic() - started
        with log.open("a") as f:
            f.write(f"INFO :      {flwr_run_scale.ROUND1_LINE} 10 nodes (out of 1000)\n")
        deadline = time.monotonic() + 10
        while memory["round1"] is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        sampler.join()
    assert memory["round1"] is not None and memory["round1"] >= written
    assert memory["peak"] == 0 and cpu == {}


def test_speed_dp_step_ratio_times_the_dp_work_inside_each_step():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import speed
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    r = speed.dp_step_ratio(2, train_lora_a=False, batch_size=2, flush=True, block=1, plain_per_block=1)
    assert r["dp_steps"] == 3 and r["ratio"] > 0  # the warm-up step, then two timed blocks of one
    # The hooks and the clipping and noise ran inside the timed DP steps, and are part of them
    # (means over the same steps: one slow step cannot tip it, as against a single block's median).
    assert 0 < r["dp_work_s"] < r["dp_mean_s"]
    assert 0 < r["dp_work_share"] < 1
