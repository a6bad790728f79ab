"""Every codec round-trips within its stated bound, and every codec round-trips through JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kdstore.codecs import (
    BFloat16,
    Cast,
    Delta,
    FloatCast,
    Int8RowScale,
    LogQuant,
    ProbQuant,
    Zstd,
    chain_from_json,
    chain_to_json,
    codec_from_json,
    decode_chain,
    encode_chain,
)
from kdstore.errors import ShardDataError, SpecError

FAST = settings(max_examples=50, deadline=None)
F32_EPS = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------- Cast


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "int32"])
def test_cast_round_trips_every_value_that_fits(dtype):
    info = np.iinfo(dtype)
    values = np.array([info.min, 0, 1, info.max // 2, info.max], dtype=np.int64)
    codec = Cast(dtype, "int64")
    stored = codec.encode(values)
    assert stored.dtype == np.dtype(dtype)
    decoded = codec.decode(stored)
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, values)


@pytest.mark.parametrize(
    ("dtype", "bad"), [("uint8", 256), ("uint8", -1), ("uint16", 65536), ("uint32", 1 << 32)]
)
def test_cast_refuses_values_that_do_not_fit(dtype, bad):
    with pytest.raises(ShardDataError, match=dtype):
        Cast(dtype, "int64").encode(np.array([0, bad], dtype=np.int64))


def test_cast_bool_round_trip():
    mask = np.array([[True, False, True], [False, False, True]])
    codec = Cast("uint8", "bool")
    stored = codec.encode(mask)
    assert stored.dtype == np.uint8
    np.testing.assert_array_equal(codec.decode(stored), mask)


# ---------------------------------------------------------------- LogQuant


def _logquant_bound(step: float, x: np.ndarray) -> np.ndarray:
    # step/2 from rounding, plus float32 representation of the decoded value
    return step / 2 + 4 * F32_EPS * np.abs(x)


@pytest.mark.parametrize("step", [1 / 16, 0.1, 1 / 3, 1.0])
def test_logquant_error_within_half_a_step(step):
    rng = np.random.default_rng(1)
    x = -(rng.random(20_000) * 40).astype(np.float32)
    x[:3] = [0.0, -step / 2, -40.0]
    codec = LogQuant(step)
    q = codec.encode(x)
    assert q.dtype == np.uint16
    decoded = codec.decode(q)
    assert decoded.dtype == np.float32
    assert np.all(np.abs(decoded - x) <= _logquant_bound(step, x))


def test_logquant_minus_inf_and_nan_become_minus_inf():
    codec = LogQuant(1 / 16)
    x = np.array([-0.5, -np.inf, -3.0, -np.inf, np.nan], dtype=np.float32)
    decoded = codec.decode(codec.encode(x))
    assert np.isneginf(decoded[[1, 3, 4]]).all()
    assert np.isfinite(decoded[[0, 2]]).all()


def test_logquant_uint8_codes():
    codec = LogQuant(0.5, "uint8")
    x = np.array([0.0, -1.2, -100.0, -np.inf], dtype=np.float32)
    q = codec.encode(x)
    assert q.dtype == np.uint8 and q[-1] == 255
    decoded = codec.decode(q)
    np.testing.assert_allclose(decoded[:3], [0.0, -1.0, -100.0])
    assert np.isneginf(decoded[-1])


@FAST
@given(
    step=st.sampled_from([1 / 16, 1 / 32, 0.05, 0.25, 1.0]),
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
        elements=st.one_of(
            st.floats(-1000.0, 0.0, width=32),
            st.just(float("-inf")),
        ),
    ),
)
def test_logquant_property(step, x):
    codec = LogQuant(step)
    decoded = codec.decode(codec.encode(x))
    assert decoded.shape == x.shape
    finite = np.isfinite(x)
    assert np.array_equal(np.isneginf(decoded), ~finite)
    err = np.abs(decoded[finite].astype(np.float64) - x[finite])
    assert np.all(err <= _logquant_bound(step, x[finite]))


# ---------------------------------------------------------------- Delta


@FAST
@given(x=hnp.arrays(np.uint16, hnp.array_shapes(min_dims=1, max_dims=3, max_side=12)))
def test_delta_is_bit_exact_for_any_uint16(x):
    codec = Delta()
    encoded = codec.encode(x)
    assert encoded.dtype == np.uint16
    decoded = codec.decode(encoded)
    assert decoded.dtype == np.uint16
    assert np.array_equal(decoded, x)


def test_delta_does_not_modify_its_input_and_is_small_on_sorted_codes():
    x = np.array([[3, 5, 9, 9, 40], [65535, 0, 1, 65534, 2]], dtype=np.uint16)
    before = x.copy()
    encoded = Delta().encode(x)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(encoded[0], [3, 2, 4, 0, 31])
    np.testing.assert_array_equal(Delta().decode(encoded), x)


def test_logquant_delta_chain_round_trip():
    rng = np.random.default_rng(2)
    logp = -np.sort(rng.random((4, 6, 8)) * 12, axis=-1).astype(np.float32)  # descending
    logp[0, 0, 5:] = -np.inf
    chain = (LogQuant(1 / 16), Delta())
    decoded = decode_chain(chain, encode_chain(chain, logp))
    finite = np.isfinite(logp)
    assert np.array_equal(np.isneginf(decoded), ~finite)
    assert np.all(np.abs(decoded[finite] - logp[finite]) <= _logquant_bound(1 / 16, logp[finite]))


# ---------------------------------------------------------------- ProbQuant


@pytest.mark.parametrize(("dtype", "bound"), [("uint8", 0.5 / 255), ("uint16", 0.5 / 65535)])
def test_probquant_error_bound(dtype, bound):
    rng = np.random.default_rng(3)
    p = rng.random(50_000).astype(np.float32)
    p[:4] = [0.0, 1.0, 0.5, 1e-9]
    codec = ProbQuant(dtype)
    q = codec.encode(p)
    assert q.dtype == np.dtype(dtype)
    decoded = codec.decode(q)
    assert decoded.dtype == np.float32
    assert np.abs(decoded.astype(np.float64) - p).max() <= bound * (1 + 1e-4)
    assert decoded[0] == 0.0 and decoded[1] == 1.0


@FAST
@given(p=hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(0.0, 1.0, width=32)))
def test_probquant_property(p):
    for dtype, bound in (("uint8", 0.5 / 255), ("uint16", 0.5 / 65535)):
        codec = ProbQuant(dtype)
        err = np.abs(codec.decode(codec.encode(p)).astype(np.float64) - p)
        assert np.all(err <= bound * (1 + 1e-4))


# ---------------------------------------------------------------- BFloat16


def _torch_bf16_bits(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def test_bfloat16_matches_torch_bit_for_bit():
    rng = np.random.default_rng(4)
    bits = rng.integers(0, 1 << 32, size=200_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate(
        [
            bits.view(np.float32),  # every exponent: subnormals, huge values, inf, NaN
            rng.standard_normal(10_000).astype(np.float32),
            np.array([0.0, -0.0, np.inf, -np.inf, 3.4028235e38, -3.4028235e38, 1e-45], np.float32),
            # exact ties: round half to even
            (np.arange(1, 200, dtype=np.uint32) << 15 | np.uint32(0x3F800000)).view(np.float32),
        ]
    )
    codec = BFloat16()
    ours = codec.encode(x)
    assert ours.dtype == np.uint16
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], _torch_bf16_bits(x)[~nan])
    decoded = codec.decode(ours)
    assert decoded.dtype == np.float32
    assert np.isnan(decoded[nan]).all() and nan.any()
    # decoding equals torch's bfloat16 → float32
    back = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(decoded[~nan].view(np.uint32), back[~nan].view(np.uint32))


@FAST
@given(x=hnp.arrays(np.float32, st.integers(1, 40), elements=st.floats(width=32, allow_nan=True)))
def test_bfloat16_property(x):
    codec = BFloat16()
    ours = codec.encode(x)
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], _torch_bf16_bits(x)[~nan])
    assert np.array_equal(np.isnan(codec.decode(ours)), nan)


# ---------------------------------------------------------------- FloatCast


def test_floatcast_round_trip_equals_float16_rounding():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 9)).astype(np.float32) * 100
    codec = FloatCast()
    stored = codec.encode(x)
    assert stored.dtype == np.float16
    decoded = codec.decode(stored)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, x.astype(np.float16).astype(np.float32))
    assert np.all(np.abs(decoded - x) <= np.abs(x) * 2.0**-11 + 2.0**-24)


# ---------------------------------------------------------------- Int8RowScale


def _int8_check(x: np.ndarray) -> None:
    codec = Int8RowScale()
    q, scale = codec.encode_pair(x)
    assert q.dtype == np.int8 and scale.dtype == np.float16
    assert scale.shape == x.shape[:-1]
    decoded = codec.decode_pair(q, scale)
    assert decoded.shape == x.shape and decoded.dtype == np.float32
    amax = np.abs(x.astype(np.float64)).max(axis=-1, keepdims=True)
    err = np.abs(decoded.astype(np.float64) - x)
    # max|x|/254 of its own vector, plus float16 rounding of the scale (relative and absolute)
    assert np.all(err <= amax / 254 * (1 + 2e-3) + 1e-7)


def test_int8_rowscale_error_bound_over_many_magnitudes():
    rng = np.random.default_rng(6)
    magnitude = np.exp(rng.uniform(-12, 9, size=(3000, 1)))
    x = (rng.standard_normal((3000, 48)) * magnitude).astype(np.float32)
    _int8_check(x)


def test_int8_rowscale_zero_vectors_are_exact():
    x = np.zeros((3, 4, 16), dtype=np.float32)
    x[1, 2] = np.linspace(-1, 1, 16)
    codec = Int8RowScale()
    decoded = codec.decode_pair(*codec.encode_pair(x))
    assert np.all(decoded[0] == 0) and np.all(decoded[2] == 0) and np.all(decoded[1, :2] == 0)
    _int8_check(x)


@FAST
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=10),
        elements=st.floats(-1.0, 1.0, width=32),
    ),
    exponent=st.integers(-9, 5),
)
def test_int8_rowscale_property(x, exponent):
    _int8_check((x * np.float32(10.0**exponent)).astype(np.float32))


# ---------------------------------------------------------------- JSON


ALL_CODECS = [
    Cast("uint16", "int64"),
    Cast("uint8", "bool"),
    LogQuant(1 / 16),
    LogQuant(0.1, "uint8"),
    Delta(),
    ProbQuant("uint8"),
    ProbQuant("uint16"),
    BFloat16(),
    FloatCast(),
    FloatCast("float16", "float64"),
    Int8RowScale(),
    Zstd(7),
]


@pytest.mark.parametrize("codec", ALL_CODECS, ids=lambda c: f"{c.name}")
def test_codec_json_round_trip(codec):
    data = codec.to_json()
    assert data["name"] == codec.name
    again = codec_from_json(json.loads(json.dumps(data)))  # through real JSON text
    assert again == codec
    assert type(again) is type(codec)


def test_chain_json_round_trip_and_unknown_codec():
    chain = (LogQuant(0.0625), Delta())
    assert chain_from_json(json.loads(json.dumps(chain_to_json(chain)))) == chain
    with pytest.raises(SpecError, match="rot13"):
        codec_from_json({"name": "rot13"})
