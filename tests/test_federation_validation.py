"""Every device reply is validated before aggregation (server/validation.py): each way a reply can be wrong is
refused with its reason, and a valid reply comes back exactly as sent (after Flower's wire encoding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import random_adapter
from fed_helpers import wire
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.export.formats import protocol as P
from lorafleet.export.formats.adapter import rescale
from lorafleet.server.validation import RejectedUpdate, ReplyLimits, validate_query_reply, validate_train_reply

RANKS = (2, 4, 8)
ALPHA = 16.0


@pytest.fixture(scope="module")
def limits() -> ReplyLimits:
    return ReplyLimits.from_adapter(random_adapter(8), RANKS, ALPHA)


def arrays_at(r: int, seed: int = 0) -> dict[str, np.ndarray]:
    return P.adapter_arrays(rescale(random_adapter(r, seed=seed), ALPHA))


def content(arrays: dict[str, np.ndarray], num_examples: object = 10, rank: object = 4, **extra: object) -> RecordDict:
    metrics = MetricRecord({P.NUM_EXAMPLES: num_examples, P.RANK: rank, **extra})  # type: ignore[dict-item]
    return RecordDict({P.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}), P.METRICS: metrics})


def test_valid_reply_round_trips_through_the_wire(limits):
    sent = arrays_at(4)
    received, _ = wire(content(sent, 7, 4, loss=1.5))
    update = validate_train_reply(received, 4, limits)
    assert (update.rank, update.num_examples, update.metrics[P.LOSS]) == (4, 7, 1.5)
    got = P.adapter_arrays(update.adapter)
    assert got.keys() == sent.keys() and all(np.array_equal(got[k], sent[k]) for k in sent)
    assert all(p.scaling == ALPHA / 4 for p in update.adapter.modules.values())


@settings(max_examples=20, deadline=None)
@given(r=st.sampled_from(RANKS), seed=st.integers(0, 1000), dtype=st.sampled_from(["float16", "float32", "float64"]))
def test_any_valid_reply_is_accepted_unchanged(r, seed, dtype):
    limits = ReplyLimits.from_adapter(random_adapter(8), RANKS, ALPHA)
    sent = {k: v.astype(dtype) for k, v in arrays_at(r, seed).items()}
    update = validate_train_reply(content(sent, 1, r), r, limits)
    for key, t in update.adapter.state_dict().items():
        assert torch.equal(t, torch.from_numpy(sent[key].astype("float32")))


def _nan(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    key = sorted(a)[0]
    bad = a[key].copy()
    bad[0, 0] = np.nan
    return {**a, key: bad}


def _inf(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    key = sorted(a)[-1]
    return {**a, key: np.full_like(a[key], np.inf)}


def _transposed(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    key = sorted(a)[0]
    return {**a, key: np.ascontiguousarray(a[key].T)}


def _extra_key(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**a, "base_model.model.lm_head.weight": np.zeros((4, 4), np.float32)}


def _missing_key(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(sorted(a.items())[1:])


def _ints(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    key = sorted(a)[0]
    return {**a, key: a[key].astype(np.int32)}


def _big_endian(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    key = sorted(a)[0]
    return {**a, key: a[key].astype(">f4")}


@pytest.mark.parametrize(("corrupt", "reason"), [
    (_nan, "NaN or Inf"),
    (_inf, "NaN or Inf"),
    (_transposed, r"shape \(64, 4\) is not the expected \(4, 64\)"),
    (_extra_key, r"unexpected \['base_model.model.lm_head.weight'\]"),
    (_missing_key, "missing"),
    (_ints, "dtype 'int32' is not one of"),
    (_big_endian, r"dtype '>f4' is not one of"),
])
def test_corrupt_arrays_are_rejected(limits, corrupt, reason):
    with pytest.raises(RejectedUpdate, match=reason):
        validate_train_reply(wire(content(corrupt(arrays_at(4))))[0], 4, limits)


@pytest.mark.parametrize(("num_examples", "rank", "sent", "may_shrink", "reason"), [
    (-3, 4, 4, False, r"num-examples must be an integer in \[1, \d+\], got -3"),
    (0, 4, 4, False, r"num-examples must be an integer in \[1, \d+\], got 0"),
    (2.5, 4, 4, False, "num-examples must be an integer"),
    (10, 8, 4, False, "rank 8 differs from the rank 4 the device was sent"),
    (10, 8, 4, True, r"rank 8 differs from the rank 4 the device was sent \(ranks never grow\)"),
    (10, 2, 4, False, "rank 2 differs from the rank 4"),
    (10, 3, 4, True, r"rank 3 is not one of the package's ranks \[2, 4, 8\]"),
    (10, 16, 16, True, r"rank must be an integer in \[1, 8\]"),
])
def test_bad_counts_and_ranks_are_rejected(limits, num_examples, rank, sent, may_shrink, reason):
    r = rank if rank in RANKS else 4
    with pytest.raises(RejectedUpdate, match=reason):
        validate_train_reply(content(arrays_at(r), num_examples, rank), sent, limits, may_shrink=may_shrink)


def test_hetlora_may_shrink_to_a_packaged_rank(limits):
    update = validate_train_reply(content(arrays_at(2), 5, 2), 4, limits, may_shrink=True)
    assert update.rank == 2


def test_arrays_must_match_the_declared_rank(limits):
    with pytest.raises(RejectedUpdate, match="shape"):
        validate_train_reply(content(arrays_at(8), 5, 4), 4, limits)


@pytest.mark.parametrize(("records", "reason"), [
    ({"config": ConfigRecord({"x": 1})}, r"unexpected \['config'\]"),
    ({"more": ArrayRecord()}, r"unexpected \['more'\]"),
])
def test_extra_records_are_rejected(limits, records, reason):
    c = content(arrays_at(4))
    for k, v in records.items():
        c[k] = v
    with pytest.raises(RejectedUpdate, match=reason):
        validate_train_reply(c, 4, limits)


def test_unknown_and_non_finite_metrics_are_rejected(limits):
    with pytest.raises(RejectedUpdate, match=r"unexpected metrics \['secret'\]"):
        validate_train_reply(content(arrays_at(4), secret=1.0), 4, limits)
    with pytest.raises(RejectedUpdate, match="metric 'loss' must be a finite number"):
        validate_train_reply(content(arrays_at(4), loss=float("nan")), 4, limits)
    with pytest.raises(RejectedUpdate, match=r"missing metrics \['num-examples'\]"):
        validate_train_reply(RecordDict({P.ARRAYS: ArrayRecord(), P.METRICS: MetricRecord({P.RANK: 4})}), 4, limits)


def test_declared_metadata_must_match_the_data(limits):
    good = arrays_at(4)
    key = sorted(good)[0]
    real = Array(good[key])
    lying = Array(dtype="float32", shape=(4, 64), stype="numpy.ndarray",
                  data=Array(np.zeros((2, 128), np.float32)).data)  # declares (4, 64), holds (2, 128)
    assert real.shape == lying.shape
    c = content(good)
    c[P.ARRAYS][key] = lying
    with pytest.raises(RejectedUpdate, match=r"the data holds float32 \(2, 128\), not the declared float32"):
        validate_train_reply(c, 4, limits)


def test_oversized_payloads_are_refused_before_parsing(limits):
    good = arrays_at(4)
    key = sorted(good)[0]
    c = content(good)
    c[P.ARRAYS][key] = Array(dtype="float32", shape=(4, 64), stype="numpy.ndarray", data=b"\0" * 10_000_000)
    with pytest.raises(RejectedUpdate, match="bytes exceed"):
        validate_train_reply(c, 4, limits)


def test_pickles_are_never_loaded(limits):
    import io

    good = arrays_at(4)
    key = sorted(good)[0]
    buf = io.BytesIO()
    np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
    c = content(good)
    c[P.ARRAYS][key] = Array(dtype="float32", shape=(4, 64), stype="numpy.ndarray", data=buf.getvalue())
    with pytest.raises(RejectedUpdate, match="unreadable array data"):
        validate_train_reply(c, 4, limits)


def test_other_serializations_are_refused(limits):
    good = arrays_at(4)
    key = sorted(good)[0]
    c = content(good)
    c[P.ARRAYS][key] = Array(dtype="float32", shape=(4, 64), stype="torch.save", data=b"x")
    with pytest.raises(RejectedUpdate, match="serialization 'torch.save' is not numpy.ndarray"):
        validate_train_reply(c, 4, limits)


def test_query_replies(limits):
    def q(rank: object) -> RecordDict:
        return RecordDict({P.METRICS: MetricRecord({P.RANK: rank})})  # type: ignore[dict-item]

    assert validate_query_reply(q(4), limits) == 4
    assert validate_query_reply(q(P.NO_RANK), limits) == P.NO_RANK
    with pytest.raises(RejectedUpdate, match="rank 3 is not one of the package's ranks"):
        validate_query_reply(q(3), limits)
    with pytest.raises(RejectedUpdate, match=r"rank must be an integer in \[0, 8\], got -1"):
        validate_query_reply(q(-1), limits)
    with pytest.raises(RejectedUpdate, match="unexpected metrics"):
        validate_query_reply(RecordDict({P.METRICS: MetricRecord({P.RANK: 4, "x": 1})}), limits)
