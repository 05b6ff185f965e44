"""The demo's echoed commands can be copied and pasted: the interpreter is
named, every argument survives the shell, and the secret is `$EDGE_KEY`
(set in the line above), never printed, never dropped."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from deploy.demo import command_line, make_secrets, secret_line

KEY = "eik_s3cr3t-value_with-dashes"


def test_an_echoed_command_names_the_interpreter_and_hides_the_key_as_a_variable(tmp_path: Path):
    root = tmp_path / "checkout"
    (root / ".venv" / "bin").mkdir(parents=True)
    py = str(root / ".venv" / "bin" / "python")
    argv = [py, "-m", "loadtest", "ping", "--url", "https://127.0.0.1:8443/", "--api-key", KEY, "--ca",
            str(root / ".demo" / "pki" / "ca.pem"), "--label", "a b"]
    line = command_line(argv, {KEY: "EDGE_KEY"}, root)
    assert KEY not in line
    assert line.startswith(".venv/bin/python -m loadtest ping ")
    assert '--api-key "$EDGE_KEY"' in line and "--ca .demo/pki/ca.pem" in line
    # Pasted into a shell with the variable set, it is the same command.
    echo = subprocess.run(["sh", "-c", 'for a in ' + line + '; do printf "%s\\n" "$a"; done'],
                          env={**os.environ, "EDGE_KEY": KEY}, capture_output=True, text=True, check=True)
    assert echo.stdout.splitlines()[argv.index("--api-key") + 1] == KEY
    assert shlex.split(line.replace('"$EDGE_KEY"', KEY)) == [
        ".venv/bin/python", *argv[1:9], ".demo/pki/ca.pem", "--label", "a b"]


def test_a_key_inside_an_argument_is_a_variable_in_double_quotes(tmp_path: Path):
    argv = ["curl", "-H", f"Authorization: Bearer {KEY}", "-H", f'X-Odd: "{KEY}_2"$`x`\\', "--data-binary", "@a b.jpg"]
    line = command_line(argv, {KEY: "EDGE_KEY"}, tmp_path)
    assert KEY not in line and '"Authorization: Bearer $EDGE_KEY"' in line
    assert '"X-Odd: \\"${EDGE_KEY}_2\\"\\$\\`x\\`\\\\"' in line
    echo = subprocess.run(["sh", "-c", 'for a in ' + line + '; do printf "%s\\n" "$a"; done'],
                          env={**os.environ, "EDGE_KEY": KEY}, capture_output=True, text=True, check=True)
    assert echo.stdout.splitlines() == argv


def test_an_interpreter_outside_the_checkout_is_named_in_full(tmp_path: Path):
    line = command_line(["/usr/bin/python3", "-m", "loadtest", "compare", "a.json"], {}, tmp_path)
    assert line == "/usr/bin/python3 -m loadtest compare a.json"


def test_the_variable_line_reads_the_key_file_and_the_secrets_are_0600_in_a_private_folder(tmp_path: Path):
    state = tmp_path / ".demo"
    state.mkdir()
    files, _, _, key, key_file = make_secrets(state)
    assert key_file.read_text().strip() == key
    assert (key_file.stat().st_mode & 0o777) == 0o600
    assert ((state / "secrets" / "worker-token").stat().st_mode & 0o777) == 0o600
    assert ((state / "secrets").stat().st_mode & 0o777) == 0o700
    line = secret_line("EDGE_KEY", key_file, tmp_path)
    assert line == 'EDGE_KEY="$(cat .demo/secrets/client-key)"'
    out = subprocess.run(["sh", "-c", line + '; printf %s "$EDGE_KEY"'], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert out.stdout == key
    assert files["ca"].is_file()
