"""The shard protocol's codec: how a gateway asks a shard for a partial answer, and reads it.

Both directions are a JSON header followed by raw little-endian tensor bytes, the header's
length in `Inference-Header-Content-Length` (the framing of KServe v2's binary extension):

    request   {"modules": [ids], "deadline_ms": T | null, "shape": [N, ...], "datatype": "UINT8",
               "squares": true | false}
              + the raw inputs
    answer    {"used": [ids], "failed": [{"id", "reason", "kind"}], "unfinished": [ids],
               "shape": [N, K], "latency_ms": t, "members": true | false, "squares": true | false}
              + the FP32 sum of the used modules' outputs (N, K)
              + with "members": the sums of their probabilities (N, K), entropies (N,) and
                votes (N, K), from which a gateway gets the modules' disagreement
              + with "squares" (asked for by a stage of budget=auto): the sum of the products
                s s^T of each member's logits less its largest (N, K, K) as FP64, from which
                it gets the exit signal

A few hundred bytes of JSON and 4·N·K bytes of sums (about 3.1 times that with the members, 23
times with the products, for K = 10): no float goes through text.
"""

from __future__ import annotations

import math
from typing import Any, get_args

import numpy as np
import orjson

from quorum.runtime.confidence import MemberSums
from quorum.runtime.results import FailedModule, FailureKind, Partial
from quorum.server.errors import ApiError

__all__ = ["HEADER_LENGTH", "decode_partial", "decode_request", "encode_partial", "encode_request"]

HEADER_LENGTH = "inference-header-content-length"
DATATYPES: dict[str, np.dtype[Any]] = {
    "UINT8": np.dtype("u1"),
    "INT64": np.dtype("<i8"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NAMES = {v: k for k, v in DATATYPES.items()}
_KINDS = frozenset(get_args(FailureKind))
MAX_DIMENSIONS = 8


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None or not (header_length.isascii() and header_length.isdigit()):
        raise ValueError(f"{HEADER_LENGTH} must give the JSON header's length, got {header_length!r}")
    n = int(header_length)
    if n > len(body):
        raise ValueError(f"a {n}-byte header in a {len(body)}-byte body")
    header = orjson.loads(body[:n])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, body[n:]


def _frame(header: dict[str, Any], payload: bytes) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps(header)
    return head + payload, {HEADER_LENGTH: str(len(head)), "content-type": "application/octet-stream"}


def encode_request(
    x: np.ndarray, ids: list[int], deadline_ms: float | None, squares: bool = False
) -> tuple[bytes, dict[str, str]]:
    """A gateway's request to a shard: raw inputs x (N, ...) and the module ids to run on them (with
    `squares`, the members' products asked for too)."""
    x = np.ascontiguousarray(x)
    if x.dtype not in _NAMES:
        x = x.astype(np.float64) if x.dtype.kind == "f" else x.astype(np.int64)
    header = {
        "modules": ids,
        "deadline_ms": deadline_ms,
        "shape": list(x.shape),
        "datatype": _NAMES[x.dtype],
        "squares": squares,
    }
    return _frame(header, x.astype(x.dtype.newbyteorder("<"), copy=False).tobytes())


def decode_request(
    body: bytes, header_length: str | None, max_elements: int
) -> tuple[np.ndarray, list[int], float | None, bool]:
    """What a shard was asked: inputs, module ids, deadline and whether the members' products are wanted;
    a 4xx naming what is wrong."""
    try:
        header, payload = _split(body, header_length)
    except (ValueError, orjson.JSONDecodeError) as e:
        raise ApiError(400, f"not a shard request: {str(e)[:200]}") from None
    ids, shape, name = header.get("modules"), header.get("shape"), header.get("datatype")
    if not isinstance(ids, list) or not all(type(j) is int for j in ids):
        raise ApiError(422, "`modules` must be a list of module ids")
    dtype = DATATYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ApiError(422, f"`datatype` must be one of {', '.join(DATATYPES)}")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_DIMENSIONS
        or not all(type(d) is int and 0 <= d < 2**31 for d in shape)
    ):
        raise ApiError(422, f"`shape` must be 1 to {MAX_DIMENSIONS} sizes")
    count = math.prod(shape)
    if count > max_elements:
        raise ApiError(413, f"shape {shape} holds {count} numbers, over the limit of {max_elements}")
    if len(payload) != count * dtype.itemsize:
        raise ApiError(400, f"{len(payload)} bytes of inputs; shape {shape} of {name} needs {count * dtype.itemsize}")
    deadline = header.get("deadline_ms")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, int | float)):
        raise ApiError(422, "`deadline_ms` must be a number")
    squares = header.get("squares", False)
    if not isinstance(squares, bool):
        raise ApiError(422, "`squares` must be true or false")
    return np.frombuffer(payload, dtype=dtype).reshape(shape), ids, deadline, squares


def encode_partial(p: Partial) -> tuple[bytes, dict[str, str]]:
    """A shard's answer: which modules it used and why others failed, then their sum (N, K)."""
    header = {
        "used": p.used,
        "failed": [{"id": f.id, "reason": f.reason, "kind": f.kind} for f in p.failed],
        "unfinished": p.unfinished,
        "shape": list(p.sum.shape),
        "latency_ms": round(p.latency_ms, 3),
        "members": p.members is not None,
        "squares": p.members is not None and p.members.squares is not None,
    }
    parts = [p.sum]
    if p.members is not None:
        parts += [p.members.probabilities, p.members.entropy, p.members.votes]
    payload = b"".join(np.ascontiguousarray(a, dtype="<f4").tobytes() for a in parts)
    if p.members is not None and p.members.squares is not None:  # float64 as summed: a gateway exits as an engine
        payload += np.ascontiguousarray(p.members.squares, dtype="<f8").tobytes()
    return _frame(header, payload)


def decode_partial(body: bytes, header_length: str | None, rows: int, width: int, asked: set[int]) -> Partial:
    """A shard's answer to a request for the modules `asked` on `rows` inputs; ValueError when it is
    not one (a gateway counts that as the shard's failure)."""
    header, payload = _split(body, header_length)
    used, unfinished, failed = header.get("used"), header.get("unfinished", []), header.get("failed")
    if not (isinstance(used, list) and isinstance(unfinished, list) and isinstance(failed, list)):
        raise ValueError("the answer's module lists are malformed")
    if not all(type(j) is int for j in used + unfinished):
        raise ValueError("the answer's module ids are not integers")
    failures = []
    for f in failed:
        if not isinstance(f, dict) or type(f.get("id")) is not int or f.get("kind") not in _KINDS:
            raise ValueError(f"a malformed failure: {str(f)[:100]}")
        failures.append(FailedModule(f["id"], str(f.get("reason", ""))[:500], f["kind"]))
    named = [*used, *unfinished, *(f.id for f in failures)]
    if len(named) != len(set(named)) or set(named) != asked:
        raise ValueError("the answer does not account for exactly the modules asked for")
    with_members = header.get("members") is True
    floats = rows * width * (3 if with_members else 1) + (rows if with_members else 0)
    with_squares = with_members and header.get("squares") is True
    doubles = rows * width * width if with_squares else 0
    if header.get("shape") != [rows, width] or len(payload) != floats * 4 + doubles * 8:
        raise ValueError(f"the answer's sums are not ({rows}, {width}) float32 (and the members' sums)")
    values = np.frombuffer(payload[: floats * 4], dtype="<f4")
    if used and not math.isfinite(float(values.sum())):
        raise ValueError("the answer's sums are not finite")
    nk = rows * width
    total = values[:nk].reshape(rows, width)
    members = None
    if with_members:
        squares = None
        if with_squares:
            squares = np.frombuffer(payload[floats * 4 :], dtype="<f8").reshape(rows, width, width).copy()
            if used and not math.isfinite(float(squares.sum())):
                raise ValueError("the answer's sums are not finite")
        members = MemberSums(
            values[nk : 2 * nk].reshape(rows, width).copy(),
            values[2 * nk : 2 * nk + rows].copy(),
            values[2 * nk + rows :].reshape(rows, width).copy(),
            squares,
        )
    return Partial(total, used, failures, unfinished, float(header.get("latency_ms") or 0.0), members)
