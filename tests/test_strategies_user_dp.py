"""User-level (central) DP with Flower's wrappers: clipping, noise, the
accountant checked against Opacus, and which strategies may use it."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlora import user_dp
from fedlora.config import ConfigError
from fedlora.privacy import ALPHAS
from fedlora.strategies import FedExLoraStrategy, FedSvdStrategy, FfaLoraStrategy, FloraStrategy

from conftest import FakeGrid
from conftest import reply as _reply

pytestmark = pytest.mark.usefixtures("server_task_identity")


KA, KB = "layer.lora_A.default.weight", "layer.lora_B.default.weight"


# -- the accountant -------------------------------------------------------------------


def _gaussian_epsilon_by_hand(z: float, rounds: int, delta: float) -> float:
    """T compositions of the Gaussian mechanism (RDP alpha T / 2z^2), converted to
    (epsilon, delta) as Opacus does (Balle et al. 2020), minimised over the orders."""
    return min(rounds * a / (2 * z * z) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for a in ALPHAS)


@pytest.mark.parametrize("z, rounds", [(1.0, 5), (0.8, 20), (3.0, 100)])
def test_user_epsilon_matches_opacus_and_the_gaussian_mechanism(z, rounds):
    from opacus.accountants import RDPAccountant

    delta = 1e-5
    acc = RDPAccountant()
    for _ in range(rounds):  # one release per round, every client counted (no amplification)
        acc.step(noise_multiplier=z, sample_rate=1.0)
    mine = user_dp.user_epsilon(z, rounds, delta)
    assert mine == pytest.approx(acc.get_epsilon(delta=delta, alphas=ALPHAS), rel=1e-12)
    assert mine == pytest.approx(_gaussian_epsilon_by_hand(z, rounds, delta), rel=1e-9)
    # With a Poisson client-sampling rate the accountant amplifies, as Opacus does.
    acc = RDPAccountant()
    for _ in range(rounds):
        acc.step(noise_multiplier=z, sample_rate=0.1)
    assert user_dp.user_epsilon(z, rounds, delta, sample_rate=0.1) == pytest.approx(acc.get_epsilon(delta=delta, alphas=ALPHAS), rel=1e-12)
    assert user_dp.user_epsilon(z, rounds, delta, sample_rate=0.1) < mine
    assert user_dp.user_epsilon(z, 0, delta) == 0.0


# -- Flower's wrappers inside a strategy ----------------------------------------------------


def test_server_side_clipping_clips_each_update_and_averages_unweighted():
    dp = user_dp.UserDP("server-fixed", noise_multiplier=1e-12, clip_norm=1.0, delta=1e-5, num_sampled=2)
    strat = FfaLoraStrategy(payload_shapes={KB: (2, 1)}, fingerprint="x", user_dp=dp)
    start = np.array([[1.0], [1.0]])
    list(strat.configure_train(1, ArrayRecord({KB: Array(start.astype(np.float32))}), ConfigRecord(), FakeGrid()))
    # Updates of norm 5 (clipped to 1) and 0.5 (kept); example weights 1 and 99 are ignored.
    out, _ = strat.aggregate_train(1, [_reply(1, {KB: start + [[3.0], [4.0]]}, 1), _reply(2, {KB: start + [[0.5], [0.0]]}, 99)])
    np.testing.assert_allclose(out[KB].numpy(), start + ([[0.6], [0.8]] + np.array([[0.5], [0.0]])) / 2, atol=1e-6)
    assert strat.rounds[1].user_epsilon == pytest.approx(user_dp.user_epsilon(1e-12, 1, 1e-5))
    assert strat.state() == {"user-dp": {"releases": 1, "clip-norm": 1.0}}


def test_noise_has_std_z_c_over_m():
    dp = user_dp.UserDP("server-fixed", noise_multiplier=1.5, clip_norm=2.0, delta=1e-5, num_sampled=3)
    start = {KB: np.zeros((200, 100))}
    replies = [_reply(i, start, 1).content for i in (1, 2, 3)]
    noise = dp.aggregate(1, replies, start)[KB].numpy()
    # 20,000 draws: the mean is within 5 standard errors of 0.
    assert noise.std() == pytest.approx(1.5 * 2.0 / 3, rel=0.03) and abs(noise.mean()) < 5 * (1.5 * 2.0 / 3) / np.sqrt(noise.size)


@pytest.mark.parametrize("update_norm", [1e-3, 1e4])
def test_adaptive_clipping_noise_is_at_least_what_the_round_clipped_with(update_norm):
    """Flower 1.42 moves C before adding noise z·C_new/m. Small updates (none
    clipped) shrink C: the release is topped up to z·C_used/m, the noise the
    accountant assumes. Large ones (all clipped) grow C: more noise, still safe."""
    m = 50  # enough clients that the noisy clipped count cannot flip the direction C moves in
    dp = user_dp.UserDP("server-adaptive", noise_multiplier=2.0, clip_norm=1.0, delta=1e-5, num_sampled=m, clipped_count_stddev=2.5)
    z_model = dp.wrapper.noise_multiplier  # Flower's share of z for the model noise
    start = {KB: np.zeros((300, 100))}
    direction = np.ones((300, 100)) / np.sqrt(300 * 100)
    replies = [_reply(i, {KB: update_norm * direction}, 1).content for i in range(1, m + 1)]
    released = dp.aggregate(1, replies, start)[KB].numpy()
    noise = released - min(update_norm, 1.0) * direction  # minus the mean of the clipped updates
    if update_norm < 1:
        assert dp.clip_norm < 1.0
        assert noise.std() == pytest.approx(z_model * 1.0 / m, rel=0.03)
    else:
        assert dp.clip_norm > 1.0
        assert noise.std() == pytest.approx(z_model * dp.clip_norm / m, rel=0.03)


def test_no_norm_screening_under_user_dp():
    """With user-level DP the clip bounds influence; a norm outlier is clipped,
    not dropped (dropping would depend on, and publish, unnoised norms)."""
    dp = user_dp.UserDP("server-fixed", noise_multiplier=1e-12, clip_norm=1.0, delta=1e-5, num_sampled=3)
    strat = FfaLoraStrategy(payload_shapes={KB: (2, 1)}, fingerprint="x", user_dp=dp, max_norm_ratio=2.0)
    list(strat.configure_train(1, ArrayRecord({KB: Array(np.zeros((2, 1), np.float32))}), ConfigRecord(), FakeGrid((1, 2, 3))))
    replies = [_reply(1, {KB: [[0.1], [0.0]]}, 1), _reply(2, {KB: [[0.1], [0.0]]}, 1), _reply(3, {KB: [[100.0], [0.0]]}, 1)]
    out, _ = strat.aggregate_train(1, replies)
    assert strat.rounds[1].failures == [] and dp.releases == 1
    np.testing.assert_allclose(out[KB].numpy(), [[(0.1 + 0.1 + 1.0) / 3], [0.0]], atol=1e-6)


def test_fedsvd_noises_the_mean_of_b_before_its_svd():
    """The SVD is post-processing: with (almost) no noise, B' A' is the
    unweighted mean of the clipped B times the round's A."""
    dp = user_dp.UserDP("server-fixed", noise_multiplier=1e-12, clip_norm=10.0, delta=1e-5, num_sampled=2)
    strat = FedSvdStrategy(payload_shapes={KB: (3, 2)}, down_keys=[KA, KB], fingerprint="x", user_dp=dp)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 4))
    list(strat.configure_train(1, ArrayRecord({KA: Array(a.astype(np.float32)), KB: Array(np.zeros((3, 2), np.float32))}), ConfigRecord(), FakeGrid()))
    b1, b2 = rng.normal(size=(3, 2)), rng.normal(size=(3, 2))
    out, _ = strat.aggregate_train(1, [_reply(1, {KB: b1}, 5), _reply(2, {KB: b2}, 50)])
    np.testing.assert_allclose(out[KB].numpy() @ out[KA].numpy(), (b1 + b2) / 2 @ a, atol=1e-5)


def test_a_missing_reply_skips_the_release():
    dp = user_dp.UserDP("server-fixed", noise_multiplier=1.0, clip_norm=1.0, delta=1e-5, num_sampled=2)
    strat = FfaLoraStrategy(payload_shapes={KB: (2, 1)}, fingerprint="x", user_dp=dp)
    list(strat.configure_train(1, ArrayRecord({KB: Array(np.zeros((2, 1), np.float32))}), ConfigRecord(), FakeGrid()))
    out, _ = strat.aggregate_train(1, [_reply(1, {KB: np.ones((2, 1))}, 1)])
    assert out is None and dp.releases == 0 and strat.rounds[1].user_epsilon == 0.0
    assert any("1 valid replies of 2" in f for f in strat.rounds[1].failures)


def test_user_dp_refused_where_it_would_not_hold():
    dp = user_dp.UserDP("server-fixed", noise_multiplier=1.0, clip_norm=1.0, delta=1e-5, num_sampled=2)
    for cls in (FedExLoraStrategy, FloraStrategy):  # the base update is a product of each client's factors
        with pytest.raises(ConfigError, match="user-dp.mode"):
            cls(payload_shapes={KA: (1, 2), KB: (2, 1)}, fingerprint="x", user_dp=dp)
    with pytest.raises(ConfigError, match="aggregation.method"):
        FfaLoraStrategy(payload_shapes={KB: (2, 1)}, fingerprint="x", user_dp=dp, aggregation="median")
    client = user_dp.UserDP("client-fixed", noise_multiplier=1.0, clip_norm=1.0, delta=1e-5, num_sampled=2)
    with pytest.raises(ConfigError, match="server-fixed"):  # FedSVD replies without the A it received
        FedSvdStrategy(payload_shapes={KB: (2, 1)}, down_keys=[KA, KB], fingerprint="x", user_dp=client)
    with pytest.raises(ConfigError, match="clipped-count-stddev"):  # 2 clients: count noise 0.1 too small for z = 1
        user_dp.UserDP("server-adaptive", noise_multiplier=1.0, clip_norm=1.0, delta=1e-5, num_sampled=2)
    adaptive = user_dp.UserDP("server-adaptive", noise_multiplier=1.0, clip_norm=1.0, delta=1e-5, num_sampled=2, clipped_count_stddev=2.0)
    assert adaptive.noise_multiplier == 1.0 and adaptive.wrapper.noise_multiplier > 1.0  # Flower's split of z


def test_client_mod_clips_only_when_the_server_asks():
    sent = ArrayRecord({KB: Array(np.zeros((2, 1), np.float32))})

    def train(msg, ctx):  # a client whose update has norm 5
        arrays = ArrayRecord({KB: Array(np.array([[3.0], [4.0]], np.float32))})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    for config, norm in (({user_dp.KEY_CLIPPING_NORM: 1.0}, 1.0), ({}, 5.0)):
        msg = Message(RecordDict({"arrays": sent, "config": ConfigRecord(config)}), dst_node_id=1, message_type="train")
        reply = user_dp.client_mod(msg, ctx, train)
        assert np.linalg.norm(reply.content["arrays"][KB].numpy()) == pytest.approx(norm)
