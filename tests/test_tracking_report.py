"""Tracking backends write what the server logged (read back with each tool's
own reader), and `fedlora report` turns run folders into correct tables and
plots that a real headless browser renders without errors."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from fedlora.config import ConfigError, parse_run_config
from fedlora.tools.report import find_runs, make_report
from fedlora.tracking import make_tracker, round_scalars

ROUNDS = [{"eval/accuracy": 0.5 + r / 10, "privacy/epsilon": float(r), "comm/bytes_up": 1000.0 * r} for r in range(3)]


def _track(tmp_path, backends):
    run = parse_run_config({"tracking.backends": backends})
    tracker = make_tracker(run.tracking, str(tmp_path / "run1"), "run1", str(tmp_path))
    tracker.log_config(run.raw)
    for r, scalars in enumerate(ROUNDS):
        tracker.log_round(r, scalars)
    tracker.close()


def test_tensorboard_events_hold_every_round(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _track(tmp_path, "tensorboard")
    acc = EventAccumulator(str(tmp_path / "run1" / "tensorboard"))
    acc.Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("eval/accuracy")] == [(0, 0.5), (1, 0.6), (2, 0.7)]
    assert [e.value for e in acc.Scalars("privacy/epsilon")] == [0.0, 1.0, 2.0]


@pytest.mark.slow  # MLflow start-up
def test_mlflow_records_metrics_and_params(tmp_path):
    import mlflow

    _track(tmp_path, "mlflow")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = open(tmp_path / "run1" / "mlflow-run-id").read()
    history = client.get_metric_history(run_id, "eval.accuracy")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(0, 0.5), (1, 0.6), (2, 0.7)]
    assert client.get_run(run_id).data.params["strategy"] == "ffa-lora"


def test_wandb_offline_needs_no_network_and_records_history(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    _track(tmp_path, "wandb")
    (record_file,) = glob.glob(str(tmp_path / "run1" / "wandb" / "offline-run-*" / "run-*.wandb"))
    # wandb's core process may still be writing the file after finish() returns: poll.
    deadline, values = time.monotonic() + 30, []
    while time.monotonic() < deadline:
        data = open(record_file, "rb").read()
        # History items are (key, value_json) protobuf fields: field 16 (b"\x82\x01"), a length byte, the JSON.
        values = [float(data[m.end() + 1 : m.end() + 1 + data[m.end()]]) for m in re.finditer(rb"eval/accuracy\x82\x01", data)]
        if len(set(values)) >= 3:
            break
        time.sleep(0.2)
    assert sorted(set(values)) == [0.5, 0.6, 0.7]
    assert b"num-server-rounds" in data  # the run config went in too


def test_unknown_or_missing_tracker_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="tracking.backends"):
        parse_run_config({"tracking.backends": "tensorboard,neptune"})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    run = parse_run_config({"tracking.backends": "wandb"})
    with pytest.raises(ConfigError, match="wandb is not installed"):
        make_tracker(run.tracking, "/nonexistent", "x", "/nonexistent")


def test_round_scalars_keeps_numbers_only():
    row = {"round": 3, "accuracy": 0.8, "epsilon": 1.5, "bytes_up": 10, "train_loss": None, "clients": 3, "failure_reasons": {}}
    assert round_scalars(row) == {"eval/accuracy": 0.8, "privacy/epsilon": 1.5, "comm/bytes_up": 10.0, "clients/replies": 3.0}


# -- report ------------------------------------------------------------------------------


def _write_run(folder, name, config, accs, eps_final=0.0, up=1000, complete=True):
    d = os.path.join(folder, name)
    os.makedirs(d)
    json.dump({"run-config": config, "data": {"eval-majority-accuracy": 0.5}}, open(os.path.join(d, "config.json"), "w"))
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for r, acc in enumerate(accs):
            f.write(
                json.dumps(
                    {
                        "round": r,
                        "accuracy": acc,
                        "loss": 1 - acc,
                        "epsilon": eps_final * r / (len(accs) - 1),
                        "bytes_up": up if r else 0,
                        "cum_bytes_up": up * r,
                        "seconds": 2.0 if r else 0.0,
                    }
                )
                + "\n"
            )
    if complete:
        open(os.path.join(d, "result.json"), "w").write("{}")


@pytest.fixture
def grid_runs(tmp_path):
    out = str(tmp_path / "grid")
    for strategy, up, base in (("lora", 2000, 0.6), ("ffa-lora", 1000, 0.7)):
        for eps in (0.0, 3.0):
            for seed, delta in ((0, 0.0), (1, 0.1)):
                cfg = {"strategy": strategy, "dp.epsilon": eps, "seed": seed, "output-dir": "/x", "run-name": f"{strategy}{eps}{seed}"}
                _write_run(out, f"{strategy}-{eps}-{seed}", cfg, [0.5, base - 0.1 + delta, base + delta], eps_final=eps, up=up)
    _write_run(out, "unfinished", {"strategy": "lora", "dp.epsilon": 3.0, "seed": 2}, [0.5, 0.55], complete=False)
    return out


def test_report_table_is_mean_and_std_over_seeds(grid_runs, tmp_path):
    path = make_report([grid_runs], str(tmp_path / "rep"))
    summary = json.load(open(tmp_path / "rep" / "summary.json"))
    rows = {(r["dp.epsilon"], r["strategy"]): r for r in summary}
    # ffa-lora at eps 3: final accuracies 0.7 and 0.8 -> 0.75 ± 0.0707 (sample std).
    assert rows[("ε=3", "ffa-lora")]["final accuracy"] == "0.7500 ± 0.0707"
    assert rows[("non-private", "lora")]["final accuracy"] == "0.6500 ± 0.0707"
    assert rows[("ε=3", "ffa-lora")]["ε spent"] == "3.000 ± 0.000"
    assert rows[("ε=3", "ffa-lora")]["kB up / round"] == "1.00 ± 0.00" and rows[("ε=3", "lora")]["kB up / round"] == "2.00 ± 0.00"
    assert rows[("ε=3", "lora")]["runs"] == "2 (+1 incomplete)"  # the complete ones are summarised
    assert rows[("ε=3", "lora")]["final accuracy"] == "0.6500 ± 0.0707"
    for png in ("accuracy_vs_round.png", "accuracy_vs_epsilon.png", "accuracy_vs_bytes.png", "epsilon_vs_round.png"):
        assert os.path.getsize(tmp_path / "rep" / png) > 5000
    page = open(path).read()
    assert page.count("data:image/png;base64,") == 4  # self-contained
    assert len(find_runs([grid_runs])) == 9


def test_report_cli_without_runs_fails_clearly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fedlora.tools.cli", "report", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "no runs" in out.stdout


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.slow  # a browser
def test_report_renders_in_headless_chromium(grid_runs, tmp_path):
    """The page loads in a real browser with no console errors, every plot is
    decoded, and a screenshot shows it (CI installs Debian's chromium)."""
    if not (_chromium() and shutil.which("chromedriver")):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see .ci/run)")
        pytest.skip("no chromium/chromedriver on this machine (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    path = make_report([grid_runs], str(tmp_path / "rep"))
    opts = webdriver.ChromeOptions()
    opts.binary_location = _chromium()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,2000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get("file://" + path)
        assert driver.title == "fedlora comparison"
        images = driver.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        assert len(images) == 4 and all(done and w > 300 and h > 200 for done, w, h in images), images
        assert len(driver.find_elements("css selector", "#summary tbody tr")) == 4
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[0] > 500 and pixels.shape[1] > 500
    assert pixels[..., :3].std() > 0.05  # not a blank page
