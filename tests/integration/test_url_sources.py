"""Images given as https URLs: the flow downloads them and knows them by their content.

A real TLS server on 127.0.0.1 (a certificate made here, trusted through ``SSL_CERT_FILE``,
as a user behind a private CA would) serves the images; the real inference server embeds them.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.fault_proxy import FaultProxy
from support.images import make_image

from prefect_roboflow.blocks import Clip, InferenceServer
from prefect_roboflow.flows import embed_images

pytestmark = pytest.mark.server


@dataclass
class HttpsFolder:
    url: str
    folder: Path
    ca_file: Path


class _Handler(SimpleHTTPRequestHandler):
    """Serves the folder, and records how many downloads were ever in flight at once."""

    lock = threading.Lock()
    in_flight = most_in_flight = 0
    overlapped = threading.Event()

    def do_GET(self) -> None:
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.most_in_flight = max(cls.most_in_flight, cls.in_flight)
            if cls.in_flight > 1:
                cls.overlapped.set()
        cls.overlapped.wait(timeout=5)  # a second concurrent download releases this at once
        try:
            super().do_GET()
        finally:
            with cls.lock:
                cls.in_flight -= 1

    def log_message(self, format: str, *args: object) -> None:
        pass


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files (the certificate is its own CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prefect-roboflow test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


@pytest.fixture(scope="module")
def https_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpsFolder]:
    folder, tls = tmp_path_factory.mktemp("served"), tmp_path_factory.mktemp("tls")
    for i in range(3):
        (folder / f"photo_{i}.png").write_bytes(make_image(800 + i))
    cert_file, key_file = _self_signed(tls)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(folder)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield HttpsFolder(f"https://127.0.0.1:{server.server_address[1]}", folder, cert_file)
    finally:
        server.shutdown()
        server.server_close()


def test_embed_images_downloads_urls_and_caches_them_by_content(
    https_folder: HttpsFolder,
    proxy: FaultProxy,
    inference_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(https_folder.ca_file))
    base, cache = https_folder.url, str(tmp_path / "cache")
    urls = [f"{base}/photo_{i}.png" for i in range(3)] + [f"{base}/missing.png"]

    result = embed_images(urls, str(tmp_path / "out"), server=proxy.url, cache_storage=cache)
    rows = pq.read_table(result.embeddings_path).to_pylist()
    assert [r["image_ref"] for r in rows] == urls
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert "download failed" in rows[3]["error"] and "404" in rows[3]["error"]
    assert _Handler.most_in_flight > 1  # a batch's URLs are downloaded concurrently
    # the server got the downloaded bytes, not the URL, and embedded the same pictures as from disk
    assert proxy.count("/clip/embed_image") == 3
    assert not any(base.encode() in r.body for r in proxy.requests)
    local = Clip(server=InferenceServer(api_url=inference_url)).embed_images(
        [str(https_folder.folder / f"photo_{i}.png") for i in range(3)]
    )
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows[:3]]), local, rtol=1e-5, atol=1e-6)

    # the same picture at another URL is not sent again; a changed picture at a known URL is
    shutil.copy(https_folder.folder / "photo_0.png", https_folder.folder / "copy_of_0.png")
    (https_folder.folder / "photo_1.png").write_bytes(make_image(900))
    proxy.clear()
    again = embed_images(
        [f"{base}/copy_of_0.png", f"{base}/photo_1.png"], str(tmp_path / "again"), server=proxy.url, cache_storage=cache
    )
    assert (again.from_cache, again.requests, proxy.count("/clip/embed_image")) == (1, 1, 1)


def test_an_untrusted_certificate_is_a_failed_row_not_a_crash(
    https_folder: HttpsFolder, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other_ca, _ = _self_signed(tmp_path)  # trusted instead of the server's own certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(other_ca))
    url = f"{https_folder.url}/photo_2.png"
    result = embed_images(
        [url, str(https_folder.folder / "photo_2.png")],
        str(tmp_path / "out"),
        server=proxy.url,
        cache_storage=str(tmp_path / "cache"),
    )
    rows = pq.read_table(result.embeddings_path).to_pylist()
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert "download failed: ConnectError" in rows[0]["error"] and "CERTIFICATE_VERIFY_FAILED" in rows[0]["error"]
    assert proxy.count("/clip/embed_image") == 1
