"""Datasets: loading (local files, the hub, the synthetic fallback), label
checks, partitioning with flwr-datasets, and tokenisation with a disk cache."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import socket
from dataclasses import dataclass, field

import datasets
import safetensors.torch
import torch

from . import synthetic
from .config import ConfigError, DataConfig, PartitionConfig
from .files import write_atomic

log = logging.getLogger("fedlora")

DATA_EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# The default task on the hub: GLUE SST-2 (its text column is "sentence").
SST2_HUB = ("nyu-mll/glue", "sst2")
LABEL = "label"  # internal name of the integer label column
HOLDOUT_SEED = 0  # a file without an eval split is split the same way on every node

datasets.disable_progress_bars()


@dataclass
class Task:
    train: datasets.Dataset | None
    eval: datasets.Dataset
    label_names: tuple[str, ...]
    text_columns: tuple[str, ...]
    source: str  # where the data came from, for logs and config.json
    synthetic: bool = False

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# -- locating and reading -----------------------------------------------------


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.splitext(name)[1] in DATA_EXTENSIONS or os.path.exists(name)


def _split_files(directory: str, split: str) -> list[str]:
    files = []
    for ext in DATA_EXTENSIONS:
        files += glob.glob(os.path.join(directory, f"{split}*{ext}"))
    return sorted(files)


def _read_files(files: list[str], key: str, value: str) -> datasets.Dataset:
    exts = {DATA_EXTENSIONS[os.path.splitext(f)[1]] for f in files}
    if len(exts) != 1:
        raise ConfigError(key, value, f"mixes file formats {sorted(exts)}; use one format per split")
    for f in files:
        if not os.access(f, os.R_OK):
            raise ConfigError(key, value, f"file {f} is not readable")
    try:
        return datasets.load_dataset(exts.pop(), data_files=files, split="train")
    except Exception as e:  # datasets raises many types for a bad file
        raise ConfigError(key, value, f"cannot read {files}: {type(e).__name__}: {e}") from e


def read_local(path: str, data: DataConfig, key: str = "dataset") -> dict[str, datasets.Dataset]:
    """A data file (the train split) or a directory of ``<split>*.{jsonl,csv,parquet}``."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        if os.path.splitext(path)[1] not in DATA_EXTENSIONS:
            raise ConfigError(key, path, f"unsupported file type; use one of {', '.join(DATA_EXTENSIONS)}")
        return {"train": _read_files([path], key, path)}
    if os.path.isdir(path):
        out = {}
        for name, split in (("train", data.train_split), ("eval", data.eval_split)):
            files = _split_files(path, split)
            if files:
                out[name] = _read_files(files, key, path)
        if not out:
            raise ConfigError(key, path, f"directory has no {data.train_split}*/{data.eval_split}* .jsonl/.csv/.parquet files")
        return out
    raise ConfigError(key, path, "no such file or directory")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick check before trying the hub for the *default* dataset: the
    datasets library retries for ~30 s when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _read_hub(name: str, data: DataConfig) -> dict[str, datasets.Dataset]:
    hub_id, _, subset = name.partition(":")
    out = {}
    try:
        out["train"] = datasets.load_dataset(hub_id, subset or None, split=data.train_split)
        out["eval"] = datasets.load_dataset(hub_id, subset or None, split=data.eval_split)
    except Exception as e:
        if "train" not in out:
            raise ConfigError("dataset", name, f"cannot load from the Hugging Face hub: {type(e).__name__}: {e}") from e
        log.warning("dataset %s has no split %r (%s); holding out 10%% of train", name, data.eval_split, e)
    return out


def _default_splits(data: DataConfig) -> tuple[dict[str, datasets.Dataset], str, bool]:
    """SST-2: local data dir, then the hub, then the synthetic task."""
    if data.data_dir:
        local = os.path.join(os.path.expanduser(data.data_dir), "sst2")
        if _split_files(local, data.train_split):
            return read_local(local, data, key="data-dir"), f"local:{local}", False
        log.warning("data-dir %s has no sst2/%s*.jsonl; trying the hub", data.data_dir, data.train_split)
    if hub_reachable():
        try:
            splits = _read_hub(":".join(SST2_HUB), data)
            splits = {k: v.rename_column("sentence", "text") for k, v in splits.items()}
            return splits, f"hub:{'/'.join(SST2_HUB)}", False
        except ConfigError as e:
            log.warning("%s", e)
    log.warning(
        "!!! SST-2 not found locally (data-dir / FEDLORA_DATA_DIR) nor on the hub: "
        "falling back to the BUILT-IN SYNTHETIC sentiment task. Results are not SST-2 results. !!!"
    )
    raw = synthetic.make_splits(seed=1234)
    splits = {
        "train": datasets.Dataset.from_list(raw["train"]),
        "eval": datasets.Dataset.from_list(raw["validation"]),
    }
    splits = {k: v.cast_column(LABEL, datasets.ClassLabel(names=list(synthetic.LABEL_NAMES))) for k, v in splits.items()}
    return splits, "synthetic", True


def load_splits(data: DataConfig) -> tuple[dict[str, datasets.Dataset], str, bool]:
    """Raw ``{"train", "eval"}`` splits, a source description, and whether the
    synthetic fallback was used. A dataset named explicitly never falls back."""
    if data.is_default:
        splits, source, synth = _default_splits(data)
    elif _looks_like_path(data.dataset):
        splits, source, synth = read_local(data.dataset, data), f"local:{data.dataset}", False
    else:
        splits, source, synth = _read_hub(data.dataset, data), f"hub:{data.dataset}", False
    if "train" not in splits:
        raise ConfigError("dataset", data.dataset, f"has no '{data.train_split}' split")
    if "eval" not in splits:
        held = splits["train"].train_test_split(test_size=0.1, seed=HOLDOUT_SEED)
        splits = {"train": held["train"], "eval": held["test"]}
    return splits, source, synth


# -- labels and columns --------------------------------------------------------


def column(ds: datasets.Dataset, name: str) -> list:
    """A column as a Python list (features decoded), read as one batch: iterating
    ``ds[name]`` goes row by row (2 s for SST-2's 67k labels, twice per split at start-up)."""
    return ds.select_columns([name]).with_format(None)[:][name]


def label_names_of(ds: datasets.Dataset, label_column: str) -> tuple[str, ...]:
    """The label set, read from the training split."""
    feature = ds.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names)
    values = set(column(ds, label_column))
    if any(v is None for v in values):
        raise ConfigError("label-column", label_column, "has missing (null) labels")
    if any(isinstance(v, bool) for v in values):
        raise ConfigError("label-column", label_column, "labels must be integers or strings, found booleans")
    if all(isinstance(v, (int, float)) and float(v).is_integer() for v in values):
        ints = sorted(int(v) for v in values)
        if ints[0] < 0:
            raise ConfigError("label-column", label_column, f"integer labels must be >= 0, found {ints[0]}")
        return tuple(str(i) for i in range(ints[-1] + 1))
    if all(isinstance(v, str) for v in values):
        # Documented handling: string labels map to ids in sorted order.
        return tuple(sorted(values))
    kinds = sorted({type(v).__name__ for v in values})
    raise ConfigError(
        "label-column", label_column, f"labels must be all integers or all strings, found {', '.join(kinds)} (e.g. {sorted(map(repr, values))[0]})"
    )


def check_columns(ds: datasets.Dataset, data: DataConfig, where: str) -> None:
    for col in data.text_columns:
        if col not in ds.column_names:
            raise ConfigError("text-columns", ",".join(data.text_columns), f"column {col!r} not in {where} (columns: {ds.column_names})")
    if data.label_column not in ds.column_names:
        raise ConfigError("label-column", data.label_column, f"column not in {where} (columns: {ds.column_names})")


def normalise(ds: datasets.Dataset, data: DataConfig, label_names: tuple[str, ...], where: str) -> datasets.Dataset:
    """Keep the text columns and an integer ``label`` column; reject missing
    columns and labels outside ``label_names``."""
    check_columns(ds, data, where)
    if len(ds) == 0:
        raise ConfigError("dataset", data.dataset, f"{where} is empty")
    ds = ds.select_columns(list(data.text_columns) + [data.label_column])
    feature = ds.features[data.label_column]
    if isinstance(feature, datasets.ClassLabel):
        if tuple(feature.names) != label_names:
            raise ConfigError("label-column", data.label_column, f"{where} has labels {feature.names}, expected {list(label_names)}")
        ids = column(ds, data.label_column)
    else:
        index = {name: i for i, name in enumerate(label_names)}
        ids = []
        for v in column(ds, data.label_column):
            key = str(int(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() else v
            if not isinstance(key, str) or key not in index:
                raise ConfigError("label-column", data.label_column, f"label {v!r} in {where} is outside the label set {list(label_names)}")
            ids.append(index[key])
    ds = ds.remove_columns(data.label_column)
    for col in data.text_columns:
        if ds.features[col].dtype != "string":
            ds = ds.cast_column(col, datasets.Value("string"))
    return ds.add_column(LABEL, ids)


def load_task(data: DataConfig, *, label_names: tuple[str, ...] | None = None, kind: str = "classification") -> Task:
    """Load, validate and normalise the run's dataset (both splits) for the
    run's ``task`` (``kind``)."""
    splits, source, synth = load_splits(data)
    if synth:
        data = DataConfig(**{**data.__dict__, "text_columns": ("text",), "label_column": LABEL})
    if kind == "causal-lm":
        return _lm_task(splits, data, source, synth, label_names)
    check_columns(splits["train"], data, f"the {data.train_split} split of {source}")
    names = label_names or label_names_of(splits["train"], data.label_column)
    if len(names) < 2:
        raise ConfigError("label-column", data.label_column, f"needs at least two classes, the {data.train_split} split has only {list(names)}")
    train = normalise(splits["train"], data, names, f"the {data.train_split} split of {source}")
    evals = normalise(splits["eval"], data, names, f"the {data.eval_split} split of {source}")
    return Task(train, evals, names, data.text_columns, source, synth)


def _labelled(ds: datasets.Dataset, data: DataConfig) -> bool:
    """A classification dataset to phrase as instructions (no chats, no prompt/response columns)."""
    cols = ds.column_names
    return MESSAGES not in cols and data.prompt_column not in cols and data.label_column in cols and all(c in cols for c in data.text_columns)


def _lm_task(splits: dict, data: DataConfig, source: str, synth: bool, label_names: tuple[str, ...] | None) -> Task:
    names = label_names or (label_names_of(splits["train"], data.label_column) if _labelled(splits["train"], data) else ())
    out = {}
    for name, split in (("train", data.train_split), ("eval", data.eval_split)):
        where = f"the {split} split of {source}"
        if len(splits[name]) == 0:
            raise ConfigError("dataset", data.dataset, f"{where} is empty")
        out[name] = to_instructions(splits[name], data, where, label_names=names, sst2=data.is_default)
    columns = (MESSAGES,) if MESSAGES in out["train"].column_names else (PROMPT, RESPONSE)
    return Task(out["train"], out["eval"], names, columns, source, synth)


def load_node_data(path: str, data: DataConfig, label_names: tuple[str, ...], kind: str = "classification") -> datasets.Dataset:
    """A deployed node's private data (node config ``data-path``), used whole."""
    splits = read_local(path, data, key="node-config data-path")
    if "train" not in splits:
        raise ConfigError("node-config data-path", path, f"has no {data.train_split}* files")
    if kind == "causal-lm":
        return to_instructions(splits["train"], data, f"node data {path}", label_names=label_names, sst2=data.is_default)
    return normalise(splits["train"], data, label_names, f"node data {path}")


# -- partitioning ----------------------------------------------------------------


# One partitioner per (data, method, count, seed) and process: a process that
# serves many simulated nodes splits the data once, not once per node.
_PARTITIONERS: dict[tuple, object] = {}
_MAX_PARTITIONERS = 8


def partition(ds: datasets.Dataset, cfg: PartitionConfig, partition_id: int, num_partitions: int, seed: int) -> datasets.Dataset:
    """This node's share of the training split, by a flwr-datasets partitioner."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError("partition-id", partition_id, f"must be in [0, {num_partitions})")
    key = (ds._fingerprint, len(ds), cfg, num_partitions, seed)
    if key not in _PARTITIONERS:
        if len(_PARTITIONERS) >= _MAX_PARTITIONERS:
            _PARTITIONERS.pop(next(iter(_PARTITIONERS)))
        _PARTITIONERS[key] = _partitioner(ds, cfg, num_partitions, seed)
    p = _PARTITIONERS[key]
    try:
        part = p.load_partition(partition_id)
    except (IndexError, ValueError) as e:  # e.g. more partitions than examples
        raise ConfigError("partition.method", cfg.method, f"cannot build partition {partition_id} of {num_partitions} from {len(ds)} examples: {e}") from e
    if len(part) == 0:
        raise ConfigError("partition.method", cfg.method, f"partition {partition_id} of {num_partitions} is empty")
    return part


def _partitioner(ds: datasets.Dataset, cfg: PartitionConfig, num_partitions: int, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if cfg.method == "iid":
        p = IidPartitioner(num_partitions=num_partitions)
    elif cfg.method == "dirichlet":
        p = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL,
            alpha=cfg.alpha,
            # No minimum: flwr-datasets redraws until every partition reaches it and gives up
            # after 10 draws, which Dirichlet(0.5) over 1,000 partitions of SST-2 never passes.
            # An empty partition is refused by its node alone (``partition`` below).
            min_partition_size=0,
            self_balancing=False,
            seed=seed,
        )
    else:
        p = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL,
            num_classes_per_partition=cfg.classes_per_client,
            class_assignment_mode="deterministic",
            seed=seed,
        )
    p.dataset = ds
    return p


# -- tokenisation ------------------------------------------------------------------


# Per-example tensors of a tokenised split that are not model inputs.
PROMPT_LENGTH = "prompt_length"  # causal-lm: tokens before the response
STOP_IDS = "meta.stop_ids"  # causal-lm: the tokens that end a response (dataset-level, not per example)


@dataclass
class Encoded:
    """A tokenised split held as tensors, padded to max-length; ``batch``
    trims each batch to its longest sequence. Classification: ``labels`` is a
    label id per example; causal-lm: a token row with -100 outside the
    response, ``prompt_length`` per example and the response stop tokens in
    ``meta``."""

    tensors: dict[str, torch.Tensor]  # input_ids, attention_mask[, token_type_ids], labels[, prompt_length]
    meta: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: int = 0  # causal-lm: examples left out because prompt + response exceed max-length

    def __len__(self) -> int:
        return int(self.tensors["labels"].shape[0])

    @property
    def causal(self) -> bool:
        return self.tensors["labels"].dim() == 2

    def batch(self, idx: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """The model's inputs for examples ``idx`` (on the CPU)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        mask = self.tensors["attention_mask"][idx]
        width = max(int(mask.sum(1).max()), 1) if len(idx) else 1
        return {k: (v[idx][:, :width] if v.dim() == 2 else v[idx]) for k, v in self.tensors.items() if k != PROMPT_LENGTH}

    def subset(self, n: int) -> Encoded:
        """The first ``n`` examples (all if n is 0 or more than there are)."""
        if n <= 0 or n >= len(self):
            return self
        return Encoded({k: v[:n] for k, v in self.tensors.items()}, self.meta, self.dropped)


def _encode(ds: datasets.Dataset, tokenizer, text_columns: tuple[str, ...], max_length: int) -> Encoded:
    texts = [column(ds, c) for c in text_columns]
    enc = tokenizer(*texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    tensors = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    tensors["labels"] = torch.tensor(column(ds, LABEL), dtype=torch.long)
    return Encoded(tensors)


def encode(ds: datasets.Dataset, tokenizer, text_columns, max_length: int, cache_key: str | None = None, cache_dir: str | None = None) -> Encoded:
    """Tokenise ``ds`` (classification, or causal-lm when it has prompts or
    chats); with a ``cache_key`` the tensors are kept on disk so a node that
    starts a fresh process per message does not tokenise again."""
    causal = is_lm_dataset(ds)

    def tokenise() -> Encoded:
        return encode_lm(ds, tokenizer, max_length) if causal else _encode(ds, tokenizer, text_columns, max_length)

    if not (cache_key and cache_dir):
        return tokenise()
    template = getattr(tokenizer, "chat_template", None) or ""
    digest = hashlib.sha256(
        f"{cache_key}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}|{text_columns}|{max_length}|{len(ds)}|{causal}|{template}".encode()
    ).hexdigest()[:24]
    # safetensors: loading it runs no code, whatever is in the file (unlike a pickle).
    path = os.path.join(cache_dir, "tokens", f"{digest}.safetensors")
    if os.path.exists(path):
        try:
            loaded = safetensors.torch.load_file(path)
            meta = {k: v for k, v in loaded.items() if k.startswith("meta.")}
            dropped = int(meta.pop("meta.dropped", torch.zeros(1)).item())
            return Encoded({k: v for k, v in loaded.items() if not k.startswith("meta.")}, meta, dropped)
        except Exception as e:  # a torn or stale file: re-tokenise
            log.warning("ignoring unreadable token cache %s (%s)", path, e)
    out = tokenise()
    tensors = {**out.tensors, **out.meta, "meta.dropped": torch.tensor([out.dropped])}
    data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})
    write_atomic(path, data, 0o600)  # owner-only (it can be turned back into the text); never half a file
    return out


# -- causal-LM data: prompts and responses -------------------------------------------

PROMPT, RESPONSE, MESSAGES = "prompt", "response", "messages"  # the columns of a normalised causal-lm split
SST2_WORDS = ("negative", "positive")
# Of three phrasings tried zero-shot on a few dozen validation reviews, the one SmolLM2-135M-Instruct
# answered most often with the bare word (the others drew sentences such as "The sentiment of ...").
SST2_TEMPLATE = "Is the following movie review positive or negative?\n\n{text}\n\nAnswer with one word: positive or negative."
GENERIC_TEMPLATE = "{text}\n\nAnswer with one of: {choices}."
PAIR_TEMPLATE = "{text}\n{text2}\n\nAnswer with one of: {choices}."


def is_lm_dataset(ds: datasets.Dataset) -> bool:
    return (PROMPT in ds.column_names and RESPONSE in ds.column_names) or MESSAGES in ds.column_names


def _check_chats(ds: datasets.Dataset, where: str) -> None:
    for i, chat in enumerate(column(ds, MESSAGES)):
        ok = isinstance(chat, list) and len(chat) >= 2 and all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in chat)
        if not ok or chat[-1]["role"] != "assistant":
            raise ConfigError(
                "dataset", where, f"row {i} of column 'messages' must be a list of {{role, content}} turns ending with the assistant's (the response)"
            )


def to_instructions(ds: datasets.Dataset, data: DataConfig, where: str, *, label_names: tuple[str, ...] = (), sst2: bool = False) -> datasets.Dataset:
    """A split as causal-lm examples: its chats (``messages``), its prompt and
    response columns, or, for a labelled dataset (text and label columns), each
    text phrased as an instruction (``prompt-template``) answered by its
    label's word (``label-words``); the ``label`` column is kept (partitioning)."""
    cols = ds.column_names
    if MESSAGES in cols:
        _check_chats(ds, where)
        return ds.select_columns([MESSAGES])
    if data.prompt_column in cols or data.response_column in cols:
        for key, col in (("prompt-column", data.prompt_column), ("response-column", data.response_column)):
            if col not in cols:
                raise ConfigError(key, col, f"column not in {where} (columns: {cols})")
            if any(v is None for v in column(ds, col)):
                raise ConfigError(key, col, f"{where} has missing (null) values")
        ds = ds.select_columns([data.prompt_column, data.response_column])
        ds = ds.rename_columns({c: n for c, n in ((data.prompt_column, PROMPT), (data.response_column, RESPONSE)) if c != n})
        return ds.cast_column(PROMPT, datasets.Value("string")).cast_column(RESPONSE, datasets.Value("string"))
    if not all(c in cols for c in data.text_columns) or data.label_column not in cols:
        raise ConfigError(
            "prompt-column",
            data.prompt_column,
            f"{where} has neither prompt/response columns, nor 'messages', nor text and label columns to phrase as instructions (columns: {cols})",
        )
    names = label_names or label_names_of(ds, data.label_column)
    words = data.label_words or (SST2_WORDS if sst2 and len(names) == 2 else names)
    if len(words) != len(names):
        raise ConfigError("label-words", ",".join(data.label_words), f"needs one word per label: {len(names)} labels {list(names)}")
    template = data.prompt_template or (SST2_TEMPLATE if sst2 else PAIR_TEMPLATE if len(data.text_columns) == 2 else GENERIC_TEMPLATE)
    ds = normalise(ds, data, names, where)
    choices = ", ".join(words)

    def phrase(row: dict) -> dict:
        texts = {"text": row[data.text_columns[0]], "text2": row[data.text_columns[-1]], "choices": choices}
        try:
            prompt = template.format(**texts)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError("prompt-template", template, f"use only {{text}}, {{text2}} and {{choices}} ({e})") from None
        return {PROMPT: prompt, RESPONSE: words[row[LABEL]]}

    return ds.map(phrase, remove_columns=list(data.text_columns))


def _render(tokenizer, prompt_turns: list[dict], response: str) -> tuple[str, str]:
    """(prompt text, response text with its end-of-turn), in the model's chat
    template when it has one, else the prompt, a newline, the response and EOS."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(prompt_turns, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*prompt_turns, {"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
        return prompt, response + (tokenizer.eos_token or "")
    end = tokenizer.eos_token or tokenizer.sep_token or ""
    return "\n".join(t["content"] for t in prompt_turns) + "\n", response + end


def encode_lm(ds: datasets.Dataset, tokenizer, max_length: int) -> Encoded:
    """Tokenise causal-lm examples: ``labels`` are the response's tokens (the
    loss counts them only), -100 elsewhere. An example whose prompt and
    response do not fit ``max_length`` is left out (counted in ``dropped``,
    never cut: a cut response would teach a wrong answer)."""
    end_ids = {i for i in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)) if i is not None}
    special = set(tokenizer.all_special_ids)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not getattr(tokenizer, "chat_template", None) else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, prompt_lengths, stops, dropped = [], [], set(), 0
    chats = (
        column(ds, MESSAGES)
        if MESSAGES in ds.column_names
        else ([{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in zip(column(ds, PROMPT), column(ds, RESPONSE)))
    )
    for chat in chats:
        prompt, response = _render(tokenizer, chat[:-1], chat[-1]["content"])
        p = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if len(p) + len(r) > max_length or not r:
            dropped += 1
            continue
        stops |= {t for t in r if t in special}
        rows.append((p, r))
        prompt_lengths.append(len(p))
    n = len(rows)
    input_ids = torch.full((n, max_length), pad, dtype=torch.long)
    mask = torch.zeros((n, max_length), dtype=torch.long)
    labels = torch.full((n, max_length), -100, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        ids = p + r
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, len(p) : len(ids)] = torch.tensor(r)
    tensors = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, PROMPT_LENGTH: torch.tensor(prompt_lengths, dtype=torch.long)}
    stop_ids = torch.tensor(sorted(stops or end_ids), dtype=torch.long)
    return Encoded(tensors, {STOP_IDS: stop_ids}, dropped)


def file_signature(source: str) -> str:
    """What identifies the data behind ``source`` for the token cache."""
    kind, _, where = source.partition(":")
    if kind != "local":
        return source
    where = os.path.expanduser(where)
    files = [where] if os.path.isfile(where) else sorted(glob.glob(os.path.join(where, "*")))
    return source + "|" + "|".join(f"{f}:{os.path.getsize(f)}:{int(os.path.getmtime(f))}" for f in files if os.path.isfile(f))
