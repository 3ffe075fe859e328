"""The ``i2v`` command's promises: every bad argument is one line and exit status 2 before anything is
loaded; outputs appear complete or not at all; SIGINT at any moment is one line and exit status 130.

The write-path tests replace the model by a stub (the real generation is tested in test_model.py);
the signal tests run the real command in a subprocess.
"""

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import i2v_model.io as io
from i2v_model import cli
from i2v_model.io import read_video

@pytest.fixture(autouse=True)
def _interactive_signals():
    """Every test starts as an interactive run would: SIGINT raising KeyboardInterrupt. A suite started
    in the background by a non-interactive shell inherits SIGINT ignored, and the CLI rightly leaves an
    ignored signal ignored, so the signal tests would see nothing to report."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _interactive_child():
    """In a child before exec: SIGINT and SIGTERM at their defaults (see ``_interactive_signals``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading weights, an image or the model fails the test: bad arguments must be found before."""
    from i2v_model.pipeline import I2VPipeline

    def loaded(*args, **kwargs):
        raise AssertionError("loaded something before checking the arguments")

    monkeypatch.setattr(I2VPipeline, "from_pretrained", loaded)
    monkeypatch.setattr(io, "load_image", loaded)


BAD = [
    (["--fps", "0"], "--fps"),
    (["--fps", "-3"], "--fps"),
    (["--fps", "nan"], "--fps"),
    (["--fps", "inf"], "--fps"),
    (["--fps", "1000"], "--fps"),
    (["--fps", "x"], "--fps"),
    (["--guidance", "nan"], "--guidance"),
    (["--guidance", "inf"], "--guidance"),
    (["--guidance", "-inf"], "--guidance"),
    (["--guidance", "1e9"], "--guidance"),
    (["--seed", str(2**64)], "--seed"),
    (["--seed", str(-(2**63) - 1)], "--seed"),
    (["--seed", "1.5"], "--seed"),
    (["--frames", "0"], "--frames"),
    (["--frames", "8"], "--frames"),
    (["--frames", str(1 + 4 * 10**6)], "--frames"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-1"], "--steps"),
    (["--steps", "1001"], "--steps"),
    (["--upscale", "0"], "--upscale"),
    (["--upscale", "65"], "--upscale"),
    (["--out", ""], "--out"),
    (["--out", "folder/"], "--out"),
    (["--out", "folder"], "--out"),
    (["--out", "."], "--out"),
    (["--out", "missing/"], "--out"),
    (["--out", "missing/clip.mp4"], "--out"),
    (["--out", "notes.txt/clip.mp4"], "--out"),
    (["--out", "clip.avi"], "--out"),
    (["--out", "clip."], "--out"),
    (["--out", "busy.mp4"], "--out"),  # a folder of that name
    (["--out", "x" * 300 + ".mp4"], "--out"),
    (["--out", "a\x00b.mp4"], "--out"),
    (["--image", ""], "--image"),
    (["--image", "missing.png"], "--image"),
    (["--image", "folder"], "--image"),
    (["--image", "notes.txt"], "--image"),  # decoded last, but still before the model
    (["--weights", "folder"], "--weights"),
    (["--weights", "missing.safetensors"], "--weights"),
    (["--prompt", "bad \udcff byte"], "--prompt"),
    (["--model", "huge"], "--model"),
    (["--backend", "quantum"], "--backend"),
]


@pytest.mark.parametrize("argv,flag", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_generate_argument(in_tmp, capsys, nothing_loads, argv, flag):
    (in_tmp / "notes.txt").write_text("hello")
    (in_tmp / "folder").mkdir()
    (in_tmp / "busy.mp4").mkdir()
    before = sorted(os.listdir(in_tmp))
    rc, out, err = _run(["generate"] + argv, capsys)
    line = _one_line(err)
    assert rc == 2 and line.startswith("i2v: error: ") and flag in line, err
    assert out == ""
    assert sorted(os.listdir(in_tmp)) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend can run here")
def test_backend_that_cannot_run(in_tmp, capsys, nothing_loads):
    rc, _, err = _run(["generate", "--backend", "cuda"], capsys)
    line = _one_line(err)
    assert rc == 2 and "--backend 'cuda' cannot run here" in line
    assert os.listdir(in_tmp) == []


@pytest.mark.parametrize("argv,flag", [
    (["--images", "0"], "--images"),
    (["--images", "100000"], "--images"),
    (["--steps", "0"], "--steps"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64 - 1)], "--seed"),  # seed + 3 would overflow
    (["--motions", ""], "--motions"),
    (["--weights", "missing.safetensors"], "--weights"),
    (["--backend", "quantum"], "--backend"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_eval_argument(in_tmp, capsys, nothing_loads, argv, flag):
    rc, out, err = _run(["eval"] + argv, capsys)
    line = _one_line(err)
    assert rc == 2 and flag in line, err
    assert os.listdir(in_tmp) == []


def test_bad_argument_imports_no_torch(tmp_path):
    """The checks that need no torch run before torch is imported: a bad argument answers at once."""
    code = ("import sys\nfrom i2v_model.cli import main\n"
            "codes = [main(['generate', a, v]) for a, v in (('--fps', '0'), ('--guidance', 'nan'), ('--out', 'd/'),"
            " ('--frames', '2'), ('--seed', str(2**64)))]\n"
            "print(codes, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[2, 2, 2, 2, 2] False", r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 5 and "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Outputs: complete or absent


class _StubPipeline:
    """Stands in for the model: a fixed 5-frame video, no weights."""

    pretrained = True
    dit = SimpleNamespace(patch_embed=SimpleNamespace(weight=torch.zeros(1)))

    def generate(self, image, prompt, *, frames, steps, guidance, seed, progress):
        for _ in progress(range(steps)):
            pass
        t = frames or 5
        video = torch.linspace(-1, 1, 3 * t * 64 * 64).reshape(3, t, 64, 64)
        return video, {"encode": 0.0, "denoise": 0.0, "decode": 0.0}


@pytest.fixture
def stub_model(monkeypatch):
    monkeypatch.setattr(cli, "_load_pipeline", lambda args, cfg: _StubPipeline())


def _old_files(folder: Path, names) -> dict:
    for n in names:
        (folder / n).write_bytes(b"old " + n.encode())
    return {n: b"old " + n.encode() for n in names}


def _contents(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_stub_generate_writes_both(in_tmp, capsys, stub_model):
    _old_files(in_tmp, ["clip.mp4"])
    rc, out, err = _run(["generate", "--out", "clip", "--fps", "0.5"], capsys)
    assert rc == 0, err
    assert sorted(os.listdir(in_tmp)) == ["clip.gif", "clip.mp4"]
    assert read_video(in_tmp / "clip.mp4").shape == (5, 64, 64, 3)  # replaced
    assert read_video(in_tmp / "clip.gif").shape == (5, 64, 64, 3)


@pytest.mark.parametrize("failing,out,existing", [
    ("_write_mp4", "clip", []), ("_write_gif", "clip", []),  # the first / the second of two files
    ("_write_gif", "clip", ["clip.mp4", "clip.gif"]), ("_write_mp4", "clip", ["clip.gif"]),
    ("_write_gif", "clip.gif", ["clip.gif"]), ("_write_mp4", "clip.mp4", []),
])
def test_writer_failing_midway_leaves_nothing(in_tmp, capsys, monkeypatch, stub_model, failing, out, existing):
    """A writer dies after writing some bytes (an encoder error, a full disk): no output, no temporary
    file, pre-existing targets untouched; one line, exit status 2."""
    def broken(frames, path, fps):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, failing, broken)
    old = _old_files(in_tmp, existing)
    rc, _, err = _run(["generate", "--out", out], capsys)
    line = _one_line(err)
    assert rc == 2 and "cannot write" in line and "No space left on device" in line, err
    assert _contents(in_tmp) == old


def test_interrupt_while_writing(in_tmp, capsys, monkeypatch, stub_model):
    """SIGINT in the middle of writing the second file: exit 130, one line, nothing new on disk."""
    real_gif = io._write_gif

    def interrupted(frames, path, fps):
        real_gif(frames, path, fps)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises here

    monkeypatch.setattr(io, "_write_gif", interrupted)
    old = _old_files(in_tmp, ["clip.mp4"])
    previous = signal.getsignal(signal.SIGINT)
    rc, _, err = _run(["generate", "--out", "clip"], capsys)
    assert rc == 130 and _one_line(err) == "i2v: interrupted", err
    assert _contents(in_tmp) == old
    assert signal.getsignal(signal.SIGINT) is previous  # an in-process call restores the handler


class _SwallowedInterrupt(_StubPipeline):
    """SIGINT arrives while Python runs a weakref callback, as it can inside ``import torch`` (the import
    system's module-lock callbacks): the handler's KeyboardInterrupt is raised there and Python ignores
    it (reports it to ``sys.unraisablehook``), so generation goes on."""

    def generate(self, *args, **kwargs):
        import weakref

        def callback(_ref):
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the handler runs (and raises) during this loop
                pass

        class Target:
            pass

        target = Target()
        ref = weakref.ref(target, callback)  # noqa: F841 -- keeps the callback registered
        del target  # the callback runs now; its exception is ignored
        return super().generate(*args, **kwargs)


def test_interrupt_swallowed_by_python_still_interrupts(in_tmp, capsys, monkeypatch):
    """The interrupt stands although its exception was lost: exit 130, one line, no output file."""
    monkeypatch.setattr(cli, "_load_pipeline", lambda args, cfg: _SwallowedInterrupt())
    monkeypatch.setattr(sys, "unraisablehook", cli._unraisable)  # what the `i2v` entry installs
    rc, _, err = _run(["generate", "--out", "clip"], capsys)
    assert rc == 130 and _one_line(err) == "i2v: interrupted", err
    assert os.listdir(in_tmp) == []


def test_rename_failing_restores_both(in_tmp, capsys, monkeypatch, stub_model):
    """The second rename fails after the first succeeded: both targets are as they were."""
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if str(dst).endswith("clip.gif") and len(calls) == 4:  # 2 targets moved aside, clip.mp4 placed
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    old = _old_files(in_tmp, ["clip.mp4", "clip.gif"])
    rc, _, err = _run(["generate", "--out", "clip"], capsys)
    assert rc == 2 and "Input/output error" in _one_line(err)
    monkeypatch.undo()
    assert len(calls) == 6  # and the two restored
    assert _contents(in_tmp) == old


def test_signal_during_rename_is_held_back(in_tmp, capsys, monkeypatch, stub_model):
    """A signal between the two renames waits; the outputs are then complete and the command succeeds."""
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("clip.mp4"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)

    monkeypatch.setattr(io.os, "replace", replace)
    rc, _, err = _run(["generate", "--out", "clip"], capsys)
    monkeypatch.undo()
    assert rc == 0, err
    assert sorted(os.listdir(in_tmp)) == ["clip.gif", "clip.mp4"]


# --------------------------------------------------------------------------------------------------
# Signals in a real process


def _start(argv, cwd):
    """``python -m i2v_model ARGV`` with import timing on, so the test can see how far start-up got."""
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "i2v_model"] + argv, cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_interactive_child)


def _signal_after(proc, marker: str, signum: int, delay: float = 0.0, repeat: int = 1, timeout: float = 60):
    """Send ``signum`` (``repeat`` times, 20 ms apart) once an import of ``marker`` has finished, plus
    ``delay``; returns (rc, stdout, stderr without the import-time lines)."""
    lines, seen = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("import time:") and line.rstrip().endswith(marker):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert seen.wait(timeout), f"never imported {marker}: {''.join(lines)[-2000:]}"
    time.sleep(delay)
    for _ in range(repeat):
        proc.send_signal(signum)
        time.sleep(0.02)
    out = proc.stdout.read()
    rc = proc.wait(timeout)
    reader.join(timeout)
    return rc, out, "".join(l for l in lines if not l.startswith("import time:"))


@pytest.mark.parametrize("signum,code,message", [(signal.SIGINT, 130, "i2v: interrupted"),
                                                 (signal.SIGTERM, 143, "i2v: stopped by SIGTERM")])
def test_signal_during_torch_import(tmp_path, signum, code, message):
    """During `import torch` (a submodule of torch finished, torch itself not yet): one line, no traceback."""
    proc = _start(["generate", "--out", "clip"], tmp_path)
    rc, out, err = _signal_after(proc, "torch._utils_internal", signum)
    assert rc == code and err.strip() == message, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("repeat", [1, 3], ids=["once", "thrice"])
def test_sigint_during_generation(tmp_path, repeat):
    """Well into the sampler's steps (Ctrl-C once, or pressed again while the first unwinds): exit 130,
    one line, no traceback, no output and no temporary file."""
    proc = _start(["generate", "--out", "clip", "--steps", "1000"], tmp_path)
    rc, out, err = _signal_after(proc, "i2v_model.pipeline", signal.SIGINT, delay=2.0, repeat=repeat)
    assert rc == 130 and err.strip() == "i2v: interrupted", err
    assert out == "" and os.listdir(tmp_path) == []


@pytest.mark.parametrize("fps", [io.MIN_FPS, 0.5, 29.97, io.MAX_FPS])
def test_save_videos_fps_range(tmp_path, fps):
    """Every writer takes the whole --fps range (fractional rates included); both files come back whole."""
    frames = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    paths = io.save_videos(frames, [tmp_path / "v.mp4", tmp_path / "v.gif"], fps=fps)
    assert [read_video(p).shape[0] for p in paths] == [3, 3]
    assert sorted(os.listdir(tmp_path)) == ["v.gif", "v.mp4"]
    with pytest.raises(ValueError, match="fps must be in"):
        io.save_videos(frames, [tmp_path / "w.gif"], fps=fps + 1000)
    with pytest.raises(ValueError, match="same output path"):
        io.save_videos(frames, [tmp_path / "w.gif", tmp_path / "." / "w.gif"])
    assert sorted(os.listdir(tmp_path)) == ["v.gif", "v.mp4"]
