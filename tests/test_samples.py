"""worker.samples: the one input generator behind warm-up, optimize's gate and the test zoo."""

from __future__ import annotations

import numpy as np
import pytest

from worker.samples import SampleError, sample_feeds, sample_shape
from worker.signature import Signature, TensorSpec


def _spec(name: str, dtype: type[np.generic], shape: tuple[int | None, ...]) -> TensorSpec:
    kind = "string" if dtype is np.str_ else np.dtype(dtype).name
    return TensorSpec(name, f"tensor({kind})", np.dtype(dtype), shape)


def _sig(*inputs: TensorSpec) -> Signature:
    return Signature(inputs=inputs, outputs=())


MIXED = _sig(
    _spec("x", np.float32, (None, 3, None)),
    _spec("ids", np.int64, (None,)),
    _spec("mask", np.bool_, (None, 2)),
    _spec("scale", np.float32, ()),
    _spec("window", np.float32, (4, 2)),
)


def test_shape_rule_is_the_same_for_every_fill() -> None:
    for feeds in (sample_feeds(MIXED, 5), sample_feeds(MIXED, 5, zeros=True)):
        assert {k: v.shape for k, v in feeds.items()} == {
            "x": (5, 3, 1),  # dynamic batch -> rows, other dynamic axes -> 1
            "ids": (5,),
            "mask": (5, 2),
            "scale": (),  # 0-d stays 0-d
            "window": (4, 2),  # a fixed batch axis is kept
        }
        assert {k: v.dtype for k, v in feeds.items()} == {
            "x": np.float32, "ids": np.int64, "mask": np.bool_,
            "scale": np.float32, "window": np.float32,
        }


def test_whole_batches_cover_the_rows() -> None:
    fixed = _spec("w", np.float32, (4, 2))
    assert sample_shape(fixed, 10, whole_batches=True) == (12, 2)  # 3 batches of 4
    assert sample_shape(fixed, 8, whole_batches=True) == (8, 2)
    assert sample_shape(fixed, 1, whole_batches=True) == (4, 2)
    assert sample_shape(fixed, 10) == (4, 2)
    assert sample_shape(_spec("d", np.float32, (None, 2)), 10, whole_batches=True) == (10, 2)


def test_zeros_are_zeros_and_empty_strings() -> None:
    sig = _sig(_spec("x", np.float32, (None, 2)), _spec("word", np.str_, (None, 1)))
    feeds = sample_feeds(sig, 2, zeros=True)
    assert not feeds["x"].any()
    assert feeds["word"].dtype == object and feeds["word"].tolist() == [[""], [""]]


def test_random_values_are_seeded_and_in_range() -> None:
    a, b = sample_feeds(MIXED, 64, seed=3), sample_feeds(MIXED, 64, seed=3)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["x"], sample_feeds(MIXED, 64, seed=4)["x"])
    assert a["ids"].min() >= 0 and a["ids"].max() < 10
    wide = sample_feeds(MIXED, 256, ints=(0, 100))["ids"]
    assert wide.max() >= 10 and wide.max() < 100
    assert set(np.unique(a["mask"]).tolist()) == {False, True}
    assert 0.5 < float(np.std(sample_feeds(MIXED, 1000)["x"])) < 1.5  # standard normal


def test_strings_need_a_vocabulary() -> None:
    sig = _sig(_spec("word", np.str_, (None, 1)))
    with pytest.raises(SampleError, match=r"^input 'word' is tensor\(string\)$") as info:
        sample_feeds(sig, 3)
    assert info.value.input_name == "word" and isinstance(info.value, ValueError)
    words = sample_feeds(sig, 50, strings=("cat", "dog"))["word"]
    assert words.shape == (50, 1) and set(words.ravel().tolist()) == {"cat", "dog"}


def test_values_give_parameter_inputs_exactly() -> None:
    sig = _sig(_spec("x", np.float32, (None, 4)), _spec("k", np.int64, (1,)))
    feeds = sample_feeds(sig, 6, values={"k": lambda rows: np.array([rows // 2], np.int64)})
    assert feeds["k"].tolist() == [3] and feeds["x"].shape == (6, 4)
    # A given value draws nothing: the other inputs are what they would be without it.
    np.testing.assert_array_equal(feeds["x"], sample_feeds(_sig(sig.inputs[0]), 6)["x"])


def test_non_tensor_inputs_are_refused_by_name() -> None:
    seq = TensorSpec("items", "seq(map(int64,tensor(float)))", None, None)
    for zeros in (False, True):
        with pytest.raises(SampleError, match="input 'items' is seq"):
            sample_feeds(_sig(seq), 2, zeros=zeros)
    unknown_rank = TensorSpec("x", "tensor(float)", np.dtype(np.float32), None)
    with pytest.raises(SampleError, match="input 'x'"):
        sample_feeds(_sig(unknown_rank), 2)
