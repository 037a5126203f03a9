"""What a node tells the server when it cannot do a message's work.

Flower forwards ``str(exception)`` to the server, and an exception's text may
quote the node's private data (a label value, a column name, a file path).
So the server gets a fixed code and a generic sentence only; the details,
values included, go to the node's own log (see ``client_app``).
"""

from __future__ import annotations

from .config import DEFAULTS, NODE_DEFAULTS, ConfigError, NodeConfigError
from .policy import PolicyRefusal
from .privacy import BudgetExhausted
from .wire import PayloadError

MESSAGES = {
    "E_POLICY": "the run asks for more than this node's privacy policy allows",
    "E_BUDGET": "privacy budget exhausted: the node will not train further in this run",
    "E_LEDGER": "this node's stored privacy ledger does not match the run's privacy settings",
    "E_NONFINITE": "this node's update was not finite, and was not sent",
    "E_FINGERPRINT": "this node's shared frozen tensors differ from the run's (seed, model, lora.* settings or library versions)",
    "E_NODE_CONFIG": "this node's own node config is invalid; its operator must fix it",
    "E_CONFIG": "the run config cannot be used with this node's model or data",
    "E_PAYLOAD": "the arrays the server sent do not fit this node's model",
    "E_INTERNAL": "the node failed",
}
# Node-config keys a refusal may name (their names are public; their values are not).
NODE_KEYS = ("node-config", "node-config data-path", "partition-id", "num-partitions", "lora-rank", "data-path")


class NodeError(RuntimeError):
    """The only exception text a node sends: ``fedlora node error <CODE>: <sentence>``."""

    def __init__(self, code: str, key: str = "") -> None:
        self.code, self.key = code, key
        where = f" (key {key!r})" if key else ""
        super().__init__(f"fedlora node error {code}{where}: {MESSAGES[code]}; details are in the node's log")


def classify(exc: BaseException) -> NodeError:
    """The code (and, for a config error, the public key name) for ``exc``."""
    from .node import FingerprintMismatch, LedgerMismatch, NonFiniteUpdate  # node imports nothing from here

    if isinstance(exc, NodeError):
        return exc
    if isinstance(exc, PolicyRefusal):
        return NodeError("E_POLICY", exc.key)
    if isinstance(exc, BudgetExhausted):
        return NodeError("E_BUDGET")
    if isinstance(exc, NonFiniteUpdate):
        return NodeError("E_NONFINITE")
    if isinstance(exc, LedgerMismatch):
        return NodeError("E_LEDGER")
    if isinstance(exc, FingerprintMismatch):
        return NodeError("E_FINGERPRINT")
    if isinstance(exc, PayloadError):
        return NodeError("E_PAYLOAD")
    if isinstance(exc, NodeConfigError):  # the node's own setting: its operator reads the log
        return NodeError("E_NODE_CONFIG", exc.key if exc.key in NODE_DEFAULTS else "")
    if isinstance(exc, ConfigError):
        key = exc.key if exc.key in DEFAULTS or exc.key in NODE_KEYS else ""
        return NodeError("E_CONFIG", key)
    return NodeError("E_INTERNAL")
