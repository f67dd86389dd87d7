from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from servekit._collate import (
    Collate,
    DictOfArrays,
    ListBatch,
    Pad,
    PaddedBatch,
    Stack,
    acollated,
    collated,
)
from servekit._outcome import Failure, run_batch
from servekit.errors import BatchContractError


def identity(batch: Any) -> Any:
    return batch


def same(a: Any, b: Any) -> bool:
    """Bit-identical arrays: same dtype, shape and bytes (NaNs included)."""
    a, b = np.asarray(a), np.asarray(b)
    return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())


# -- round trips -------------------------------------------------------------------------


def test_list_batch_round_trips_any_objects() -> None:
    items: list[Any] = [1, "two", {"three": 3}, None, [5]]
    assert collated(identity, ListBatch())(items) == items


def test_list_batch_collate_returns_a_new_list() -> None:
    items = [1, 2]
    batch = ListBatch().collate(items)
    assert batch == items and batch is not items


@pytest.mark.parametrize("dtype", ["float32", "int8", "complex128", "bool"])
@pytest.mark.parametrize("shape", [(), (1,), (7,), (2, 3, 4)])
def test_stack_round_trips_bit_identical(shape: tuple[int, ...], dtype: str) -> None:
    rng = np.random.default_rng(0)
    items = [(rng.standard_normal(shape) * 50).astype(dtype) for _ in range(5)]
    outputs = collated(identity, Stack())(items)
    assert len(outputs) == len(items)
    assert all(same(out, item) for out, item in zip(outputs, items, strict=True))


def test_stack_batch_has_leading_dimension_and_cast_dtype() -> None:
    batch = Stack(dtype="float32").collate([np.arange(3), [1.5, 2.5, 3.5]])
    assert batch.shape == (2, 3) and batch.dtype == np.float32
    assert batch.tolist() == [[0, 1, 2], [1.5, 2.5, 3.5]]


def test_stack_matches_np_stack() -> None:
    rng = np.random.default_rng(1)
    items = [rng.standard_normal(256).astype(np.float32) for _ in range(32)]
    assert same(Stack().collate(items), np.stack(items))


def test_stack_split_of_a_tuple_or_list_gives_a_list() -> None:
    fmt = Stack()
    batch = fmt.collate([np.zeros(2), np.ones(2)])
    assert fmt.split(("a", "b"), batch, 2) == ["a", "b"]
    assert fmt.split(["a", "b"], batch, 2) == ["a", "b"]


def test_pad_round_trips_bit_identical() -> None:
    items = [
        np.arange(4, dtype=np.int16),
        np.arange(1, dtype=np.int16),
        np.arange(0, dtype=np.int16),
    ]
    outputs = collated(lambda b: b.data, Pad())(items)
    assert all(same(out, item) for out, item in zip(outputs, items, strict=True))


def test_dict_of_arrays_round_trips_bit_identical() -> None:
    items = [
        {"ids": np.array([i, i + 1], dtype=np.int64), "x": np.full((2, 2), i, dtype=np.float32)}
        for i in range(3)
    ]
    outputs = collated(identity, DictOfArrays())(items)
    assert len(outputs) == 3
    for out, item in zip(outputs, items, strict=True):
        assert out.keys() == item.keys()
        assert all(same(out[k], item[k]) for k in item)


# -- group keys ----------------------------------------------------------------------------


def test_stack_group_key_separates_shapes_and_dtypes() -> None:
    fmt = Stack()
    a = fmt.group_key(np.zeros(3, np.float32))
    assert a == fmt.group_key(np.ones(3, np.float32))
    assert a != fmt.group_key(np.zeros(4, np.float32))
    assert a != fmt.group_key(np.zeros((3, 1), np.float32))
    assert a != fmt.group_key(np.zeros(3, np.float64))
    assert hash(a) == hash(fmt.group_key(np.ones(3, np.float32)))


def test_stack_with_dtype_groups_by_the_batch_dtype() -> None:
    fmt = Stack(dtype="float32")
    assert fmt.group_key(np.zeros(3, np.float64)) == fmt.group_key([1, 2, 3])
    with pytest.raises(TypeError, match="cannot cast"):
        Stack(dtype="int32").group_key(np.zeros(3))  # float to int is refused at submission


def test_pad_group_key_ignores_length_but_not_features_or_dtype() -> None:
    fmt = Pad()
    key = fmt.group_key(np.zeros((5, 8), np.float32))
    assert key == fmt.group_key(np.zeros((2, 8), np.float32))
    assert key != fmt.group_key(np.zeros((5, 9), np.float32))
    assert key != fmt.group_key(np.zeros((5, 8), np.float64))
    with pytest.raises(ValueError, match="scalar"):
        fmt.group_key(np.float32(1))


def test_dict_of_arrays_group_key_is_order_independent_and_shape_sensitive() -> None:
    fmt = DictOfArrays()
    a = fmt.group_key({"a": np.zeros(2), "b": np.zeros(3, np.int8)})
    assert a == fmt.group_key({"b": np.ones(3, np.int8), "a": np.ones(2)})
    assert a != fmt.group_key({"a": np.zeros(2), "b": np.zeros(4, np.int8)})
    assert a != fmt.group_key({"a": np.zeros(2), "b": np.zeros(3, np.int16)})
    assert a != fmt.group_key({"a": np.zeros(2)})


def test_list_batch_has_no_group_key() -> None:
    assert ListBatch().group_key(object()) is None


# -- collate failures raise --------------------------------------------------------------


def test_stack_refuses_mixed_shapes_naming_the_item() -> None:
    with pytest.raises(ValueError, match=r"item 2 has shape \(4,\)"):
        Stack().collate([np.zeros(3), np.zeros(3), np.zeros(4)])


def test_stack_refuses_a_broadcastable_item() -> None:
    # Assignment into a preallocated batch would broadcast these; the batch must not.
    with pytest.raises(ValueError, match="one shape"):
        Stack().collate([np.zeros(3), np.zeros(1)])
    with pytest.raises(ValueError, match="one shape"):
        Stack().collate([np.zeros(3), np.float64(1)])


def test_stack_refuses_same_total_size_different_shapes() -> None:
    # Concatenation alone would accept 2 + 4 values as two items of shape (3,).
    with pytest.raises(ValueError, match="one shape"):
        Stack().collate([np.zeros(2), np.zeros(4)])


def test_stack_without_dtype_refuses_mixed_dtypes() -> None:
    with pytest.raises(TypeError, match="item 1 is float64"):
        Stack().collate([np.zeros(3, np.float32), np.zeros(3, np.float64)])


def test_stack_refuses_an_unsafe_cast() -> None:
    with pytest.raises(TypeError, match="cannot cast"):
        Stack(dtype="int32").collate([np.zeros(3, np.int32), np.zeros(3, np.float64)])


def test_stack_refuses_ragged_nested_lists() -> None:
    with pytest.raises(ValueError, match="cannot be read as an array"):
        Stack().collate([[1, 2], [[1], [2, 3]]])


@pytest.mark.parametrize("fmt", [Stack(), Pad(), DictOfArrays()])
def test_empty_batches_are_refused(fmt: Collate) -> None:
    with pytest.raises(ValueError, match="empty"):
        fmt.collate([])


def test_dict_of_arrays_with_mismatched_keys_raises() -> None:
    with pytest.raises(ValueError, match=r"item 1 lacks \['b'\] and has extra \['c'\]"):
        DictOfArrays().collate([{"a": np.zeros(1), "b": np.zeros(1)}, {"a": np.zeros(1), "c": 1}])


def test_dict_of_arrays_with_mismatched_shapes_raises() -> None:
    with pytest.raises(ValueError, match=r"DictOfArrays\['a'\]"):
        DictOfArrays().collate([{"a": np.zeros(1)}, {"a": np.zeros(2)}])


def test_dict_of_arrays_refuses_non_dict_items() -> None:
    with pytest.raises(TypeError, match="item 0 is list"):
        DictOfArrays().collate([[1]])


def test_pad_refuses_mismatched_features() -> None:
    with pytest.raises(ValueError, match=r"item 1 has shape \(2, 4\)"):
        Pad().collate([np.zeros((3, 5)), np.zeros((2, 4))])


def test_pad_value_must_fit_the_dtype() -> None:
    with pytest.raises(ValueError, match="not exactly representable"):
        Pad(pad_value=0.5, dtype="int32")
    with pytest.raises(ValueError, match="not exactly representable"):
        Pad(pad_value=-1).collate([np.zeros(2, np.uint8)])
    Pad(pad_value=np.nan, dtype="float32")  # NaN is a fine float pad


# -- Pad specifics ---------------------------------------------------------------------------


def test_pad_lengths_mask_and_data() -> None:
    items = [np.array([[1, 1], [2, 2], [3, 3]]), np.array([[4, 4]]), np.zeros((0, 2), np.int64)]
    batch = Pad(pad_value=-9, mask=True).collate(items)
    assert isinstance(batch, PaddedBatch)
    assert batch.data.shape == (3, 3, 2)
    assert batch.lengths.dtype == np.int64 and batch.lengths.tolist() == [3, 1, 0]
    assert batch.mask is not None and batch.mask.dtype == np.bool_
    assert batch.mask.tolist() == [[True, True, True], [True, False, False], [False] * 3]
    assert batch.data[1].tolist() == [[4, 4], [-9, -9], [-9, -9]]
    assert (batch.data[2] == -9).all()


def test_pad_has_no_mask_unless_asked() -> None:
    assert Pad().collate([np.zeros(2)]).mask is None


def test_pad_unpads_per_position_outputs() -> None:
    fmt = Pad()
    items = [np.arange(3.0), np.arange(1.0)]
    batch = fmt.collate(items)
    outputs = fmt.split(np.stack([batch.data, batch.data], axis=-1), batch, 2)
    assert [o.shape for o in outputs] == [(3, 2), (1, 2)]


def test_pad_gives_rows_for_per_item_outputs() -> None:
    fmt = Pad()
    batch = fmt.collate([np.arange(3.0), np.arange(1.0)])
    logits = np.arange(10.0).reshape(2, 5)  # second dim 5 != L_max 3: per item
    outputs = fmt.split(logits, batch, 2)
    assert [o.tolist() for o in outputs] == logits.tolist()
    assert fmt.split(logits.sum(axis=1), batch, 2) == [10.0, 35.0]


def test_pad_unpad_false_keeps_rows_when_width_equals_longest() -> None:
    batch = Pad().collate([np.arange(3.0), np.arange(1.0)])
    logits = np.ones((2, 3))  # 3 classes, and the longest sequence also has 3 steps
    assert [len(o) for o in Pad().split(logits, batch, 2)] == [3, 1]  # the documented hazard
    assert [len(o) for o in Pad(unpad=False).split(logits, batch, 2)] == [3, 3]


def test_pad_unpad_true_requires_per_position_outputs() -> None:
    fmt = Pad(unpad=True)
    batch = fmt.collate([np.arange(3.0), np.arange(1.0)])
    with pytest.raises(BatchContractError, match=r"\(2, 3, \.\.\.\)"):
        fmt.split(np.ones((2, 4)), batch, 2)


def test_pad_split_needs_its_padded_batch() -> None:
    with pytest.raises(TypeError, match="PaddedBatch"):
        Pad().split(np.ones((2, 3)), np.ones((2, 3)), 2)


@settings(max_examples=50, deadline=None)
@given(
    dtype=st.sampled_from([np.int8, np.int64, np.uint16, np.float32, np.float64]),
    features=hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=3),
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=8),
    data=st.data(),
    mask=st.booleans(),
)
def test_pad_round_trips_random_ragged_arrays(
    dtype: type[np.generic],
    features: tuple[int, ...],
    lengths: list[int],
    data: st.DataObject,
    mask: bool,
) -> None:
    items = [
        data.draw(hnp.arrays(dtype, (length, *features), elements={"allow_nan": True}))
        if np.dtype(dtype).kind == "f"
        else data.draw(hnp.arrays(dtype, (length, *features)))
        for length in lengths
    ]
    fmt = Pad(mask=mask)
    batch = fmt.collate(items)
    assert batch.lengths.tolist() == lengths
    assert batch.data.shape == (len(items), max(lengths), *features)
    assert (batch.mask is not None) == mask
    if batch.mask is not None:
        assert batch.mask.sum(axis=1).tolist() == lengths
    outputs = fmt.split(batch.data, batch, len(items))
    assert len(outputs) == len(items)
    assert all(same(out, item) for out, item in zip(outputs, items, strict=True))


# -- outputs: counts and shapes ------------------------------------------------------------


@pytest.mark.parametrize("fmt", [ListBatch(), Stack(), DictOfArrays()])
def test_wrong_leading_dimension_gives_a_list_of_that_length(fmt: Collate) -> None:
    # The batcher's count check then reports both numbers; nothing is mis-assigned.
    assert len(fmt.split(np.zeros((3, 2)), None, 4)) == 3
    assert len(fmt.split([1, 2, 3, 4, 5], None, 4)) == 5


def test_pad_wrong_leading_dimension_gives_a_list_of_that_length() -> None:
    fmt = Pad()
    batch = fmt.collate([np.zeros(2), np.zeros(1)])
    assert len(fmt.split(np.zeros((3, 2)), batch, 2)) == 3


@pytest.mark.parametrize("outputs", [3.5, None, "ab", b"ab", {1, 2}, np.float32(1), np.array(2)])
def test_non_sequence_outputs_raise_batch_contract_error(outputs: Any) -> None:
    with pytest.raises(BatchContractError, match="for a batch of 2 inputs"):
        ListBatch().split(outputs, None, 2)


def test_a_dict_of_per_item_outputs_becomes_one_dict_per_item() -> None:
    outputs = {"label": ["a", "b"], "score": np.array([0.5, 0.25])}
    split = Stack().split(outputs, None, 2)
    assert [(d["label"], float(d["score"])) for d in split] == [("a", 0.5), ("b", 0.25)]


def test_a_dict_with_disagreeing_counts_raises_naming_them() -> None:
    with pytest.raises(BatchContractError, match=r"\{'a': 2, 'b': 3\}"):
        DictOfArrays().split({"a": np.zeros(2), "b": np.zeros(3)}, None, 2)


def test_wrong_count_through_run_batch_is_a_batch_contract_error_naming_both() -> None:
    predict = collated(lambda batch: batch[:-1], Stack())
    outcomes = run_batch(predict, [np.zeros(2)] * 4)
    assert all(isinstance(o, Failure) for o in outcomes)
    error = outcomes[0].error
    assert isinstance(error, BatchContractError) and "3 outputs" in str(error)
    assert "batch of 4" in str(error)


def test_a_bad_item_is_isolated_by_run_batch() -> None:
    # Collate raising lets the batcher's split-and-retry single the bad item out.
    items: list[Any] = [np.zeros(2), np.zeros(2), [[1], [2, 3]], np.zeros(2)]
    outcomes = run_batch(collated(lambda b: b.sum(axis=1), Stack()), items)
    assert [isinstance(o, Failure) for o in outcomes] == [False, False, True, False]
    assert isinstance(outcomes[2].error, ValueError)


def test_split_rows_are_views_of_the_output() -> None:
    out = np.arange(6).reshape(3, 2)
    rows = Stack().split(out, None, 3)
    assert all(np.shares_memory(row, out) for row in rows)


# -- helpers ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_acollated_matches_collated() -> None:
    async def fn(batch: Any) -> Any:
        return batch * 2

    items = [np.arange(3), np.arange(3, 6)]
    outputs = await acollated(fn, Stack())(items)
    assert [o.tolist() for o in outputs] == [[0, 2, 4], [6, 8, 10]]
    assert [o.tolist() for o in outputs] == [
        o.tolist() for o in collated(lambda b: b * 2, Stack())(items)
    ]


def test_formats_are_values() -> None:
    assert Stack(dtype="float32") == Stack(dtype="float32")
    assert repr(Pad(pad_value=-1)) == "Pad(pad_value=-1, mask=False, dtype=None, unpad=None)"
    with pytest.raises(TypeError):
        Stack(dtype="not a dtype")


@pytest.mark.parametrize(
    "fmt", [ListBatch(), Stack(dtype="float32"), Pad(-1, mask=True, unpad=False), DictOfArrays()]
)
def test_formats_pickle(fmt: Collate) -> None:
    # Process back ends send the format to their workers.
    clone = pickle.loads(pickle.dumps(fmt))
    assert clone == fmt and not hasattr(clone, "__dict__")
    # The resolved dtype (not part of equality) must survive too.
    if isinstance(clone, Stack):
        assert clone.collate([np.zeros(2)]).dtype == np.float32
