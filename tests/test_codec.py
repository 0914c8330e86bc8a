"""The wire's tensor codecs: blockwise int8 and the hidden-state encodings between stages."""

from __future__ import annotations

import pytest
import torch

from dllmd.net.codec import (FP16_MAX, CodecError, HopCodec, decode, dequantize_blockwise, encoded_bytes, parts_of,
                             quantize_blockwise)


def test_blockwise_int8_comes_back_within_half_a_step_of_each_block():
    x = torch.randn(2, 3, 128) * torch.linspace(0.01, 50, 128)  # blocks of very different ranges
    x[0, 1, 5] = 1e4  # an outlier coarsens its own block only
    values, scales = quantize_blockwise(x, 32)
    assert values.dtype == torch.int8 and values.shape == x.shape and scales.shape == (2, 3, 4)
    back = dequantize_blockwise(values, scales)
    step = scales.repeat_interleave(32, dim=-1)
    assert bool(((back - x).abs() <= step / 2 + 1e-6).all())
    assert float((back - x)[0, 1, 32:].abs().max()) < float(step[0, 1, 0]) / 8  # the outlier's block alone is coarse


def test_an_all_zero_block_stays_zero_and_bytes_are_a_quarter_and_a_bit():
    x = torch.zeros(1, 2, 64)
    x[0, 1] = torch.randn(64)
    values, scales = quantize_blockwise(x, 64)
    assert bool((dequantize_blockwise(values, scales)[0, 0] == 0).all())
    assert encoded_bytes([values, scales]) / (x.numel() * 4) == pytest.approx((64 + 4) / 256)


def test_fp16_hops_halve_the_bytes_and_keep_fp16_precision():
    hidden = torch.randn(1, 5, 64) * 10
    encoding, parts = HopCodec("fp16").encode(hidden)
    assert encoding == "fp16" and encoded_bytes(parts) == hidden.numel() * 2
    back = decode(encoding, parts, torch.float32)
    assert torch.allclose(back, hidden, rtol=2 ** -10, atol=0)


def test_an_fp16_hop_beyond_its_range_travels_exact_instead_of_infinite():
    hidden = torch.randn(1, 2, 64)
    hidden[0, 0, 0] = FP16_MAX * 4
    encoding, parts = HopCodec("fp16").encode(hidden)
    assert encoding == "fp32" and torch.equal(decode(encoding, parts, torch.float32), hidden)


def test_fp32_hops_are_the_tensor_itself():
    hidden = torch.randn(1, 3, 64)
    encoding, parts = HopCodec().encode(hidden)
    assert encoding == "fp32" and parts[0] is hidden and decode("fp32", parts, torch.float32) is hidden


def test_bad_encodings_and_parts_are_refused_with_what_was_expected():
    with pytest.raises(CodecError, match="one of fp32, fp16, int8"):
        HopCodec("int4")
    with pytest.raises(CodecError, match="use a block of 64 or 32 or 16"):
        HopCodec("int8", 128).check_width(576)
    with pytest.raises(CodecError, match="unknown hidden-state encoding"):
        parts_of("bf17")
    values, scales = quantize_blockwise(torch.randn(1, 2, 64), 16)
    with pytest.raises(CodecError, match="2 tensor"):
        decode("int8", [values], torch.float32)
    with pytest.raises(CodecError, match="int8 values and float32 scales"):
        decode("int8", [values.float(), scales], torch.float32)
    with pytest.raises(CodecError, match="do not match"):
        decode("int8", [values, scales[:, :1]], torch.float32)
    with pytest.raises(CodecError, match="carries float16"):
        decode("fp16", [torch.randn(1, 2, 64)], torch.float32)
    with pytest.raises(CodecError, match="does not divide"):
        quantize_blockwise(torch.randn(1, 1, 60), 16)


def test_compressed_steps_are_shape_checked_before_they_are_expanded():
    values, scales = quantize_blockwise(torch.randn(1, 3, 64), 16)
    assert decode("int8", [values, scales], torch.float32, width=64, max_tokens=4).shape == (1, 3, 64)
    for bad_width, bad_tokens in ((32, 4), (64, 2)):
        with pytest.raises(CodecError, match=r"hidden states \[1, seq"):
            decode("int8", [values, scales], torch.float32, width=bad_width, max_tokens=bad_tokens)
    with pytest.raises(CodecError, match="do not match"):  # zero-width values beside scales
        dequantize_blockwise(torch.zeros(1, 0, dtype=torch.int8), torch.ones(1, 2))


def test_packed_partials_round_trip_and_refuse_the_wrong_size():
    from dllmd.net.codec import pack_partial, unpack_partial

    partial = torch.randn(2, 5, 64)
    for hops, tolerance in ((HopCodec(), 0.0), (HopCodec("fp16"), 1e-2), (HopCodec("int8", 16), 5e-2)):
        back = unpack_partial(pack_partial(partial, hops), partial, hops.block)
        assert back.dtype == torch.float32 and float((back - partial).abs().max()) <= tolerance
    with pytest.raises(CodecError):
        unpack_partial(pack_partial(partial, HopCodec("fp16"))[:-2], partial, 64)
    with pytest.raises(CodecError):
        unpack_partial(b"\x07" + bytes(10), partial, 64)
