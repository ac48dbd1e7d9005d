"""A Flower deployment with TLS and SuperNode authentication (Flower 1.42's own mechanisms).

The certificates and keys of :mod:`mona_sfl.runtime.flower.certs`; then a SuperLink with
``--ssl-*`` and ``--enable-supernode-auth``, one SuperNode whose public key was registered
(``flwr supernode register``) that trains, and two the SuperLink refuses: one whose key was
not registered, one without a key. Everything on 127.0.0.1, with an isolated FLWR_HOME; every process is stopped.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import stat
from pathlib import Path

import pytest

flwr = pytest.importorskip("flwr")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.serialization import load_ssh_private_key  # noqa: E402

from mona_sfl.config import schema_config  # noqa: E402
from mona_sfl.cli import main  # noqa: E402
from mona_sfl.runtime.flower import certs  # noqa: E402
from mona_sfl.runtime.flower.deploy import Running, deploy, tagged_pids  # noqa: E402


@pytest.fixture(autouse=True)
def _flower_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home_outside"))


def test_certs_are_what_flower_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    out = certs.make_test_certs(tmp_path / "c", nodes=2, days=1)
    for name in ("ca.key", "server.key", "supernode-0.key", "supernode-1.key"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o600, name
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    ssl.create_default_context().load_cert_chain(out / "server.pem", out / "server.key")  # key matches the cert
    # what flower-supernode --auth-supernode-private-key and flwr supernode register load
    key = load_ssh_private_key((out / "supernode-0.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(out / "supernode-0.pub") == public_key_to_bytes(key.public_key())
    assert try_load_public_key(out / "supernode-1.pub") != public_key_to_bytes(key.public_key())
    # never overwrites; the CLI says so with exit code 2, and adds node keys after the existing ones
    with pytest.raises(certs.CertError, match="ca.crt, .*server.pem already exist: keys and certificates are never overwritten"):
        certs.make_test_certs(out)
    assert main(["certs", str(out)]) == 2
    assert main(["certs", str(out), "--node-keys-only", "--nodes", "1"]) == 0
    assert (out / "supernode-2.key").is_file() and (out / "supernode-0.key").read_bytes() == (tmp_path / "c" / "supernode-0.key").read_bytes()


@pytest.mark.slow
def test_authenticated_supernode_trains_unknown_one_is_refused(tmp_path: Path) -> None:
    tls = certs.make_test_certs(tmp_path / "certs", nodes=1, days=1)
    intruder_key, _ = certs.make_node_key(tmp_path / "intruder", 0)  # a valid key pair, never registered
    cfg = schema_config([
        "runtime=flower", "flower.num_supernodes=1", "flower.step_timeout_s=120",
        "fed.num_clients=1", "train.max_steps=1", "train.batch_size=8", "train.steps_per_epoch=1",
        "model.width=0.125", "algo.K=64", "algo.dim=16", "algo.hidden_dim=32",
        "data.synthetic_size=100", "data.synthetic_test_size=0", "eval.linear=false", "eval.every=0",
    ])  # fmt: skip
    seen: dict = {}

    def on_ready(r: Running) -> None:
        # TLS: plaintext is refused, and the certificate verifies against our CA only
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            c = http.client.HTTPConnection("127.0.0.1", r.port, timeout=10)
            c.request("GET", "/")
            c.getresponse()
        with pytest.raises(ssl.SSLCertVerificationError):
            http.client.HTTPSConnection("127.0.0.1", r.port, timeout=10, context=ssl.create_default_context()).request("GET", "/")
        c = http.client.HTTPSConnection("127.0.0.1", r.port, timeout=10, context=ssl.create_default_context(cafile=tls / "ca.crt"))
        c.request("GET", "/")
        seen["https_status"] = c.getresponse().status
        # unknown SuperNodes, started like the others while the run goes on (tagged: stopped with them):
        # one with a valid key that was never registered, one without a key (it tries to self-register)
        seen["intruder"] = r.start("intruder", r.supernode_args(0, 1, key=intruder_key))
        seen["keyless"] = r.start("keyless", r.supernode_args(0, 1))

    res = deploy(
        cfg, 1, tmp_path / "run", work_dir=tmp_path / "work", tls_dir=tls, auth=True, on_ready=on_ready,
        extra_env={"OMP_NUM_THREADS": "1"}, timeout_s=600,  # ~7 messages, served by the node's long-lived ClientApp process
    )
    logs = tmp_path / "work" / "logs"
    # the authenticated SuperNode trained through TLS
    run = tmp_path / "run"
    assert {"config.toml", "metrics.jsonl", "summary.json", "checkpoint.pt"} <= {p.name for p in run.iterdir()}
    assert res["summary"]["steps"] == 1 and res["summary"]["runtime"] == "flower"
    assert "Uvicorn running on https://127.0.0.1" in (logs / "superlink.log").read_text()
    assert "root-certificates" in (tmp_path / "work" / "flwr_home" / "config.toml").read_text()
    assert seen["https_status"] > 0
    # the unknown SuperNodes were refused (Flower's exit code 305: connection error) and never counted
    for name, why in (("intruder", "Failed to activate SuperNode"), ("keyless", "All SuperNodes must be registered via the CLI")):
        text = (logs / f"{name}.log").read_text(errors="replace")
        assert seen[name].returncode == 1 and "Exit Code: 305" in text and why in text, text[-2000:]
    assert "No SuperNode found with the given public key" in (logs / "superlink.log").read_text()
    registered = set(res["registered"].values())
    assert len(registered) == 1 and [int(n["node-id"]) for n in res["nodes"]] == list(registered)
    assert [n["status"] for n in res["nodes"]] == ["online"]
    # the ServerApp's Grid saw one node: no second node with partition-id 0
    assert json.loads((run / "flower_transport.json").read_text())["flower_exchanges"] > 0
    assert "both report partition-id" not in (logs / "flwr-run-train.log").read_text()
    # every process is gone
    assert [n for n, _ in res["started"]] == ["superlink", "supernode-0", "clientapp-0", "intruder", "keyless"]
    assert res["survivors"] == [] and tagged_pids(res["tag"]) == []
