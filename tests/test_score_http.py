"""POST /score of the scorer's HTTP handler (the replica class itself, no Ray): client
errors are 400 with a reason (413 for a body over the limit, refused before it is read
whole), never 500, and a NaN score is never a 200."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import torch
from starlette.requests import Request

from serve_app.app import Scorer
from serve_app.config import ServiceConfig
from streaming.protocol import ProtocolLimits
from tests.test_serve_runtime import make_bundle

ITEM = [{"item_id": "i1", "features": {"advertiser": "acme"}}]


def auction(**fields: object) -> dict:
    return {"version": 1, "auction_id": "h-1", "sent_at_ms": 0, "context": {"user": "u1"}, "items": ITEM, **fields}


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    replica = Scorer.func_or_class(ServiceConfig(limits=ProtocolLimits(max_message_bytes=50_000)))
    replica.reconfigure({"bundle": str(make_bundle(tmp_path_factory.mktemp("bundle")))})
    yield replica
    torch.set_num_threads(1)


def post(scorer: object, body: bytes, content_type: str = "application/json", length: int | None = None) -> tuple[int, dict]:
    chunks = [body[n : n + 4096] for n in range(0, len(body), 4096)] or [b""]
    received = []

    async def receive() -> dict:
        chunk = chunks.pop(0)
        received.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    headers = [(b"content-type", content_type.encode())]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    request = Request({"type": "http", "method": "POST", "path": "/score", "headers": headers, "query_string": b""}, receive)
    response = asyncio.run(scorer(request))
    payload = msgpack.unpackb(response.body) if content_type == "application/msgpack" else json.loads(response.body)
    return response.status_code, payload | {"_chunks_read": len(received)}


def test_a_valid_auction_is_scored(scorer: object) -> None:
    status, reply = post(scorer, json.dumps(auction()).encode())
    assert status == 200 and reply["auction_id"] == "h-1" and len(reply["scores"]) == 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "message_too_large"),
        (b"[" * 20_000 + b"]" * 20_000, "malformed_json"),  # deeper than json's recursion limit
        (json.dumps(auction(sent_at_ms=1 << 70)).encode(), "invalid_value"),  # no msgpack integer holds it
        (json.dumps(auction(context={"tags": {"sport": 1e300}})).encode(), "invalid_value"),  # inf in float32
        (json.dumps(auction(auction_id=float("nan"))).encode(), "wrong_type"),
        (b"\xff\xfe", "malformed_json"),
    ],
)
def test_client_errors_are_400_with_a_reason(scorer: object, body: bytes, reason: str) -> None:
    status, error = post(scorer, body, length=len(body))
    assert (status, error["reason"]) == (413 if reason == "message_too_large" else 400, reason)


def test_a_body_over_the_limit_is_refused_before_it_is_read_whole(scorer: object) -> None:
    body = msgpack.packb(auction(context={"user": "u" * 200_000}))
    status, error = post(scorer, body, content_type="application/msgpack")  # no Content-Length: streamed
    assert (status, error["reason"]) == (413, "message_too_large")
    assert error["_chunks_read"] < len(body) // 4096


def test_mixed_key_types_are_400(scorer: object) -> None:
    body = msgpack.packb(auction(context={"user": "u1", b"raw": 1}), use_bin_type=True)
    status, error = post(scorer, body, content_type="application/msgpack")
    assert (status, error["reason"]) == (400, "unknown_field")
