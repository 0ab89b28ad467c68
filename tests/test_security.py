"""TLS, mTLS and bearer tokens on real servers (certificates made at test time with trustme, never
committed keys); health stays open without a token, reflection goes behind it."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from conftest import REPO, ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lcmserve import Client, UnauthenticatedError, UnavailableError

trustme = pytest.importorskip("trustme")

TOKEN = "s3cret-token-for-tests"
SMALL = dict(num_inference_steps=1, width=64, height=64)


class Pki:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files."""

    def __init__(self, root: pathlib.Path) -> None:
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert("client@lcmserve.test")
        self.dir = root
        self.ca = self._write("ca.pem", ca.cert_pem.bytes())
        self.server_cert = self._write("server.pem", b"".join(b.bytes() for b in server.cert_chain_pems))
        self.server_key = self._write("server.key", server.private_key_pem.bytes())
        self.client_cert = self._write("client.pem", b"".join(b.bytes() for b in client.cert_chain_pems))
        self.client_key = self._write("client.key", client.private_key_pem.bytes())
        other = trustme.CA().issue_cert("intruder@lcmserve.test")  # signed by a CA the server does not trust
        self.other_cert = self._write("other.pem", b"".join(b.bytes() for b in other.cert_chain_pems))
        self.other_key = self._write("other.key", other.private_key_pem.bytes())

    def _write(self, name: str, data: bytes) -> pathlib.Path:
        path = self.dir / name
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_token_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """TLS (no client certificates) and a token file with two tokens."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    tokens.write_text(f"# tokens, one a line\nother-token\n\n{TOKEN}\n")
    server = ServerProcess("--model", "tiny", "--metrics-port", "-1", "--tls-cert", str(pki.server_cert),
                           "--tls-key", str(pki.server_key), "--auth-token-file", str(tokens), "--http-port", "0")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[ServerProcess]:
    server = ServerProcess("--model", "tiny", "--metrics-port", "-1", "--no-reflection",
                           "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                           "--tls-client-ca", str(pki.ca), "--http-port", "0")
    yield server
    server.stop()


def _roots(pki: Pki) -> bytes:
    return pki.ca.read_bytes()


# ---- TLS and tokens -------------------------------------------------------------------------------


def test_tls_client_with_the_token_generates(tls_token_server: ServerProcess, pki: Pki) -> None:
    with Client(tls_token_server.target, root_certificates=_roots(pki), token=TOKEN, timeout=60) as client:
        result = client.generate("over TLS", seed=3, **SMALL)
        info = client.model_info()
    assert len(result.images) == 1 and info.base == "tiny"


def test_http_port_is_https_with_the_same_certificate_and_tokens(tls_token_server: ServerProcess, pki: Pki) -> None:
    """serve --http-port with --tls-cert: HTTPS only, the gRPC port's certificate, the same tokens
    (health open); `lcmserve bench --target https://...` drives it."""
    import asyncio
    import ssl

    import httpx

    from lcmserve.bench import BenchConfig, Level, RequestShape, run_bench

    base = f"https://{tls_token_server.http_target}"
    trust = ssl.create_default_context(cafile=str(pki.ca))
    with httpx.Client(base_url=base, verify=trust, timeout=60) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{tls_token_server.http_target}/health", timeout=10)  # no plaintext
    config = BenchConfig(target=base, levels=(Level(concurrency=1),), requests=2, warmup=0, root_certificates=_roots(pki),
                         token=TOKEN, shape=RequestShape(**SMALL), progress=False)  # type: ignore[arg-type]
    assert asyncio.run(run_bench(config)).levels[0].ok == 2


def test_plaintext_is_refused_by_a_tls_server(tls_token_server: ServerProcess) -> None:
    with Client(tls_token_server.target, token=TOKEN, timeout=10) as client, pytest.raises(UnavailableError):
        client.generate("plaintext", **SMALL)


def test_missing_or_wrong_token_is_unauthenticated(tls_token_server: ServerProcess, pki: Pki,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LCMSERVE_TOKEN", raising=False)
    for token in (None, "wrong-token", TOKEN + "x"):
        with Client(tls_token_server.target, root_certificates=_roots(pki), token=token, timeout=30) as client:
            with pytest.raises(UnauthenticatedError, match="token"):
                client.generate("no entry", **SMALL)
            with pytest.raises(UnauthenticatedError):
                client.model_info()
            assert client.health_status() == "SERVING"  # probes need no secret
    monkeypatch.setenv("LCMSERVE_TOKEN", "other-token")  # the SDK reads the environment; any listed token works
    with Client(tls_token_server.target, root_certificates=_roots(pki), timeout=60) as client:
        assert client.generate("from the environment", **SMALL).images


def test_health_is_open_and_reflection_needs_the_token(tls_token_server: ServerProcess, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=_roots(pki))
    with grpc.secure_channel(tls_token_server.target, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="lcmserve.v1.GenerationService"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        with pytest.raises(grpc.RpcError) as refused:
            list(reflection.ServerReflectionInfo(iter(ask), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = reflection.ServerReflectionInfo(iter(ask), timeout=10,
                                                  metadata=(("authorization", f"Bearer {TOKEN}"),))
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert "lcmserve.v1.GenerationService" in names


def test_cli_takes_tls_and_token_flags(tls_token_server: ServerProcess, pki: Pki, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "wall.jpg"
    base = [sys.executable, "-m", "lcmserve.cli", "generate", "a wall", "--target", tls_token_server.target,
            "--root-certificates", str(pki.ca), "--steps", "1", "--width", "64", "--height", "64", "-o", str(out)]
    done = subprocess.run([*base, "--token", TOKEN], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 0
    refused = subprocess.run([*base, "--token", "wrong"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr + refused.stdout


# ---- mTLS -----------------------------------------------------------------------------------------


def test_mtls_requires_a_client_certificate_the_server_trusts(mtls_server: ServerProcess, pki: Pki) -> None:
    roots = _roots(pki)
    with Client(mtls_server.target, root_certificates=roots, client_cert=pki.client_cert.read_bytes(),
                client_key=pki.client_key.read_bytes(), timeout=60) as client:
        assert len(client.generate("with a certificate", **SMALL).images) == 1
    with Client(mtls_server.target, root_certificates=roots, timeout=10) as client:
        with pytest.raises(UnavailableError):
            client.generate("without a certificate", **SMALL)
        assert not client.health()  # the handshake itself fails: nothing is open without a certificate
    with Client(mtls_server.target, root_certificates=roots, client_cert=pki.other_cert.read_bytes(),
                client_key=pki.other_key.read_bytes(), timeout=10) as client:
        with pytest.raises(UnavailableError):
            client.generate("a stranger's certificate", **SMALL)


def test_https_port_requires_a_trusted_client_certificate_with_mtls(mtls_server: ServerProcess, pki: Pki) -> None:
    import ssl

    import httpx

    url = f"https://{mtls_server.http_target}/health"
    anonymous = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=anonymous, timeout=10)
    trusted = ssl.create_default_context(cafile=str(pki.ca))
    trusted.load_cert_chain(pki.client_cert, pki.client_key)
    assert httpx.get(url, verify=trusted, timeout=10).status_code == 200


def test_no_reflection_flag(mtls_server: ServerProcess, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=_roots(pki),
                                               private_key=pki.client_key.read_bytes(),
                                               certificate_chain=pki.client_cert.read_bytes())
    with grpc.secure_channel(mtls_server.target, credentials) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        with pytest.raises(grpc.RpcError) as info:
            list(reflection.ServerReflectionInfo(iter(ask), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_serve_refuses_unusable_security_flags(tmp_path: pathlib.Path, pki: Pki) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    cases = [
        (["--tls-cert", str(pki.server_cert)], "--tls-key"),
        (["--tls-client-ca", str(pki.ca)], "--tls-cert"),
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(pki.server_key)], "missing.pem"),
        (["--auth-token-file", str(empty)], "no token"),
    ]
    for flags, named in cases:
        done = subprocess.run([sys.executable, "-m", "lcmserve.cli", "serve", "--model", "tiny", "--port", "0",
                               "--metrics-port", "-1", *flags], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (flags, done.stderr)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and named in lines[0], (flags, done.stderr)
