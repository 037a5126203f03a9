"""FedSVD (Lee et al., "FedSVD: Adaptive Orthogonalization for Private
Federated Learning with LoRA", NeurIPS 2025).

As in FFA-LoRA, clients hold A fixed and train (and send) only B, so the mean
of B times the shared A is exactly the mean of the clients' products, under
DP too. After aggregating, the server re-factorises P = mean(B) A by a
truncated SVD, P = U S V^T: the new A = V^T (r orthonormal rows) and the new
B = U S, so B A = P exactly (P has rank <= r) while the subspace A adapts
over rounds. The server sends both A and B; clients train only B with the new
A. The SVD is post-processing of DP-trained B: no extra privacy cost.
"""

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from .. import wire
from .base import FedLoraStrategy, factor_keys


def refactor(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B', A') with B' A' = b a, A' with orthonormal rows, B' = U S; via a QR of
    a^T (d_in x r) and the SVD of the small d_out x r matrix b R^T."""
    b, a = np.asarray(b, np.float64), np.asarray(a, np.float64)
    q, r = np.linalg.qr(a.T)  # a = r^T q^T
    u, s, wt = np.linalg.svd(b @ r.T, full_matrices=False)  # b a = u s wt q^T
    return (u * s).astype(np.float32), (wt @ q.T).astype(np.float32)


class FedSvdStrategy(FedLoraStrategy):
    name = "fedsvd"
    exchange = wire.Exchange(train_a=False, a_down=True)
    exact_aggregation = True
    merge_needs_start = "the round's A"

    def merge_state(self, state: dict[str, np.ndarray], aggregated: ArrayRecord, replies: list[RecordDict]) -> None:
        for ka, kb in factor_keys(self.current.keys()):
            if kb in aggregated:
                state[kb], state[ka] = refactor(state[kb], self.current[ka].numpy())
