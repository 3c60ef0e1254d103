"""The shard protocol's codec: what a gateway asks and what a shard answers survive the bytes exactly."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from quorum.runtime.confidence import MemberSums
from quorum.runtime.results import FailedModule, Partial
from quorum.server import shard_codec
from quorum.server.errors import ApiError


def _answer(squares: bool) -> Partial:
    rng = np.random.default_rng(0)
    members = rng.normal(0, 4, (3, 5, 10)).astype(np.float32)  # (b, N, K)
    sums = MemberSums.of(members, squares=squares)
    failed = [FailedModule(7, "boom", "error")]
    return Partial(members.sum(axis=0), [1, 2, 3], failed, [9], 1.5, sums)


@pytest.mark.parametrize("squares", [True, False])
def test_a_shards_answer_comes_back_as_it_left(squares: bool):
    sent = _answer(squares)
    body, headers = shard_codec.encode_partial(sent)
    got = shard_codec.decode_partial(body, headers[shard_codec.HEADER_LENGTH], 5, 10, {1, 2, 3, 7, 9})
    assert got.used == sent.used and got.unfinished == [9] and got.failed == sent.failed
    np.testing.assert_array_equal(got.sum, sent.sum)
    assert got.members is not None and sent.members is not None
    for name in ("probabilities", "entropy", "votes"):
        np.testing.assert_array_equal(getattr(got.members, name), getattr(sent.members, name))
    if squares:  # float64 both ways: a gateway's exits are an engine's
        assert got.members.squares is not None and got.members.squares.dtype == np.float64
        np.testing.assert_array_equal(got.members.squares, sent.members.squares)  # type: ignore[arg-type]
    else:
        assert got.members.squares is None


def test_an_answer_short_of_the_products_it_announces_is_refused():
    body, headers = shard_codec.encode_partial(_answer(True))
    with pytest.raises(ValueError, match="sums"):
        shard_codec.decode_partial(body[:-8], headers[shard_codec.HEADER_LENGTH], 5, 10, {1, 2, 3, 7, 9})


def test_a_request_says_whether_the_products_are_wanted():
    x = np.zeros((2, 784), np.uint8)
    for squares in (True, False):
        body, headers = shard_codec.encode_request(x, [4, 5], 20.0, squares)
        got, ids, deadline, wanted = shard_codec.decode_request(body, headers[shard_codec.HEADER_LENGTH], 10**6)
        assert ids == [4, 5] and deadline == 20.0 and wanted is squares and got.shape == (2, 784)
    head = orjson.dumps({"modules": [1], "deadline_ms": None, "shape": [1], "datatype": "UINT8", "squares": "yes"})
    with pytest.raises(ApiError) as refused:
        shard_codec.decode_request(head + b"\0", str(len(head)), 10**6)
    assert refused.value.status_code == 422 and "squares" in str(refused.value)
