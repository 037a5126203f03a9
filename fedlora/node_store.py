"""A node's on-disk state for one run: one object, one path scheme.

What must survive between ClientApp processes (in a deployment each message
may start a fresh one) lives under the node's state directory
(``fedlora.config.cache_dir``), keyed by ``sha256(run-key/node-key)``::

    <state-dir>/ledgers/<id>.json        the privacy ledger (DP steps spent)
    <state-dir>/replies/<id>.npz         the last update sent (to replay a repeated round)
    <state-dir>/personal/<id>/<N>.npz    personal tensors after round N (FedSA-LoRA's B)
    <state-dir>/evals/<id>.json          evaluate messages answered in the run
    <state-dir>/sources/<sha(source)>.json   every run's DP steps on one data source (lifetime budget)

Files are owner-only (0600), the state directory too (0700): the token cache
and the ledgers describe private data.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from . import privacy
from .files import write_atomic, write_npz_atomic

_REPLY_META = "__fedlora_reply__"
FILE_MODE, DIR_MODE = 0o600, 0o700


def private_dir(path: str) -> str:
    """``path``, created if needed and made owner-only."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """An exclusive lock on ``path`` + ``.lock`` across processes (flock)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def arrays_digest(arrays: ArrayRecord) -> str:
    """Identifies a payload by content (the global model a round starts from)."""
    h = hashlib.sha256()
    for key in sorted(arrays.keys()):
        value = np.ascontiguousarray(arrays[key].numpy())
        h.update(f"{key}|{value.dtype}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


class NodeStore:
    """One node's files for one run (``run_key`` from the server, ``node_key`` this node's identity)."""

    def __init__(self, root: str, run_key: str, node_key: str) -> None:
        self.root = root
        self.run_key = run_key
        self.id = hashlib.sha256(f"{run_key}/{node_key}".encode()).hexdigest()[:32]
        self.ledger_path = os.path.join(root, "ledgers", f"{self.id}.json")
        self.reply_path = os.path.join(root, "replies", f"{self.id}.npz")
        self.personal_dir = os.path.join(root, "personal", self.id)
        self.eval_path = os.path.join(root, "evals", f"{self.id}.json")

    # -- privacy ledger ---------------------------------------------------------------

    def load_ledger(self, in_state: str | None = None) -> privacy.PrivacyLedger | None:
        """The ledger that has spent the most, from disk or the node's Flower state
        (``in_state``): a restarted node or a resumed run never under-counts what was spent."""
        found = []
        if os.path.exists(self.ledger_path):
            with open(self.ledger_path) as f:
                found.append(privacy.PrivacyLedger.from_json(f.read()))
        if in_state:
            found.append(privacy.PrivacyLedger.from_json(in_state))
        return max(found, key=lambda ledger: ledger.steps_spent, default=None)

    def save_ledger(self, ledger: privacy.PrivacyLedger) -> None:
        write_atomic(self.ledger_path, ledger.to_json(), FILE_MODE)  # a crash leaves the old ledger or the new one

    def ledger_lock(self) -> contextlib.AbstractContextManager[None]:
        """Held across a ledger's check and its record: two train messages for
        the same node and run (two processes) cannot both pass the check."""
        return locked(self.ledger_path)

    # -- evaluation queries -----------------------------------------------------------

    def count_eval(self) -> int:
        """Evaluate messages answered before this one in the run; this one is counted
        (before it is answered: a crash never under-counts)."""
        with locked(self.eval_path):
            done = json.loads(open(self.eval_path).read())["answered"] if os.path.exists(self.eval_path) else 0
            write_atomic(self.eval_path, json.dumps({"answered": done + 1}), FILE_MODE)
        return done

    # -- the last reply ---------------------------------------------------------------

    def save_reply(self, server_round: int, digest: str, arrays: ArrayRecord, metrics: dict[str, Any]) -> None:
        """Atomically keep the update just sent for ``server_round`` (given the global ``digest``)."""
        meta = json.dumps({"round": server_round, "digest": digest, "metrics": metrics}).encode()
        write_npz_atomic(self.reply_path, {**{k: v.numpy() for k, v in arrays.items()}, _REPLY_META: np.frombuffer(meta, np.uint8)}, FILE_MODE)

    def load_reply(self, server_round: int, digest: str) -> tuple[ArrayRecord, dict[str, Any]] | None:
        """The update already sent for this round and this global model, if any.

        A resumed run repeats the round that was interrupted; a node that had
        already trained it sends the same update again instead of training anew:
        re-sending a released update costs no privacy, training again would (and
        its ledger would refuse)."""
        if not os.path.exists(self.reply_path):
            return None
        with np.load(self.reply_path) as npz:
            meta = json.loads(npz[_REPLY_META].tobytes())
            if meta["round"] != server_round or meta["digest"] != digest:
                return None
            return ArrayRecord({k: Array(npz[k]) for k in npz.files if k != _REPLY_META}), meta["metrics"]

    # -- personal tensors -------------------------------------------------------------

    def load_personal(self, upto_round: int) -> ArrayRecord | None:
        """The personal tensors saved after the latest round <= ``upto_round`` (None before the first).
        By round, not "latest", so a resumed run repeats a round from the same state."""
        d = self.personal_dir
        rounds = [int(f[:-4]) for f in os.listdir(d) if f.endswith(".npz")] if os.path.isdir(d) else []
        rounds = [r for r in rounds if r <= upto_round]
        if not rounds:
            return None
        with np.load(os.path.join(d, f"{max(rounds)}.npz")) as npz:
            return ArrayRecord({k: Array(npz[k]) for k in npz.files})

    def save_personal(self, server_round: int, arrays: ArrayRecord) -> None:
        """Atomically save this round's personal tensors; keep the previous round's (a resume may repeat this round)."""
        d = self.personal_dir
        write_npz_atomic(os.path.join(d, f"{server_round}.npz"), {k: v.numpy() for k, v in arrays.items()}, FILE_MODE)
        for name in os.listdir(d):
            if name.endswith(".npz") and int(name[:-4]) < server_round - 1:
                os.remove(os.path.join(d, name))


class SourceLedger:
    """Every run's DP steps on one data source, for the node's lifetime budget:
    ``{"source": ..., "runs": {run-key: [[noise multiplier, sample rate, steps], ...]}}``."""

    def __init__(self, root: str, source: str) -> None:
        self.source = source
        self.path = os.path.join(root, "sources", hashlib.sha256(source.encode()).hexdigest()[:32] + ".json")

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return locked(self.path)

    def runs(self) -> dict[str, list[tuple[float, float, int]]]:
        if not os.path.exists(self.path):
            return {}
        with open(self.path) as f:
            return {k: [tuple(h) for h in v] for k, v in json.load(f)["runs"].items()}

    def other_runs(self, run_key: str) -> list[tuple[float, float, int]]:
        """The composed history of every run but ``run_key``."""
        return [h for key, history in self.runs().items() if key != run_key for h in history]

    def record(self, run_key: str, history: list[tuple[float, float, int]]) -> None:
        runs = self.runs()
        runs[run_key] = [list(h) for h in history]
        write_atomic(self.path, json.dumps({"source": self.source, "runs": runs}), FILE_MODE)


def source_ledgers(root: str) -> list[tuple[str, dict[str, list[tuple[float, float, int]]]]]:
    """(source, runs) for every data source with recorded steps under ``root``."""
    d = os.path.join(root, "sources")
    out = []
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if name.endswith(".json"):
            with open(os.path.join(d, name)) as f:
                obj = json.load(f)
            out.append((obj["source"], {k: [tuple(h) for h in v] for k, v in obj["runs"].items()}))
    return out
