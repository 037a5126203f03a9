"""``wire.dtype``: what the adapter tensors are rounded to on the network, both
ways. The server sends its float32 state rounded, decodes every reply to
float32 before any check, keeps its state in float32, and counts the bytes
that travel."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedlora import wire
from fedlora.config import parse_run_config
from fedlora.model import build_model
from fedlora.strategies import FfaLoraStrategy, LoraStrategy

from conftest import FakeGrid

D, R = 16, 4
KB = "layer.lora_B.default.weight"
KA = "layer.lora_A.default.weight"
UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8}  # relative rounding to nearest
HALF = ["float16", "bfloat16"]


@pytest.fixture(autouse=True)
def _identity(server_task_identity):
    pass


def _values(seed=0, shape=(D, R)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, shape) * np.exp(rng.uniform(-12, 8, shape))  # magnitudes from ~1e-5 to ~3e3
    return x.astype(np.float32)


def _reply(request: Message, arrays: ArrayRecord, n: int = 10) -> Message:
    """A train reply carrying ``arrays`` exactly as given (no cast to float32)."""
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})}), reply_to=request)


# -- the format itself ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_half_formats_round_to_nearest_and_take_two_bytes_a_value(dtype):
    x = _values()
    x[0, :3] = [0.0, -0.0, 1.0 + 2.0**-9]  # zeros; a value between two bfloat16 neighbours
    sent = wire.encode(ArrayRecord({KB: Array(x)}), dtype)
    assert sent[KB].dtype == dtype and tuple(sent[KB].shape) == (D, R)
    back = wire.decode(sent)[KB].numpy()
    assert back.dtype == np.float32 and back.shape == (D, R)
    # Round to nearest: what torch's own conversion gives, bit for bit, within half a unit of each value.
    expected = torch.from_numpy(x).to(torch.float16 if dtype == "float16" else torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(back, expected)
    assert np.all(np.abs(back - x) <= UNIT[dtype] * np.abs(x) + (2.0**-25 if dtype == "float16" else 0.0))
    assert not np.array_equal(back, x)  # it did round
    # Bytes: 2 per value plus the same .npy header as float32's, i.e. exactly 2 bytes a value fewer.
    full = wire.nbytes(ArrayRecord({KB: Array(x)}))
    assert wire.nbytes(sent) == full - 2 * x.size
    assert len(sent[KB].data) - 2 * x.size == full - 4 * x.size < 200  # the header


def test_float32_travels_unchanged():
    x = _values(1)
    sent = wire.encode(ArrayRecord({KB: Array(x)}), "float32")
    assert sent[KB].dtype == "float32"
    np.testing.assert_array_equal(wire.decode(sent)[KB].numpy(), x)


def test_float16_overflow_is_a_clear_error():
    x = np.full((D, R), 1.0, np.float32)
    x[3, 1] = 70000.0  # float16's largest is 65504
    with pytest.raises(wire.PayloadError, match=r"layer\.lora_B.*float16's range.*bfloat16 or float32"):
        wire.encode(ArrayRecord({KB: Array(x)}), "float16")
    np.testing.assert_array_equal(wire.decode(wire.encode(ArrayRecord({KB: Array(x)}), "bfloat16"))[KB].numpy()[3, 1], 70144.0)  # in range, rounded
    # The server's own state beyond float16's range: configure_train says so, rather than sending inf.
    s = FfaLoraStrategy(payload_shapes={KB: (D, R)}, fingerprint="x", min_train_nodes=1, min_available_nodes=1, wire_dtype="float16")
    with pytest.raises(wire.PayloadError, match="float16's range"):
        s.configure_train(1, ArrayRecord({KB: Array(x)}), ConfigRecord(), FakeGrid([1]))


@pytest.mark.parametrize("head", [False, True])
def test_ffa_lora_in_float16_uploads_a_quarter_of_lora_in_float32(tiny_model_dir, head):
    run = parse_run_config({"model": tiny_model_dir, "train-head": head})
    lora = wire.encode(wire.to_arrays(build_model(run, num_labels=2, train_lora_a=True)), "float32")
    ffa = wire.encode(wire.to_arrays(build_model(run, num_labels=2, train_lora_a=False)), "float16")
    headers = {len(a.data) - a.numpy().itemsize * int(np.prod(a.shape)) for r in (lora, ffa) for a in r.values()}
    assert len(headers) == 1  # every tensor's .npy header is the same size, in both formats
    header = headers.pop()
    data = [wire.nbytes(r) - header * len(r) for r in (lora, ffa)]
    if not head:
        assert data[1] * 4 == data[0]  # half the tensors (no A, square targets), half the bytes each
    assert 0.25 <= data[1] / data[0] < 0.26  # the head (trained by both) is small
    ratio = wire.nbytes(ffa) / wire.nbytes(lora)
    assert 0.25 <= ratio < 0.25 + header * len(ffa) / wire.nbytes(lora), ratio  # above a quarter by the headers only (~0.3 on this tiny model)


# -- the strategy: sends rounded, decodes replies, keeps float32 -------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_the_server_sends_its_state_rounded_and_counts_the_bytes_that_travel(dtype):
    state = ArrayRecord({KA: Array(_values(2, (R, D))), KB: Array(_values(3))})
    s = LoraStrategy(
        payload_shapes={KA: (R, D), KB: (D, R)}, fingerprint="x", min_train_nodes=1, min_available_nodes=1, fraction_evaluate=1.0, wire_dtype=dtype
    )
    msgs = list(s.configure_train(1, state, ConfigRecord(), FakeGrid([1, 2])))
    sent = msgs[0].content["arrays"]
    assert {sent[k].dtype for k in sent.keys()} == {dtype}
    encoded = wire.encode(state, dtype)
    assert s.rounds[1].bytes_down == 2 * wire.nbytes(encoded) == 2 * (wire.nbytes(state) - 2 * (2 * D * R))
    for k in (KA, KB):
        np.testing.assert_array_equal(wire.decode(sent)[k].numpy(), wire.decode(encoded)[k].numpy())
    assert s.current is state and state[KB].dtype == "float32"  # the state itself is not rounded
    evaluate = list(s.configure_evaluate(1, state, ConfigRecord(), FakeGrid([1, 2])))
    assert evaluate[0].content["arrays"][KB].dtype == dtype
    assert s.rounds[1].bytes_down == 4 * wire.nbytes(encoded)


@pytest.mark.parametrize("dtype", HALF)
def test_replies_in_a_half_format_aggregate_into_float32_as_their_values_do(dtype):
    state = ArrayRecord({KB: Array(np.zeros((D, R), np.float32))})
    clients = [_values(10 + i) for i in range(3)]
    weights = [10, 30, 60]

    def run(encoding):
        s = FfaLoraStrategy(payload_shapes={KB: (D, R)}, fingerprint="x", min_train_nodes=1, min_available_nodes=1, max_norm_ratio=0.0, max_weight_share=1.0)
        msgs = {m.metadata.dst_node_id: m for m in s.configure_train(1, state, ConfigRecord(), FakeGrid([1, 2, 3]))}
        replies = [_reply(msgs[i + 1], encoding(ArrayRecord({KB: Array(x)})), n) for i, (x, n) in enumerate(zip(clients, weights))]
        arrays, _ = s.aggregate_train(1, replies)
        return arrays[KB], s.rounds[1]

    exact, plain = run(lambda a: a)
    rounded, stats = run(lambda a: wire.encode(a, dtype))
    assert stats.replies == 3 and not stats.failures
    assert rounded.dtype == "float32"
    # The float32 mean of what travelled, i.e. of each client's values rounded...
    travelled = [wire.decode(wire.encode(ArrayRecord({KB: Array(x)}), dtype))[KB].numpy().astype(np.float64) for x in clients]
    np.testing.assert_allclose(rounded.numpy(), np.average(travelled, axis=0, weights=weights), rtol=1e-6, atol=1e-30)
    # ...within the format's rounding of the float32 values' mean.
    bound = UNIT[dtype] * np.average([np.abs(x) for x in clients], axis=0, weights=weights) + 2.0**-25
    assert np.all(np.abs(rounded.numpy() - exact.numpy()) <= bound)
    assert not np.array_equal(rounded.numpy(), exact.numpy())
    # Bytes up: what travelled, 2 bytes a value fewer than float32.
    assert stats.bytes_up == plain.bytes_up - 3 * 2 * D * R


def test_a_reply_in_an_unsupported_dtype_is_refused_naming_the_node():
    s = FfaLoraStrategy(payload_shapes={KB: (D, R)}, fingerprint="x", min_train_nodes=1, min_available_nodes=1)
    msgs = {
        m.metadata.dst_node_id: m for m in s.configure_train(1, ArrayRecord({KB: Array(np.zeros((D, R), np.float32))}), ConfigRecord(), FakeGrid([1, 2, 3, 4]))
    }
    ok = np.full((D, R), 0.5, np.float32)
    fake_bf16 = Array(dtype="bfloat16", shape=(D, R), stype="numpy.ndarray", data=Array(ok).data)  # float32 bytes under a bfloat16 label
    replies = [
        _reply(msgs[1], ArrayRecord({KB: Array(ok)})),
        _reply(msgs[2], ArrayRecord({KB: Array(np.ones((D, R), np.int8))})),
        _reply(msgs[3], ArrayRecord({KB: Array(ok.astype(np.float64))})),  # float64 is decoded, not refused
        _reply(msgs[4], ArrayRecord({KB: fake_bf16})),
    ]
    arrays, _ = s.aggregate_train(1, replies)
    stats = s.rounds[1]
    assert stats.replies == 2 and len(stats.failures) == 2, stats.failures
    assert stats.failures[0].startswith("node 2:") and "int8" in stats.failures[0] and "payload from node 2" in stats.failures[0]
    assert stats.failures[1].startswith("node 4:") and "claims bfloat16" in stats.failures[1]
    np.testing.assert_array_equal(arrays[KB].numpy(), ok)
    assert arrays[KB].dtype == "float32"


def test_an_unknown_wire_dtype_and_client_side_clipping_off_float32_are_refused():
    from fedlora.config import ConfigError
    from fedlora.user_dp import UserDP

    with pytest.raises(ValueError, match="wire_dtype"):
        FfaLoraStrategy(payload_shapes={KB: (D, R)}, fingerprint="x", wire_dtype="int8")
    # Flower's fixedclipping_mod clips reply - received as they travel: bfloat16 would be raw bits.
    with pytest.raises(ConfigError, match="wire.dtype"):
        FfaLoraStrategy(payload_shapes={KB: (D, R)}, fingerprint="x", wire_dtype="bfloat16", user_dp=UserDP("client-fixed", 1.0, 1.0, 1e-5, 2))
