"""`llmrun serve` option handling that needs no running server: bad --model, exposure warning, port in use."""

from __future__ import annotations

import socket

from click.testing import CliRunner

from runner.cli import cli


def test_missing_model_file_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path / "nope.gguf")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "error:" in r.output and "nope.gguf" in r.output


def test_exposed_without_key_warns_and_port_in_use_is_reported(demo_gguf):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        r = CliRunner().invoke(cli, ["serve", "--model", str(demo_gguf), "--host", "0.0.0.0", "--port", str(port)])
    finally:
        s.close()
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "WITHOUT an API key" in r.output
    assert f"cannot listen on 0.0.0.0:{port}" in r.output and "--port" in r.output


def test_bad_max_body_is_a_usage_error(demo_gguf):
    r = CliRunner().invoke(cli, ["serve", "--model", str(demo_gguf), "--max-body", "lots"])
    assert r.exit_code == 2 and "--max-body" in r.output
