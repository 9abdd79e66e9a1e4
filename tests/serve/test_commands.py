"""User errors of the deploy commands: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import socket

import pytest

from weitiao.cli import main


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def run_failing(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_bad_adapter_syntax(capsys, tiny_model):
    assert run_failing(["serve", str(tiny_model), "--adapter", "outputs/demo"], capsys) == (
        "error: --adapter expects NAME=PATH (e.g. tuned=outputs/demo), got 'outputs/demo'")


@pytest.mark.parametrize("command", ["serve", "webui"])
def test_port_in_use(capsys, tiny_model, busy_port, command):
    line = run_failing([command, str(tiny_model), "--port", str(busy_port)], capsys)
    assert line == f"error: cannot listen on 127.0.0.1:{busy_port}: port in use; choose another with --port"


def test_missing_adapter_folder(capsys, tiny_model, tmp_path):
    line = run_failing(["chat", str(tiny_model), "--adapter", str(tmp_path / "nowhere")], capsys)
    assert line == f"error: adapter folder not found: {tmp_path / 'nowhere'}"


def test_adapter_for_another_base(capsys, other_tiny_model, tiny_adapter):
    line = run_failing(["serve", str(other_tiny_model), "--adapter", f"t={tiny_adapter}", "--port", "0"], capsys)
    assert line.startswith(f"error: adapter {tiny_adapter} was trained on ") and "hidden_size 64 vs 48" in line


def test_missing_model(capsys, tmp_path):
    line = run_failing(["chat", str(tmp_path / "no-model")], capsys)
    assert line == f"error: model path not found: {tmp_path / 'no-model'}"


@pytest.mark.parametrize("command, why", [("serve", "set an API key"), ("webui", "has no login")])
def test_all_interfaces_need_a_key_or_insecure(capsys, tiny_model, command, why):
    line = run_failing([command, str(tiny_model), "--host", "0.0.0.0", "--port", "0"], capsys)
    assert line.startswith("error: --host 0.0.0.0 makes the") and why in line and line.endswith("add --insecure "
                                                                                                 "to do it anyway")


def test_api_key_file_must_be_readable_and_not_empty(capsys, tiny_model, tmp_path):
    line = run_failing(["serve", str(tiny_model), "--api-key-file", str(tmp_path / "none")], capsys)
    assert line.startswith(f"error: cannot read --api-key-file {tmp_path / 'none'}")
    (tmp_path / "empty").write_text("\n")
    line = run_failing(["serve", str(tiny_model), "--api-key-file", str(tmp_path / "empty")], capsys)
    assert line == f"error: --api-key-file {tmp_path / 'empty'} is empty"
