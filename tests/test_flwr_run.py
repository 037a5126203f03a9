"""The real user path: `flwr run .` starts a local SuperLink and runs the app.

Plain `flwr run .` completes on Flower's default local federation (2 nodes)
and with `--federation-config num-supernodes=5`, without any node count in
the run config; scripts/flwr-sim.sh reports the run's true status and stops
the SuperLink it started."""

import glob
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import write_task

pytestmark = pytest.mark.slow  # end-to-end simulations: `pytest -m "not slow"` skips them

ROOT = Path(__file__).resolve().parents[1]


def _superlinks(home) -> set[str]:
    """The local SuperLinks `flwr run` started for FLWR_HOME ``home`` (their command line names it)."""
    out = subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True, text=True)
    mine = set()
    for pid in out.stdout.split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"{home}/local-superlink/" in cmdline:
            mine.add(pid)
    return mine


def _flwr_sim(tmp_path, *overrides, port_base=39300):
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FEDLORA_NODES": "2",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port_base + 1),
        "FLWR_LOCAL_CONTROL_API_PORT": str(port_base + 3),
        "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}",
    }
    proc = subprocess.run([str(ROOT / "scripts" / "flwr-sim.sh"), *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert not _superlinks(env["FLWR_HOME"]), "the SuperLink started for the run is still running"
    return proc


def test_flwr_run_completes_and_writes_outputs(tmp_path):
    task = tmp_path / "task"
    task.mkdir()
    write_task(task, 400, 100)
    out = tmp_path / "out"
    proc = _flwr_sim(
        tmp_path,
        f'dataset="{task}"',
        f'output-dir="{out}"',
        f'cache-dir="{tmp_path / "cache"}"',
        'run-name="flwr"',
        "num-server-rounds=2",
        "local-steps=3",
        'strategy="lora"',
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "finished:completed" in proc.stdout
    # The ServerApp reached the LinkState that Flower's simulation loop polls (fedlora.simulation.skip_idle_nodes).
    assert "Flower's polling of idle nodes skips the message scan" in proc.stdout + proc.stderr
    # The script passes output-dir explicitly, so the run lands where we asked.
    (run_dir,) = glob.glob(str(out / "flwr*"))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["clients"] == 2
    assert os.path.isfile(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))


def test_flwr_run_fine_tunes_a_causal_lm_with_dp_and_the_adapter_reloads(tmp_path, tiny_llama_dir):
    # Issue 14's "done when", on a tiny decoder: `flwr run` with task = causal-lm and DP, generation
    # accuracy in metrics.jsonl, and the adapter loads with PEFT on AutoModelForCausalLM.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import make_rows, write_jsonl

    qa = [{"prompt": f"{r['text']}. good or bad?", "response": "good" if r["label"] else "bad"} for r in make_rows(300, seed=1)]
    write_jsonl(str(tmp_path / "qa" / "train.jsonl"), qa[:260])
    write_jsonl(str(tmp_path / "qa" / "validation.jsonl"), qa[260:])
    out = tmp_path / "out"
    proc = _flwr_sim(
        tmp_path,
        'task="causal-lm"',
        f'model="{tiny_llama_dir}"',
        f'dataset="{tmp_path / "qa"}"',
        f'output-dir="{out}"',
        f'cache-dir="{tmp_path / "cache"}"',
        'run-name="lm"',
        "num-server-rounds=1",
        "local-steps=3",
        "batch-size=16",
        "max-length=40",
        "dp.epsilon=3.0",
        "eval.max-new-tokens=3",
        port_base=39700,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = glob.glob(str(out / "lm*"))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["round"] for r in rows] == [0, 1] and rows[-1]["clients"] == 2 and 0 < rows[-1]["epsilon"] <= 3.0
    assert all("exact_match" in r and "perplexity" in r for r in rows)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), os.path.join(run_dir, "adapter"))
    assert any(".lora_B." in n and float(p.abs().max()) > 0 for n, p in model.named_parameters())


def test_flwr_run_failure_is_reported_not_swallowed(tmp_path):
    # flwr run itself exits 0 for a failed run; the script must not.
    proc = _flwr_sim(tmp_path, f'dataset="{tmp_path / "missing"}"', f'output-dir="{tmp_path / "out"}"', port_base=39400)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "finished:failed" in proc.stdout
    assert "did not complete" in proc.stderr


def _plain_flwr_run(tmp_path, *flwr_args, port_base):
    """`flwr run . --stream` itself, in an isolated FLWR_HOME; returns (output, newest run's status)."""
    task = tmp_path / "task"
    task.mkdir()
    write_task(task, 300, 60)
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port_base + 1),
        "FLWR_LOCAL_CONTROL_API_PORT": str(port_base + 3),
        "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}",
    }
    flwr = str(Path(os.sys.executable).parent / "flwr")
    # Data and a short schedule only: nothing about the number of nodes.
    config = (
        f'dataset="{task}" output-dir="{tmp_path / "out"}" cache-dir="{tmp_path / "cache"}" '
        "num-server-rounds=1 local-steps=2 batch-size=16 node-wait-timeout=120"
    )
    try:
        proc = subprocess.run(
            [flwr, "run", ".", "--stream", "--run-config", config, *flwr_args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
        ls = subprocess.run([flwr, "ls", "--format", "json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    finally:
        for pid in _superlinks(home):  # `flwr run` leaves its local SuperLink running
            os.kill(int(pid), signal.SIGTERM)
    runs = json.loads(ls.stdout).get("runs", [])
    return proc.stdout + proc.stderr, [r.get("status") for r in runs]


@pytest.mark.parametrize(
    ("flwr_args", "nodes", "port_base"), [((), 2, 39500), (("--federation-config", "num-supernodes=5"), 5, 39600)], ids=["default-federation", "5-nodes"]
)
def test_plain_flwr_run_completes_for_any_number_of_nodes(tmp_path, flwr_args, nodes, port_base):
    output, statuses = _plain_flwr_run(tmp_path, *flwr_args, port_base=port_base)
    assert statuses == ["finished:completed"], output[-4000:]
    assert "Waiting for nodes to connect" not in output
    (run_dir,) = glob.glob(str(tmp_path / "out" / "*"))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["round"] for r in rows] == [0, 1] and rows[-1]["clients"] == nodes == rows[-1]["sampled"]
    # Each node trained on its own partition of the task: 1/nodes of the 300 examples.
    sizes = sorted(int(m["num-examples"]) for m in rows[-1]["client_metrics"].values())
    assert sum(sizes) == 300 and sizes[-1] - sizes[0] <= 1
