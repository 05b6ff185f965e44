"""The command-line contract: secrets alone on stdout, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from edge_proxy import auth


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)


def test_keys_and_tokens_create_print_the_secret_alone_and_store_its_hash(tmp_path):
    keys = tmp_path / "keys.json"
    r = cli("-m", "edge_proxy", "keys", "create", "--file", str(keys), "--name", "alice")
    assert r.returncode == 0
    secret = r.stdout.strip()
    assert r.stdout == secret + "\n" and secret.startswith(auth.CLIENT_KEY_PREFIX)
    assert "only once" in r.stderr
    stored = json.loads(keys.read_text())["credentials"][0]
    assert stored["name"] == "alice" and secret not in keys.read_text()
    assert auth.CredentialStore.load(keys).verify(secret) is not None
    r = cli("-m", "edge_proxy", "tokens", "create", "--file", str(tmp_path / "tokens.json"), "--name", "w")
    assert r.stdout.strip().startswith(auth.WORKER_TOKEN_PREFIX)
    r = cli("-m", "edge_proxy", "keys", "revoke", "--file", str(keys), "--name", "alice")
    assert r.returncode == 0 and auth.CredentialStore.load(keys).verify(secret) is None


def test_keys_create_makes_a_non_admin_key_unless_admin_is_given(tmp_path):
    keys = tmp_path / "keys.json"
    plain = cli("-m", "edge_proxy", "keys", "create", "--file", str(keys), "--name", "app")
    admin = cli("-m", "edge_proxy", "keys", "create", "--file", str(keys), "--name", "ops", "--admin")
    assert plain.returncode == admin.returncode == 0, plain.stderr + admin.stderr
    store = auth.CredentialStore.load(keys)
    app, ops = store.verify(plain.stdout.strip()), store.verify(admin.stdout.strip())
    assert app is not None and not app.admin and "not admin" in plain.stderr
    assert ops is not None and ops.admin and "admin client key" in admin.stderr
    both = cli("-m", "edge_proxy", "keys", "create", "--file", str(keys), "--name", "x", "--admin", "--no-admin")
    assert both.returncode != 0 and "contradict" in both.stderr


def test_certs_makes_a_ca_an_edge_certificate_and_worker_certificates(tmp_path):
    from cryptography import x509

    r = cli("-m", "edge_proxy", "certs", "--out", str(tmp_path), "--host", "edge.example.org", "--host", "10.1.2.3",
            "--worker", "gpu1")
    assert r.returncode == 0, r.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "edge.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "edge.example.org" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert (tmp_path / "edge-key.pem").stat().st_mode & 0o077 == 0
    assert (tmp_path / "worker-gpu1.pem").exists() and (tmp_path / "ca.pem").exists()


def test_agent_start_up_errors_are_one_line(tmp_path):
    r = cli("-m", "worker_agent", "--edge", "wss://127.0.0.1:1/_edge/tunnel")
    assert r.returncode == 2 and "no worker token" in r.stderr and "Traceback" not in r.stderr
    r = cli("-m", "worker_agent", "--edge", "https://x", "--token", "t")
    assert r.returncode == 2 and "must start with wss://" in r.stderr
    r = cli("-m", "worker_agent", "--edge", "wss://x/_edge/tunnel", "--token", "t", "--ca", str(tmp_path / "nope.pem"))
    assert r.returncode == 2 and "cannot load CA file" in r.stderr and "Traceback" not in r.stderr
    # Settings the edge would refuse in the HELLO are refused at start-up, saying why.
    r = cli("-m", "worker_agent", "--edge", "wss://x/_edge/tunnel", "--token", "t", "--health-path", "v2/ready")
    assert r.returncode == 2 and "--health-path: 'v2/ready' must be a path" in r.stderr and "Traceback" not in r.stderr
    r = cli("-m", "worker_agent", "--edge", "wss://x/_edge/tunnel", "--token", "t", "--id", "../etc")
    assert r.returncode == 2 and "--id: '../etc' must be" in r.stderr and "Traceback" not in r.stderr


def test_inspector_options_refuse_values_that_make_no_sense() -> None:
    r = cli("-m", "edge_proxy", "serve", "--inspector-requests", "-1")
    assert r.returncode == 2 and "--inspector-requests" in r.stderr and "0 or more" in r.stderr
    r = cli("-m", "edge_proxy", "serve", "--inspector-session-ttl", "0")
    assert r.returncode == 2 and "--inspector-session-ttl" in r.stderr and "Traceback" not in r.stderr
