"""`llmrun chat` / `llmrun run`: the real REPL in a pseudo-terminal, the piped and scripted forms, and the chat
session's commands, all with the demo model at temperature 0."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from runner.app.chat import ChatSession, Repl
from runner.engine.types import SamplingParams
from runner.engine.batching import start_engine
from runner.core.errors import UsageError
from runner.core.run_settings import RunSettings

REPO = Path(__file__).resolve().parent.parent
PROMPT = ">>>"


def _env(home) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), LLMRUN_HOME=str(home), TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")


def _llmrun(*args, home, input=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "runner", *args], input=input, capture_output=True, text=True,
                          env=_env(home), timeout=timeout)


@pytest.fixture
def repl(demo_gguf, _isolated_home):
    child = pexpect.spawn(sys.executable, ["-m", "runner", "chat", "--model", str(demo_gguf), "--temperature", "0"],
                          env=_env(_isolated_home), encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.expect(PROMPT)
    yield child
    if child.isalive():
        child.terminate(force=True)


def test_repl_answers_stops_on_ctrl_c_clears_and_exits(repl, _isolated_home):
    repl.sendline("What is the capital of France?")
    repl.expect("Paris")
    repl.expect(PROMPT)

    repl.sendline("Write a very long story about a dragon.")
    repl.expect("In the heart of")          # the reply is streaming
    repl.send("\x03")                        # Ctrl-C stops the reply, not the program
    repl.expect(r"\[stopped\]")
    repl.expect(PROMPT)
    repl.sendline("What is the capital of France?")
    repl.expect("Paris")
    repl.expect(PROMPT)

    repl.sendline("/stats")
    repl.expect(r"context used\s+([1-9]\d*) / 4096")
    repl.expect(PROMPT)
    repl.sendline("/clear")
    repl.expect("conversation cleared")
    repl.expect(PROMPT)
    repl.sendline("/stats")
    repl.expect(r"context used\s+0 / 4096")
    repl.expect(PROMPT)

    repl.send("\x03")                        # Ctrl-C at an empty prompt does not exit
    repl.expect("use /bye or Ctrl-D")
    repl.sendline("/set temperature warm")
    repl.expect("temperature must be a number")
    repl.sendline("/bye")
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0
    assert "What is the capital of France?" in (_isolated_home / "chat_history").read_text()


def test_repl_multiline_and_ctrl_d(repl):
    repl.sendline('"""')
    repl.sendline("What is the capital")
    repl.sendline('of France?"""')
    repl.expect("Paris")
    repl.expect(PROMPT)
    repl.send("What is the capital\x1b\rof France?\r")     # Esc-Enter (Alt-Enter) inserts a newline
    repl.expect("Paris")
    repl.expect(PROMPT)
    repl.sendline("/stats")
    repl.expect(r"messages\s+4")                           # two questions, two answers: one message each
    repl.expect(PROMPT)
    repl.sendeof()
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0


def test_piped_question_answers_once(demo_gguf, _isolated_home):
    r = _llmrun("chat", "--model", str(demo_gguf), "--temperature", "0", home=_isolated_home,
                input="What is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert ">>>" not in r.stdout


def test_run_prints_one_answer(demo_gguf, _isolated_home):
    r = _llmrun("run", "--model", str(demo_gguf), "--temperature", "0", "What is the capital of France?",
                home=_isolated_home)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The capital of France is Paris."
    assert "context 4096" in r.stderr       # the one-line summary goes to stderr, not into the answer


def test_run_with_a_missing_model_file_is_a_clear_error(tmp_path, _isolated_home):
    r = _llmrun("run", "--model", str(tmp_path / "missing.gguf"), "hi", home=_isolated_home)
    assert r.returncode == 1
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_bad_option_values_are_usage_errors(demo_gguf, _isolated_home):
    r = _llmrun("run", "--model", str(demo_gguf), "--temperature", "-2", "hi", home=_isolated_home)
    assert r.returncode == 2 and "temperature must be 0 or more" in r.stderr


# ------------------------------------------------------------------------------------------ the session itself

@pytest.fixture(scope="module")
def engine(demo_gguf):
    e = start_engine(demo_gguf, RunSettings(n_ctx=2048), model_name="demo")
    yield e
    e.close()


def _session(engine) -> ChatSession:
    return ChatSession(engine, params=SamplingParams(temperature=0, max_tokens=40))


def _script(session, lines: list[str]) -> tuple[str, str, int]:
    feed = iter(lines)

    def read(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    out, err = io.StringIO(), io.StringIO()
    code = Repl(session, out=out, err=err, read=read).run()
    return out.getvalue(), err.getvalue(), code


def test_set_validates_values(engine):
    s = _session(engine)
    assert s.set("temperature", "0.5") == "temperature = 0.5"
    assert s.set("top-p", "0.9") == "top_p = 0.9"
    assert s.set("max_tokens", "none") == "max_tokens = None"
    assert s.set("seed", "7") == "seed = 7" and s.params.seed == 7
    with pytest.raises(UsageError, match="cannot set 'colour'"):
        s.set("colour", "red")
    with pytest.raises(UsageError, match="top_p must be in"):
        s.set("top_p", "1.5")
    with pytest.raises(UsageError, match="whole number"):
        s.set("max_tokens", "lots")


def test_save_load_round_trip_and_follow_up(engine, tmp_path):
    s = _session(engine)
    out, err, code = _script(s, ["What is the capital of France?", f"/save {tmp_path / 'c.json'}", "/bye"])
    assert code == 0 and "Paris" in out
    data = json.loads((tmp_path / "c.json").read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]

    s2 = _session(engine)
    out, err, code = _script(s2, [f"/load {tmp_path / 'c.json'}", "/system You are a geography teacher.",
                                  "What river flows through it?", "/stats"])
    assert "loaded 2 messages" in err
    assert len(s2.messages) == 4 and s2.system == "You are a geography teacher."
    assert "context used" in err


def test_bad_files_and_commands_keep_the_repl_running(engine, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    s = _session(engine)
    out, err, code = _script(s, [f"/load {tmp_path / 'bad.json'}", f"/load {tmp_path / 'none.json'}", "/frobnicate",
                                 "/set temperature", "What is the capital of France?"])
    assert "is not JSON" in err and "cannot read" in err and "unknown command /frobnicate" in err
    assert "usage: /set KEY VALUE" in err
    assert "Paris" in out and code == 0


def test_context_full_notice_and_history_trimmed(demo_gguf):
    e = start_engine(demo_gguf, RunSettings(n_ctx=256), model_name="tiny")
    try:
        s = ChatSession(e, params=SamplingParams(temperature=0, max_tokens=8))
        lines = [f"Question {i}: tell me something about the number {i}, in detail please." for i in range(8)]
        out, err, code = _script(s, lines)
        assert "context full" in err
        assert code == 0
        assert s.messages[0].role == "user" and len(s.messages) < 16
    finally:
        e.close()
