"""Fuzzing the HTTP front door (issue 22): random and malformed JSON, wrong types and content types,
bodies over the limit, multipart forms without parts, invalid base64 and images. Every answer is
2xx or 4xx, every 4xx is in OpenAI's error shape, and the server keeps serving. Valid examples stay
cheap (64x64, few steps)."""

from __future__ import annotations

import base64
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import ServerProcess

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

JSON_ROUTES = ("/v1/images/generations", "/v1/generate")
SETTINGS = hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None,
                               suppress_health_check=list(hypothesis.HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
# Fields of each route: values that are right, wrong in range, or of the wrong type. The sides are
# always set (unset means 512x512), mostly to 64x64.
COMMON = {
    "prompt": st.sampled_from(["a crack", "", " ", "<script>alert(1)</script>", 7, None]),
    "num_inference_steps": st.sampled_from([1, 2, 0, 9, -1, "1", 2**40]),
    "seed": st.sampled_from([0, 7, -1, 2**64, "7", 1.0]),
    "guidance_scale": st.sampled_from([1.0, 2.5, 0.0, 100, "nan", None]),
    "decoder": st.sampled_from(["vae", "tiny_vae", "other", 1, "DECODER_VAE"]),
    "adapters": st.sampled_from([[], [{"name": "nope"}], {"a": 1}, "x", [1], [{"name": "x", "scale": "y"}]]),
    "candidates": st.sampled_from([1, 2, 0]),
    "bogus": json_values,
}
OPENAI = {**COMMON,
          "n": st.sampled_from([1, 2, 0, 9, -1, "2", 1.5, True]),
          "output_format": st.sampled_from(["png", "jpeg", "webp", "gif", "", 3]),
          "response_format": st.sampled_from(["b64_json", "url", "x"]),
          "stream": st.sampled_from([False, True, "yes"]),
          "partial_images": st.sampled_from([0, 1, 3, 4, -1]),
          "output_compression": st.sampled_from([50, 0, 101]),
          "quality": st.sampled_from(["high", 3])}
NATIVE = {**COMMON,
          "num_images": st.sampled_from([1, 2, 0, -1, "2"]),
          "output_format": st.sampled_from(["OUTPUT_FORMAT_PNG", "OUTPUT_FORMAT_RAW", "PNG", 99]),
          "preview_mode": st.sampled_from(["PREVIEW_MODE_APPROX", "PREVIEW_MODE_TINY_VAE", "x"]),
          "init_image": st.sampled_from(["not base64!", base64.b64encode(b"not an image").decode(), ""]),
          "mask_image": st.sampled_from(["%%%", base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()]),
          "strength": st.sampled_from([0.5, 2, "x"])}
SIZES = {"size": st.sampled_from(["64x64", "64x64", "72x64", "65x64", "64", "x", "0x0", "99999999999x1", 64])}
SIDES = {"width": st.sampled_from([64, 64, 72, 65, -1, "64"]), "height": st.sampled_from([64, 64, 0, 2**33])}


@pytest.fixture(scope="module")
def base(tiny_artifact: pathlib.Path) -> Iterator[str]:
    process = ServerProcess("--model", str(tiny_artifact), "--http-port", "0", "--metrics-port", "-1")
    try:
        yield f"http://{process.http_target}"
    finally:
        process.stop()


@pytest.fixture(scope="module")
def http(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=60) as client:
        yield client


def check(response: httpx.Response) -> None:
    """2xx, or 4xx with {"error": {"message", "type", "param", "code"}}; nothing a client's text can
    turn into markup is answered as HTML."""
    assert 200 <= response.status_code < 500, (response.status_code, response.text[:500])
    assert "html" not in response.headers.get("content-type", "")
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"} and isinstance(error["message"], str)


def cases() -> Any:
    """(route, body): a field dictionary of the route, or any JSON, or broken JSON, or random bytes."""
    def bodies(fields: Any) -> Any:
        text = st.one_of(fields.map(json.dumps), fields.map(json.dumps), json_values.map(json.dumps),
                         st.text(max_size=50), st.sampled_from(["{\"prompt\": ", "[1, 2", "\"\\ud800\"", "{" * 5000]))
        return st.one_of(text.map(str.encode), st.binary(max_size=80))

    openai = st.fixed_dictionaries(SIZES, optional=OPENAI)
    native = st.fixed_dictionaries(SIDES, optional=NATIVE)
    return st.one_of(st.tuples(st.just("/v1/images/generations"), bodies(openai)),
                     st.tuples(st.just("/v1/generate"), bodies(native)))


@SETTINGS
@hypothesis.given(case=cases(), content_type=st.sampled_from(["application/json", "application/json", "text/plain",
                                                              "", "multipart/form-data",
                                                              "application/json; charset=utf-8"]))
def test_json_routes_answer_2xx_or_4xx_in_openai_shape(http: httpx.Client, case: tuple[str, bytes],
                                                       content_type: str) -> None:
    route, body = case
    headers = {"content-type": content_type} if content_type else {}
    check(http.post(route, content=body, headers=headers))


@SETTINGS
@hypothesis.given(parts=st.lists(st.sampled_from(["image", "mask", "prompt", "n", "size", "strength", "stream",
                                                  "image[]", "bogus"]), max_size=5),
                  image=st.sampled_from([b"", b"GIF89a", b"\x89PNG\r\n\x1a\n" + b"\0" * 20, b"x" * 100]))
def test_edits_with_missing_or_broken_parts(http: httpx.Client, parts: list[str], image: bytes) -> None:
    files = [(name, ("f.png", image, "image/png")) for name in parts if name in ("image", "mask", "image[]")]
    data = {name: {"prompt": "a crack", "n": "1", "size": "64x64", "strength": "0.5", "stream": "maybe",
                   "bogus": "1"}[name] for name in parts if name not in ("image", "mask", "image[]")}
    check(http.post("/v1/images/edits", files=files or None, data=data or None))


def test_no_parts_wrong_content_and_bodies_over_the_limit(http: httpx.Client) -> None:
    empty = http.post("/v1/images/edits", content=b"", headers={"content-type": "multipart/form-data; boundary=x"})
    assert empty.status_code == 400
    check(empty)
    assert http.post("/v1/images/edits", json={"prompt": "x"}).status_code == 415
    for route, size in (("/v1/images/generations", 2 * 1024 * 1024), ("/v1/generate", 12 * 1024 * 1024),
                        ("/v1/images/edits", 8 * 1024 * 1024)):
        kind = "multipart/form-data; boundary=x" if route.endswith("edits") else "application/json"
        declared = http.post(route, content=b"{" + b" " * size + b"}", headers={"content-type": kind})
        assert declared.status_code == 413, route
        check(declared)
        assert "bytes" in declared.json()["error"]["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
            for _ in range(size // 65536 + 1):
                yield b" " * 65536

        chunked = http.post(route, content=chunks(), headers={"content-type": kind})
        assert chunked.status_code == 413, route


def test_still_serving_after_the_fuzz(http: httpx.Client) -> None:
    assert http.get("/ready").json() == {"status": "SERVING"}
    answer = http.post("/v1/images/generations", json={"prompt": "a crack", "size": "64x64",
                                                       "num_inference_steps": 1})
    assert answer.status_code == 200 and answer.json()["data"][0]["b64_json"]
