"""mTLS end to end: prepare_tls's files in a real grpc server, identities from real
handshakes.

One in-process server with the coordinator's two kinds of port, both bound to port 0:
the main port requires a client certificate signed by the CA, the enrollment port only
authenticates the server. A generic handler answers with the caller's `Identity`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from concurrent import futures
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import grpc
import pytest

from donor_app.agent.credentials import new_key_and_csr
from donor_app.coordinator.ca import CertificateAuthority
from donor_app.coordinator.identity import donor_common_name, identity_from_auth_context
from donor_app.coordinator.tls_files import CoordinatorTls, prepare_tls

METHOD = "/donor.test.Echo/WhoAmI"
RPC_TIMEOUT_S = 10


def _who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
    # types-grpcio says Mapping[str, bytes] for the sync server; the values are lists of
    # bytes at run time (as grpc.aio's own annotation says).
    auth = cast(Mapping[str, Iterable[bytes]], context.auth_context())
    identity = identity_from_auth_context(auth)
    return json.dumps(None if identity is None else asdict(identity)).encode()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> CoordinatorTls:
    directory = tmp_path_factory.mktemp("tls")
    return prepare_tls(directory, ["localhost", "127.0.0.1", "::1"], datetime.now(UTC))


@pytest.fixture(scope="module")
def ports(tls: CoordinatorTls) -> Iterator[tuple[int, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "donor.test.Echo", {"WhoAmI": grpc.unary_unary_rpc_method_handler(_who_am_i)}
    )
    server.add_generic_rpc_handlers((handler,))
    pair = [(tls.server_key_pem, tls.server_cert_pem)]
    mtls_port = server.add_secure_port(
        "localhost:0",
        grpc.ssl_server_credentials(pair, root_certificates=tls.ca_pem, require_client_auth=True),
    )
    enroll_port = server.add_secure_port("localhost:0", grpc.ssl_server_credentials(pair))
    server.start()
    try:
        yield mtls_port, enroll_port
    finally:
        server.stop(grace=None).wait(RPC_TIMEOUT_S)


def _call(
    port: int, ca_pem: bytes, key_pem: bytes | None = None, cert_pem: bytes | None = None
) -> object:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        stub: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)
        return json.loads(stub(b"", timeout=RPC_TIMEOUT_S))


def test_a_donor_certificate_from_sign_client_identifies_the_donor(
    tls: CoordinatorTls, ports: tuple[int, int]
) -> None:
    key_pem, csr_pem = new_key_and_csr()
    issued = tls.ca.sign_client(
        csr_pem, donor_common_name("d-1"), datetime.now(UTC), timedelta(days=1)
    )

    answer = _call(ports[0], tls.ca_pem, key_pem, issued.cert_pem)

    assert answer == {"role": "donor", "donor_id": "d-1", "cert_sha256": issued.sha256}


def test_the_admin_credential_identifies_the_admin(
    tls: CoordinatorTls, ports: tuple[int, int]
) -> None:
    answer = _call(ports[0], tls.ca_pem, tls.admin_key_pem, tls.admin_cert_pem)
    assert isinstance(answer, dict)
    assert answer["role"] == "admin"
    assert answer["donor_id"] is None


def test_no_client_certificate_is_refused_at_the_handshake(
    tls: CoordinatorTls, ports: tuple[int, int]
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _call(ports[0], tls.ca_pem)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_of_another_ca_is_refused_at_the_handshake(
    tls: CoordinatorTls, ports: tuple[int, int]
) -> None:
    now = datetime.now(UTC)
    stranger = CertificateAuthority.generate(now)  # self-signed, not ours
    key_pem, csr_pem = new_key_and_csr()
    cert_pem = stranger.sign_client(csr_pem, "donor:d-1", now, timedelta(days=1)).cert_pem

    with pytest.raises(grpc.RpcError) as caught:
        _call(ports[0], tls.ca_pem, key_pem, cert_pem)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_self_signed_client_certificate_is_refused(
    tls: CoordinatorTls, ports: tuple[int, int], tmp_path: Path
) -> None:
    own = CertificateAuthority.load_or_create(tmp_path, datetime.now(UTC))
    key_pem = (tmp_path / "ca.key").read_bytes()

    with pytest.raises(grpc.RpcError) as caught:
        _call(ports[0], tls.ca_pem, key_pem, own.cert_pem)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_enrollment_port_has_no_identity(tls: CoordinatorTls, ports: tuple[int, int]) -> None:
    assert _call(ports[1], tls.ca_pem) is None


def test_the_client_verifies_the_server_against_the_ca(
    tls: CoordinatorTls, ports: tuple[int, int]
) -> None:
    stranger = CertificateAuthority.generate(datetime.now(UTC))
    with pytest.raises(grpc.RpcError) as caught:
        _call(ports[1], stranger.cert_pem)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
