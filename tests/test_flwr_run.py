"""The real user path: `flwr run .` (through scripts/flwr-sim.sh) starts a
local SuperLink, runs the app, reports the run's true status, and stops the
SuperLink it started."""

import glob
import json
import os
import subprocess
from pathlib import Path

from conftest import write_task

ROOT = Path(__file__).resolve().parents[1]


def _superlinks() -> set[str]:
    out = subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True, text=True)
    return set(out.stdout.split())


def _flwr_sim(tmp_path, *overrides, port_base=39300):
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FEDLORA_NODES": "2",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port_base + 1),
        "FLWR_LOCAL_CONTROL_API_PORT": str(port_base + 3),
        "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}",
    }
    before = _superlinks()
    proc = subprocess.run([str(ROOT / "scripts" / "flwr-sim.sh"), *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert _superlinks() <= before, "the SuperLink started for the run is still running"
    return proc


def test_flwr_run_completes_and_writes_outputs(tmp_path):
    task = tmp_path / "task"
    task.mkdir()
    write_task(task, 400, 100)
    out = tmp_path / "out"
    proc = _flwr_sim(
        tmp_path, f'dataset="{task}"', f'output-dir="{out}"', f'cache-dir="{tmp_path / "cache"}"',
        'run-name="flwr"', "num-server-rounds=2", "local-steps=3", 'strategy="lora"',
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "finished:completed" in proc.stdout
    # The script passes output-dir explicitly, so the run lands where we asked.
    (run_dir,) = glob.glob(str(out / "flwr*"))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["clients"] == 2
    assert os.path.isfile(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))


def test_flwr_run_failure_is_reported_not_swallowed(tmp_path):
    # flwr run itself exits 0 for a failed run; the script must not.
    proc = _flwr_sim(tmp_path, f'dataset="{tmp_path / "missing"}"', f'output-dir="{tmp_path / "out"}"', port_base=39400)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "finished:failed" in proc.stdout
    assert "did not complete" in proc.stderr
