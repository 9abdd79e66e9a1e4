import json
import shlex
import subprocess
import sys

from tests.conftest import write_jsonl
from weitiao.cli import main


def test_data_inspect_reports_format_lengths_truncation_and_labels(tmp_path, capsys, default_model_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Count", "input": "", "output": " ".join(str(i) for i in range(300))},
        {"instruction": "Broken"}])
    assert main(["data", "inspect", str(path), "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "format:   alpaca (detected)" in out
    assert "records:  3 in 1 file(s); usable: 2" in out
    assert "1 x missing field" in out and "record 3 (line 3): field 'output'" in out
    assert "at max_length 64 (truncation: right): 1 truncated, 0 dropped" in out
    assert "[[hi<|im_end|>]]" in out  # the trained tokens of example 0, marked


def test_data_convert_alpaca_to_sharegpt(tmp_path, capsys):
    source = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q", "input": "ctx", "output": "A"}])
    target = tmp_path / "b.json"
    assert main(["data", "convert", str(source), "--to", "sharegpt", str(target)]) == 0
    assert json.loads(target.read_text()) == [{"conversations": [{"from": "human", "value": "Q\nctx"},
                                                                 {"from": "gpt", "value": "A"}]}]
    assert "read 1 records, wrote 1" in capsys.readouterr().out


def test_user_errors_are_one_line_without_traceback(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3.5, ', encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  train: {data}\ntrain:\n  output_dir: {tmp_path / 'out'}\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "weitiao", "train", str(config)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {data}: record 2 (line 2): invalid JSON: Expecting property name enclosed in double quotes at column "
        "37; the line ends before its JSON closes with '}': it looks cut off")


def test_unknown_override_is_a_user_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  seed: 1\n", encoding="utf-8")
    assert main(["train", str(config), "--learning-rte", "1"]) == 2
    assert "unknown config key 'learning-rte' (did you mean 'learning_rate'?)" in capsys.readouterr().err


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    # `weitiao data inspect x | head`: head exits early; a traceback would follow every such use.
    program = ("import weitiao.cli as cli\n"
               "cli.cmd_data_convert = lambda args, extra: [print('line', i) for i in range(200_000)]\n"
               "raise SystemExit(cli.main(['data', 'convert', 'in.jsonl', '--to', 'openai', 'out.jsonl']))\n")
    result = subprocess.run(f"{shlex.quote(sys.executable)} -c {shlex.quote(program)} | head -n 1; "
                            "echo \"status ${PIPESTATUS[0]}\"", shell=True, executable="/bin/bash",
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.stdout.splitlines() == ["line 0", "status 141"]
    assert result.stderr == ""
