"""Each run-config key is declared once (fedlora/config.py); DEFAULTS, the checks
and docs/CONFIGURATION.md come from that declaration, and the strategy classes
register themselves (a new strategy is one new module)."""

import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedlora import config
from fedlora.config import (
    DEFAULTS,
    OPTIONS,
    STRATEGY_REGISTRY,
    Aggregation,
    Choice,
    ConfigError,
    RunConfig,
    Tracker,
    UserDPMode,
    parse_run_config,
)

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


# -- the declaration -------------------------------------------------------------


def test_every_key_is_declared_once_with_type_help_and_default():
    assert list(OPTIONS) == list(DEFAULTS)
    assert len({opt.path for opt in OPTIONS.values()}) == len(OPTIONS)
    for key, opt in OPTIONS.items():
        assert opt.help and opt.type is not None, key
        assert opt.key == key
    # Every field of every group is a declared key (besides the groups themselves and `raw`).
    declared = {opt.path for opt in OPTIONS.values()}
    for f in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(f.type):
            assert {(f.name, g.name) for g in dataclasses.fields(f.type)} <= declared, f.name
        elif f.name != "raw":
            assert (f.name,) in declared


def test_the_field_defaults_are_what_parsing_the_defaults_gives(monkeypatch):
    monkeypatch.delenv("FEDLORA_DATA_DIR", raising=False)
    parsed = parse_run_config({})
    assert RunConfig() == parsed
    assert RunConfig().to_dict() == parsed.to_dict()
    assert parsed.raw == DEFAULTS


def test_choices_are_str_enums_that_read_as_plain_strings():
    run = parse_run_config({"aggregation.method": " trimmed-mean ", "user-dp.mode": "client-fixed", "tracking.backends": "wandb, none, wandb,mlflow"})
    assert run.aggregation is Aggregation.TRIMMED_MEAN and run.aggregation == "trimmed-mean"
    assert run.user_dp.mode is UserDPMode.CLIENT_FIXED and run.user_dp.enabled
    assert run.tracking.backends == (Tracker.WANDB, Tracker.MLFLOW) == ("wandb", "mlflow")
    assert all(isinstance(b, Choice) for b in run.tracking.backends)
    # Serialised, printed, hashed and repr'd as the plain strings (config.json, cache keys, error messages).
    assert json.loads(json.dumps(run.to_dict()))["user_dp"]["mode"] == "client-fixed"
    assert repr(run.aggregation) == "'trimmed-mean'" and f"{run.aggregation}" == "trimmed-mean"
    assert {"mlflow": 1}[run.tracking.backends[1]] == 1
    assert "'client-fixed'" in repr(run.user_dp)
    assert config.AGGREGATIONS == ("mean", "median", "trimmed-mean")
    assert config.USER_DP_MODES == ("off", "server-fixed", "client-fixed", "server-adaptive")
    assert all(type(v) in (str, int, float, bool) for v in DEFAULTS.values())


def test_data_dir_falls_back_to_the_environment(monkeypatch):
    monkeypatch.setenv("FEDLORA_DATA_DIR", "/data")
    assert parse_run_config({}).data.data_dir == "/data"
    assert parse_run_config({"data-dir": "/mine"}).data.data_dir == "/mine"
    assert parse_run_config({}).raw["data-dir"] == ""


def test_cross_key_checks():
    assert parse_run_config({"lora.r": 4, "lora.client-ranks": "4, 2"}).lora.client_ranks == (4, 2)
    with pytest.raises(ConfigError, match=r"each rank must be in 1\.\.lora\.r \(4\)") as e:
        parse_run_config({"lora.r": 4, "lora.client-ranks": "4, 0"})
    assert e.value.key == "lora.client-ranks" and e.value.value == "4, 0"
    with pytest.raises(ConfigError, match="when fraction-evaluate > 0") as e:
        parse_run_config({"fraction-evaluate": 0.5, "local-eval-fraction": 0.0})
    assert e.value.key == "local-eval-fraction"
    # Any number of client ranks: each node checks that its own entry exists.
    assert parse_run_config({"lora.client-ranks": "8"}).lora.client_ranks == (8,)


# -- docs/CONFIGURATION.md -------------------------------------------------------


def test_configuration_doc_is_generated_from_the_declaration():
    doc = (ROOT / "docs" / "CONFIGURATION.md").read_text()
    assert doc == config.markdown(), "stale: python -m fedlora.config --markdown > docs/CONFIGURATION.md"
    for key in DEFAULTS:
        assert f"| `{key}` |" in doc
    assert "`fedex-lora`, `fedsa-lora`, `fedsvd`, `ffa-lora`, `flora`, `lora`" in doc  # the strategy choices
    for key in ("partition-id", "num-partitions", "data-path", "lora-rank"):  # node config, documented by hand
        assert f"| `{key}` |" in doc


def test_python_m_fedlora_config_prints_the_doc():
    out = subprocess.run([sys.executable, "-m", "fedlora.config", "--markdown"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (ROOT / "docs" / "CONFIGURATION.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "fedlora.config"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "--markdown" in bad.stderr


# -- the layers and the strategy registry ------------------------------------------


def test_config_does_not_import_strategies_but_validates_against_them():
    # A fresh process: importing config loads no strategy; validating a config loads the
    # registry (as fedlora.tools.compare and fedlora.simulation do, without importing strategies).
    out = _python(
        "import sys\n"
        "from fedlora.config import ConfigError, parse_run_config\n"
        "assert 'fedlora.strategies' not in sys.modules\n"
        "assert parse_run_config({'strategy': 'fedsvd'}).strategy == 'fedsvd'\n"
        "try:\n"
        "    parse_run_config({'strategy': 'fedsgd'})\n"
        "except ConfigError as e:\n"
        "    assert e.key == 'strategy', e\n"
        "    print(e)\n"
    )
    assert out.returncode == 0, out.stderr
    assert "must be one of fedex-lora, fedsa-lora, fedsvd, ffa-lora, flora, lora" in out.stdout
    source = (ROOT / "fedlora" / "config.py").read_text()
    assert "from .strategies" not in source and "import fedlora.strategies" not in source


def test_every_strategy_module_is_imported_and_its_class_registered_and_exported():
    import fedlora.strategies as package
    from fedlora.strategies import STRATEGIES, FedLoraStrategy, get_strategy

    classes = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"fedlora.strategies.{info.name}")
        classes |= {c for _, c in inspect.getmembers(module, inspect.isclass) if issubclass(c, FedLoraStrategy) and c.__module__ == module.__name__ and c.name}
    assert classes and classes == set(STRATEGIES.values())
    for cls in classes:
        assert STRATEGIES[cls.name] is cls is get_strategy(cls.name) is getattr(package, cls.__name__)
        assert cls.__name__ in package.__all__
    with pytest.raises(ConfigError) as e:
        get_strategy("fedsgd")
    assert e.value.key == "strategy"


def test_a_new_subclass_registers_itself_and_its_name_is_a_valid_strategy(monkeypatch):
    from fedlora.strategies import FedLoraStrategy, LoraStrategy

    monkeypatch.setattr(STRATEGY_REGISTRY, "_entries", dict(STRATEGY_REGISTRY._entries))  # undone after the test

    class ProbeStrategy(FedLoraStrategy):
        name = "probe-lora"

    assert STRATEGY_REGISTRY["probe-lora"] is ProbeStrategy
    assert parse_run_config({"strategy": "probe-lora"}).strategy == "probe-lora"

    class TunedLora(LoraStrategy):  # inherits its name: not registered again
        pass

    assert STRATEGY_REGISTRY["lora"] is LoraStrategy
    with pytest.raises(TypeError, match="taken"):

        class Clash(FedLoraStrategy):
            name = "lora"


# -- the merge template ------------------------------------------------------------


def test_merge_hook_and_the_start_it_needs():
    from fedlora.strategies import FedSvdStrategy, FloraStrategy, LoraStrategy

    ka, kb = "l.lora_A.default.weight", "l.lora_B.default.weight"
    agg = ArrayRecord({kb: Array(np.ones((2, 1), np.float32))})
    for cls, needs in ((FloraStrategy, "the round's starting state"), (FedSvdStrategy, "the round's A")):
        strat = cls(payload_shapes={kb: (2, 1)}, fingerprint="x")
        with pytest.raises(RuntimeError, match=f"{cls.name}: merge needs {needs}"):
            strat.merge(agg, [])
    # Without a hook the merge is the start with the aggregated tensors replaced, the arrays as they were.
    plain = LoraStrategy(payload_shapes={kb: (2, 1)}, fingerprint="x")
    head = Array(np.zeros(3, np.float64))
    plain.current = ArrayRecord({ka: Array(np.zeros((1, 2), np.float32)), kb: Array(np.zeros((2, 1), np.float32)), "head": head})
    merged = plain.merge(agg, [])
    assert list(merged.keys()) == [ka, kb, "head"]
    assert merged[kb].data == agg[kb].data and merged["head"].dtype == head.dtype and merged["head"].data == head.data
