"""scripts/flwr-sim.sh passes client resources (CPUs, GPU shares) to Flower's
federation config, checked before Flower starts; run against a stand-in `flwr`."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fake_flwr_sim(tmp_path, **env_vars):
    """scripts/flwr-sim.sh against a stand-in `flwr` that records its arguments
    and reports a completed run: the script's own logic, no simulation."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    calls = tmp_path / "calls"
    fake = bin_dir / "flwr"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'for a in "$@"; do printf "%s\\0" "$a"; done >> "{calls}"; printf "\\n" >> "{calls}"\n'
        'if [ "$1" = ls ]; then echo \'{"runs": [{"run-id": "1", "status": "finished:completed"}]}\'; fi\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "PATH": f"{bin_dir}:{os.environ['PATH']}", **env_vars}
    for key in ("FEDLORA_CPUS_PER_CLIENT", "FEDLORA_CLIENT_CPUS", "FEDLORA_GPUS_PER_CLIENT"):
        if key not in env_vars:
            env.pop(key, None)
    proc = subprocess.run([str(ROOT / "scripts" / "flwr-sim.sh"), "num-server-rounds=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    runs = [line.split("\0")[:-1] for line in calls.read_text().splitlines()] if calls.exists() else []
    return proc, [r for r in runs if r and r[0] == "run"]


def _federation_config(args):
    """The --federation-config value, parsed as `flwr run` parses it."""
    from flwr.common.config import parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    values = parse_config_args([args[args.index("--federation-config") + 1]])
    return simulation_config_from_json({k.replace("-", "_"): v for k, v in values.items()})


def test_flwr_sim_passes_client_resources_to_the_federation_config(tmp_path):
    proc, runs = _fake_flwr_sim(tmp_path, FEDLORA_NODES="4", FEDLORA_GPUS_PER_CLIENT="0.25", FEDLORA_CPUS_PER_CLIENT="2")
    assert proc.returncode == 0, proc.stderr
    (args,) = runs
    cfg = _federation_config(args)
    assert (cfg.num_supernodes, cfg.client_resources_num_cpus, cfg.client_resources_num_gpus) == (4, 2, 0.25)
    # Unset: no GPUs requested (Flower's default), CPUs from the older variable name.
    proc, runs = _fake_flwr_sim(tmp_path / "b", FEDLORA_NODES="2", FEDLORA_CLIENT_CPUS="3")
    cfg = _federation_config(runs[0])
    assert proc.returncode == 0 and cfg.client_resources_num_cpus == 3 and not cfg.HasField("client_resources_num_gpus")


@pytest.mark.parametrize(("key", "value"), [("FEDLORA_GPUS_PER_CLIENT", "1.5"), ("FEDLORA_GPUS_PER_CLIENT", "a"), ("FEDLORA_CPUS_PER_CLIENT", "0.5")])
def test_flwr_sim_refuses_bad_client_resources_before_starting_flower(tmp_path, key, value):
    proc, runs = _fake_flwr_sim(tmp_path, **{key: value})
    assert proc.returncode == 2 and f"{key}={value}: must be" in proc.stderr and runs == []
