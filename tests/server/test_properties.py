"""Property-based tests (Hypothesis): whatever a client sends, to either protocol, in the query,
the headers or the body, JSON or binary, the answer is a 2xx or a 4xx with a message, never a
5xx, and no module's breaker opens.

`QUORUM_FUZZ_EXAMPLES` sets the examples per test (default 150, with a fixed seed: CI's run);
docs/RESULTS.md records a run of 2,000 requests per protocol.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from quorum.server.app import create_app
from quorum.server.dataplane import OPTIONS, predict_options
from quorum.server.errors import ApiError
from quorum.server.settings import Settings

EXAMPLES = int(os.environ.get("QUORUM_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)

# Values that broke parsers before: odd unicode digits, huge numbers, signs, NaN, empty strings.
TRICKY = st.sampled_from(
    ["", "-1", "-0", "+3", "²", "٣", "1e400", "nan", "inf", "-inf", "0x10", "1_000", " 7 ", "9" * 4000, "\x00", "🤖"]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    TRICKY,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
STATUSES: list[int] = []  # of the requests built to reach the engine
QUERY_KEYS = st.sampled_from(sorted(OPTIONS)) | st.text(max_size=10)
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)  # what HTTP headers carry


@pytest.fixture(scope="module")
def client(bundle_dir: Path):
    # Fault injection open to all: its parsers are fuzzed too (tiny delays keep the run quick).
    app = create_app(Settings(bundle=bundle_dir, max_batch=8, module_timeout_ms=200, allow_fault_injection=True))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _ok(response) -> bool:
    """A 2xx, or a 4xx with a message; 503 only when a deadline left no module time to finish."""
    if response.status_code < 400:
        return True
    error = response.json().get("error", "")
    if response.status_code < 500:
        return bool(error)
    return response.status_code == 503 and "deadline" in error


def _closed(client: TestClient) -> bool:
    return all(m["breaker"] == "closed" for m in client.get("/modules").json()["modules"])


def _image(rows: int = 1) -> list[list[int]]:
    return np.random.default_rng(rows).integers(0, 256, (rows, 784)).tolist()


@seed(18)
@FUZZ
@given(query=st.dictionaries(QUERY_KEYS, SCALARS.map(lambda v: "" if v is None else str(v)), max_size=5))
def test_any_query_gets_a_4xx_or_an_answer(client: TestClient, query: dict[str, str]):
    query.pop("delay_ms", None)  # an injected delay of any length is allowed: leave the clock alone
    r = client.post("/predict", params=query, json={"inputs": _image()})
    assert _ok(r), (query, r.status_code, r.text[:300])
    STATUSES.append(r.status_code)


@seed(18)
@FUZZ
@given(
    content_type=st.sampled_from(["application/json", "application/octet-stream", "application/x-npy", "text/plain"])
    | HEADER_TEXT,
    headers=st.dictionaries(st.sampled_from(["x-shape", "x-dtype"]), HEADER_TEXT | TRICKY),
    body=st.binary(max_size=4000) | JSON.map(lambda v: json.dumps(v).encode()),
)
def test_any_body_and_headers_get_a_4xx_or_an_answer(client: TestClient, content_type, headers, body):
    headers = {k: v for k, v in headers.items() if v.isascii() and v.isprintable() and v.strip() == v}
    r = client.post("/predict", content=body, headers={"content-type": content_type, **headers})
    assert _ok(r), (content_type, headers, body[:80], r.status_code, r.text[:300])


@seed(18)
@FUZZ
@given(
    inputs=st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "name": st.just("input") | st.text(max_size=8),
                "shape": st.lists(st.integers(-3, 800), max_size=40) | SCALARS,
                "datatype": st.sampled_from(["FP32", "UINT8", "INT64", "FP64", "BOOL", "STRING"]) | SCALARS,
                "data": st.lists(st.integers(-2, 300), max_size=800) | JSON,
                "parameters": st.dictionaries(st.just("binary_data_size") | st.text(max_size=5), SCALARS) | SCALARS,
            },
        ),
        max_size=2,
    )
    | SCALARS,
    parameters=st.dictionaries(st.sampled_from(sorted(OPTIONS - {"delay_ms"})) | st.text(max_size=6), SCALARS)
    | SCALARS,
    outputs=st.lists(st.dictionaries(st.just("name") | st.text(max_size=4), SCALARS), max_size=3) | SCALARS,
    header_length=st.none() | TRICKY | HEADER_TEXT | st.integers(-5, 5000).map(str),
    tail=st.binary(max_size=3200),
)
def test_any_v2_request_gets_a_4xx_or_an_answer(client, inputs, parameters, outputs, header_length, tail):
    header = json.dumps({"inputs": inputs, "parameters": parameters, "outputs": outputs}).encode()
    headers = {"content-type": "application/json"}
    if (
        header_length is not None
        and header_length.isascii()
        and header_length.isprintable()
        and header_length.strip() == header_length
    ):
        headers["inference-header-content-length"] = header_length
    r = client.post("/v2/models/small/infer", content=header + tail, headers=headers)
    assert _ok(r), (inputs, parameters, outputs, header_length, r.status_code, r.text[:300])


@seed(18)
@FUZZ
@given(
    rows=st.integers(1, 3),
    datatype=st.sampled_from(["UINT8", "FP32", "INT32", "INT64", "FP64"]),
    parameters=st.dictionaries(st.sampled_from(sorted(OPTIONS - {"delay_ms"})), SCALARS, max_size=4),
    outputs=st.none() | st.lists(st.sampled_from(["label", "probabilities", "value", "is_class"]), max_size=2),
)
def test_v2_requests_with_a_valid_tensor_and_any_parameters(client, rows, datatype, parameters, outputs):
    body = {
        "inputs": [{"name": "input", "shape": [rows, 784], "datatype": datatype, "data": _image(rows)}],
        "parameters": parameters,
    }
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    headers = {"content-type": "application/json"}
    r = client.post("/v2/models/small/infer", content=json.dumps(body).encode(), headers=headers)  # NaN too
    assert _ok(r), (parameters, outputs, r.status_code, r.text[:300])
    STATUSES.append(r.status_code)


def test_the_fuzzing_took_no_module_out_of_rotation(client: TestClient):
    # runs after the tests above, on the same server; they reached the engine, and were refused too
    assert 200 in STATUSES and any(400 <= s < 500 for s in STATUSES), sorted(set(STATUSES))
    assert _closed(client)
    r = client.post("/predict", json={"inputs": _image(2)})
    assert r.status_code == 200 and len(r.json()["modules"]["used"]) == 40


@seed(18)
@FUZZ
@given(raw=st.dictionaries(QUERY_KEYS, SCALARS, max_size=6))
def test_the_option_parser_answers_options_or_a_4xx(raw: dict[str, object]):
    class _Request:  # the parser asks the request only whether it may inject faults
        headers: ClassVar[dict[str, str]] = {}

        class app:
            class state:
                settings = Settings(allow_fault_injection=True)

    for kind in ("query parameter", "parameter"):
        try:
            options = predict_options(raw, _Request(), kind=kind)  # type: ignore[arg-type]
        except ApiError as e:
            assert 400 <= e.status_code < 500 and str(e)
        except Exception as e:  # the domain's own checks (PredictOptions): also a 4xx
            assert type(e).__name__ == "InvalidRequest", e
        else:
            assert options.budget is None or type(options.budget) is int
            assert options.deadline_ms is None or math.isfinite(options.deadline_ms)
