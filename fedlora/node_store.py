"""A node's on-disk state for one run: one object, one path scheme.

What must survive between ClientApp processes (in a deployment each message
may start a fresh one) lives under the node's state directory
(``fedlora.config.cache_dir``), keyed by ``sha256(run-key/node-key)``::

    <state-dir>/ledgers/<id>.json        the privacy ledger (DP steps spent)
    <state-dir>/replies/<id>.npz         the last update sent (to replay a repeated round)
    <state-dir>/personal/<id>/<N>.npz    personal tensors after round N (FedSA-LoRA's B)
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
        self.id = hashlib.sha256(f"{run_key}/{node_key}".encode()).hexdigest()[:32]
        self.ledger_path = os.path.join(root, "ledgers", f"{self.id}.json")
        self.reply_path = os.path.join(root, "replies", f"{self.id}.npz")
        self.personal_dir = os.path.join(root, "personal", self.id)

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
        write_atomic(self.ledger_path, ledger.to_json())  # a crash leaves the old ledger or the new one

    @contextlib.contextmanager
    def ledger_lock(self) -> Iterator[None]:
        """Held across a ledger's check and its record: two train messages for
        the same node and run (two processes) cannot both pass the check."""
        os.makedirs(os.path.dirname(self.ledger_path), exist_ok=True)
        with open(self.ledger_path + ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- the last reply ---------------------------------------------------------------

    def save_reply(self, server_round: int, digest: str, arrays: ArrayRecord, metrics: dict[str, Any]) -> None:
        """Atomically keep the update just sent for ``server_round`` (given the global ``digest``)."""
        meta = json.dumps({"round": server_round, "digest": digest, "metrics": metrics}).encode()
        write_npz_atomic(self.reply_path, {**{k: v.numpy() for k, v in arrays.items()}, _REPLY_META: np.frombuffer(meta, np.uint8)})

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
        write_npz_atomic(os.path.join(d, f"{server_round}.npz"), {k: v.numpy() for k, v in arrays.items()})
        for name in os.listdir(d):
            if name.endswith(".npz") and int(name[:-4]) < server_round - 1:
                os.remove(os.path.join(d, name))
