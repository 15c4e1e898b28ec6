"""Progress on a terminal: the command's phases on stderr when it is a TTY (a pseudo-terminal
here) and the model has more than a few hundred nodes; nothing otherwise, nor with -q."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import onnx
import pytest

from onnx_fuse import progress

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
LARGE = os.path.join(MODELS, "llama-gqa_decode_eager_torchscript.onnx")  # 2 layers, 500+ nodes
SMALL = os.path.join(MODELS, "gpt2_prefill_eager_dynamo.onnx")


def _nodes(path):
    return len(onnx.load(path, load_external_data=False).graph.node)


def run_on_terminal(*argv):
    """Run `python -m onnx_fuse ARGV` with stderr on a pseudo-terminal; (exit code, stdout,
    everything written to the terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # rows, columns
    try:
        process = subprocess.Popen([sys.executable, "-m", "onnx_fuse", *map(str, argv)],
                                   stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        terminal = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            terminal += chunk
        stdout = process.stdout.read().decode()
        process.stdout.close()
        # The terminal turns "\n" into "\r\n"; give back what the program wrote.
        return process.wait(timeout=120), stdout, terminal.decode().replace("\r\n", "\n")
    finally:
        os.close(master)


def test_models_cover_both_sides_of_the_threshold():
    assert _nodes(LARGE) > progress.MIN_NODES >= _nodes(SMALL)


def test_phases_shown_in_order_on_a_terminal(tmp_path):
    code, stdout, terminal = run_on_terminal("fuse", LARGE, "-o", tmp_path / "o.onnx",
                                             "--max-positions", 64)
    assert code == 0 and "wrote" in stdout
    shown = re.findall(r"\[(\d)/5\] (\w+)", terminal)
    phases = list(dict.fromkeys(name for _, name in shown))
    assert phases == ["load", "match", "verify", "check", "save"], terminal
    assert all(progress.PHASES.index(name) + 1 == int(step) for step, name in shown)
    assert f"{_nodes(LARGE)} nodes" in terminal and "candidate 1 of" in terminal
    # The line is erased at the end: the last thing written is a carriage return after blanks.
    assert terminal.endswith("\r") and terminal.rstrip("\r").endswith(" ")
    assert "error" not in terminal.lower()


def test_quiet_and_small_models_and_pipes_show_nothing(tmp_path):
    code, _, terminal = run_on_terminal("fuse", LARGE, "-o", tmp_path / "a.onnx", "-q", "--no-check")
    assert code == 0 and terminal == ""
    code, _, terminal = run_on_terminal("fuse", SMALL, "-o", tmp_path / "b.onnx", "--no-check")
    assert code == 0 and terminal == ""
    piped = subprocess.run([sys.executable, "-m", "onnx_fuse", "fuse", LARGE, "-o",
                            str(tmp_path / "c.onnx"), "--no-check"], capture_output=True, text=True)
    assert piped.returncode == 0 and piped.stderr == ""


def test_errors_stay_one_line_after_the_progress(tmp_path):
    """A failure mid-way: the progress line is erased and the error is the one line left."""
    code, _, terminal = run_on_terminal("fuse", LARGE, "-o", tmp_path / "o.onnx", "--atol", "x:1")
    assert code == 2
    visible = terminal.split("\r")[-1]  # what the terminal shows after the last return
    assert visible.strip().startswith("onnx-fuse: error: tolerance given for unknown output")
    assert visible.count("\n") == 1


def test_the_api_reports_nothing(capfd):
    import onnx_fuse

    onnx_fuse.fuse(LARGE, check=False)
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("quiet", [True, False])
def test_display_only_on_a_terminal(tmp_path, quiet):
    read, write = os.pipe()
    try:
        with progress.shown(write, quiet=quiet):  # a pipe is not a terminal
            progress.model_size(10_000)
            progress.phase("match", "x")
    finally:
        os.close(write)
    assert os.read(read, 100) == b""
    os.close(read)


def test_inspect_shows_progress_too():
    code, stdout, terminal = run_on_terminal("inspect", LARGE)
    assert code == 0 and stdout.startswith("fused: attention 2")
    assert re.findall(r"\[\d/5\] (\w+)", terminal)[:2] == ["load", "match"]
    code, _, terminal = run_on_terminal("inspect", LARGE, "-q")
    assert code == 0 and terminal == ""
