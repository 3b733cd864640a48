"""`nanguard inspect` and `nanguard ls`, run in-process and as the real console script."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import nanguard
from nanguard.cli import main
from nanguard.dump import write_dump
from tests.test_dump import make_dump


def test_inspect_human_report(tmp_path, capsys):
    path = make_dump(tmp_path)
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "input_nonfinite" in out and "at step 12" in out and "where   inputs" in out
    assert "Step 12: bad." in out
    assert "nan!" in out and "inf!" in out  # bad values marked
    assert "inputs" in out and "float32" in out


@pytest.mark.parametrize(("rows", "shown"), [(0, 0), (1, 1), (999, None)])
def test_inspect_rows_shows_that_many_steps(tmp_path, capsys, rows, shown):
    path = make_dump(tmp_path)
    n = len(nanguard.load(path).history)
    shown = n if shown is None else shown
    assert main(["inspect", "--rows", str(rows), path]) == 0
    out = capsys.readouterr().out
    assert ("steps (! marks" in out) == (shown > 0)
    if shown:
        assert f"last {shown} steps" in out
        table = out.split("steps (! marks a non-finite value):\n")[1].split("\n\n")[0]
        assert len(table.strip().splitlines()) == shown + 1  # the header and the rows


@pytest.mark.parametrize("rows", ["-3", "two"])
def test_inspect_rejects_a_bad_row_count(tmp_path, capsys, rows):
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--rows", rows, make_dump(tmp_path)])
    assert exc.value.code == 2
    assert f"expected a count >= 0, received '{rows}'" in capsys.readouterr().err


def test_inspect_json_matches_dump(tmp_path, capsys):
    path = make_dump(tmp_path)
    assert main(["inspect", "--json", path]) == 0
    data = json.loads(capsys.readouterr().out)
    dump = nanguard.load(path)
    assert data["step"] == dump.event.step == 12
    assert data["cause"] == dump.event.cause and data["where"] == dump.event.where
    assert data["message"] == dump.event.message
    assert len(data["history"]) == len(dump.history)
    assert math.isnan(data["history"][-1]["loss"])
    assert data["tensors"]["inputs"] == {
        "shape": [4, 3], "dtype": "float32", "nan": 1, "inf": 0, "min": 1.0, "max": 1.0,
    }


@pytest.mark.parametrize("content", [b"", b"garbage", None])
def test_inspect_unreadable_exits_2_with_one_line(tmp_path, capsys, content):
    path = tmp_path / "bad.nanguard.zip"
    if content is not None:
        path.write_bytes(content)
    assert main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert str(path) in captured.err


def test_ls_lists_one_line_per_dump(tmp_path, capsys):
    make_dump(tmp_path, step=3, cause="target_invalid")
    make_dump(tmp_path, step=40, cause="grad_nonfinite")
    (tmp_path / "junk.nanguard.zip").write_bytes(b"junk")
    assert main(["ls", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 3  # header + two dumps
    assert "target_invalid" in lines[1] and lines[1].split()[0] == "3"
    assert "grad_nonfinite" in lines[2] and lines[2].split()[0] == "40"
    assert "junk" in captured.err


def test_ls_missing_dir_exits_2(tmp_path, capsys):
    assert main(["ls", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert main(["ls", str(tmp_path / "a_file")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_console_script_and_module_are_the_same_program(tmp_path):
    path = make_dump(tmp_path)
    outs = []
    for cmd in (["nanguard"], [sys.executable, "-m", "nanguard"]):
        exe = cmd if cmd[0] != "nanguard" else [str(_script("nanguard"))]
        res = subprocess.run([*exe, "inspect", "--json", path], capture_output=True, text=True,
                             check=False)
        assert res.returncode == 0, res.stderr
        outs.append(json.loads(res.stdout))
    assert outs[0] == outs[1]
    bad = subprocess.run([sys.executable, "-m", "nanguard", "inspect", str(tmp_path / "x")],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def _script(name):
    import pathlib
    import shutil

    return shutil.which(name) or pathlib.Path(sys.executable).with_name(name)


def test_replay_material_is_left_out_of_the_human_table_only(tmp_path, capsys):
    import numpy as np

    from nanguard.events import Event

    path = write_dump(str(tmp_path), Event(3, "loss_nonfinite", None, "Step 3: bad."), [],
                      {"inputs": np.zeros((2, 2), np.float32),
                       "replay.rng_cpu": np.zeros(8, np.uint8)}, {"framework": "test"})
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "inputs" in out and "replay.rng_cpu" not in out
    assert "(+1 replay tensors, listed by --json)" in out
    assert main(["inspect", "--json", path]) == 0
    assert "replay.rng_cpu" in json.loads(capsys.readouterr().out)["tensors"]


def test_no_command_is_one_line_on_stderr(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("nanguard: error:") and len(captured.err.splitlines()) == 1


def test_inspect_a_dump_of_a_text_batch(tmp_path, capsys):
    from nanguard.dump import write_dump
    from nanguard.events import Event

    tensors = {"inputs": np.array(["good text", "more"], dtype=object), "targets": np.array([3, 0])}
    path = write_dump(str(tmp_path), Event(0, "target_invalid", "targets", "m"), [], tensors, {})
    assert main(["inspect", path]) == 0
    assert "<U9" in capsys.readouterr().out
    assert main(["inspect", "--json", path]) == 0
    summary = json.loads(capsys.readouterr().out)["tensors"]["inputs"]
    assert summary["shape"] == [2] and summary["min"] is None


def test_ls_reads_no_arrays_and_prints_any_file_name(tmp_path, capsys, monkeypatch):
    path = make_dump(tmp_path, step=5)
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.nanguard.zip")
    os.rename(os.fsencode(path), odd)

    def no_arrays(*args, **kwargs):
        raise AssertionError("ls decompressed an array")

    monkeypatch.setattr(nanguard.dump.np.lib.format, "read_array", no_arrays)
    assert main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    out.encode("utf-8")  # printable on a strict UTF-8 terminal: no lone surrogates
    assert "caf\\xe9.nanguard.zip" in out and out.splitlines()[1].split()[0] == "5"


def test_inspect_escapes_control_characters_from_the_dump(tmp_path, capsys):
    # A module named with a newline and a terminal escape (a real activation_nonfinite
    # dump's `where`), a tensor name with a newline: one line per field, nothing raw.
    odd = "/we ird/\n\x1b[31mRED\t|x"
    event = nanguard.Event(step=3, cause="activation_nonfinite", where=odd,
                           message=f"Step 3: the output of {odd} went NaN.", action="skip")
    history = [nanguard.StepRecord(step=3, loss=math.nan, grad_norm=math.nan, lr=0.1,
                                   action="skip")]
    path = write_dump(str(tmp_path), event, history, {"a\nb": np.zeros(2, np.float32)},
                      {"framework": "test", "environment": {"python": "3"}})
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\t" not in out
    lines = out.splitlines()
    assert any(line.startswith("  where   /we ird/\\n\\x1b[31mRED\\t|x") for line in lines)
    assert not any(line.startswith("RED") or line.startswith("b ") for line in lines)
    assert main(["inspect", path, "--json"]) == 0  # JSON keeps the text exactly
    assert json.loads(capsys.readouterr().out)["where"] == odd


def test_ls_keeps_one_line_per_dump_whatever_the_names(tmp_path, capsys):
    path = make_dump(tmp_path, step=5)
    forged = tmp_path / "run\n    99  loss_nonfinite  fc1  other.nanguard.zip"
    os.rename(path, forged)
    assert main(["ls", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "run\\n" in lines[1] and lines[1].split()[0] == "5"


def test_inspect_prints_text_that_does_not_encode(tmp_path):
    # A strict UTF-8 stdout (any UTF-8 locale but C) cannot encode a lone surrogate: from a
    # non-UTF-8 file name, or from the dump's JSON.
    import zipfile

    good = make_dump(tmp_path / "good")
    odd = os.fsencode(tmp_path) + b"/run\xff.nanguard.zip"
    with zipfile.ZipFile(good) as zin, open(odd, "wb") as fh, zipfile.ZipFile(fh, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == "event.json":
                data = json.dumps({**json.loads(data), "message": "x \ud800 y"}).encode()
            zout.writestr(name, data)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-m", "nanguard", "inspect", odd],
                          capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    assert "run\\xff.nanguard.zip" in out and "x \\ud800 y" in out


def test_complex_tensors_are_summarised_without_an_order(tmp_path, capsys):
    path = write_dump(str(tmp_path), nanguard.Event(0, "input_nonfinite", "inputs", "m"), [],
                      {"inputs": np.array([1 + 2j, complex("nan")])}, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["inspect", "--json", path]) == 0
    summary = json.loads(capsys.readouterr().out)["tensors"]["inputs"]
    assert summary["nan"] == 1 and summary["min"] is None and summary["max"] is None


def test_main_puts_the_output_streams_back_as_they_were(tmp_path, capsys):
    before = (sys.stdout.errors, sys.stderr.errors)
    assert main(["ls", str(tmp_path)]) == 0
    assert (sys.stdout.errors, sys.stderr.errors) == before


def test_inspect_marks_the_steps_an_amp_scaler_skipped_itself(tmp_path, capsys):
    # They showed a non-finite norm with a blank action, like an unhandled bad step.
    from nanguard.events import Event, StepRecord

    event = Event(step=2, cause="input_nonfinite", where="inputs", message="Step 2: bad.",
                  action="skip")
    history = [StepRecord(step=0, loss=1.0, grad_norm=math.inf, lr=0.1,
                          cause="amp_scaler_skip"),
               StepRecord(step=1, loss=1.0, grad_norm=2.0, lr=0.1),
               StepRecord(step=2, loss=math.nan, grad_norm=math.nan, lr=0.1, action="skip",
                          cause="input_nonfinite")]
    path = write_dump(str(tmp_path), event, history, {}, {"framework": "test"}, None)
    assert main(["inspect", path]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert rows[0].endswith("(amp skip)") and rows[1].rstrip().endswith("0.1")
    assert rows[2].endswith("skip") and not rows[2].endswith("(amp skip)")


def test_inspect_says_which_row_holds_the_action_of_an_update_found_a_step_late(tmp_path,
                                                                               capsys):
    # Under DDP (or on a GPU) a non-finite update is read with the next step's numbers: the
    # table ended at the event's step, with no action in it, under "action abort" (a DDP
    # black-box tester).
    from nanguard.events import Event, StepRecord

    event = Event(step=6, cause="update_nonfinite", where="0.weight", message="Step 6: bad.",
                  action="abort", details={"detected_at_step": 7})
    history = [StepRecord(step=i, loss=1.0, grad_norm=2.0, lr=0.1) for i in range(7)]
    path = write_dump(str(tmp_path), event, history, {}, {"framework": "test"}, None)
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "(step 6's update was found non-finite at step 7, where the action was taken: " \
           "abort)" in out
    same_step = write_dump(str(tmp_path), Event(step=3, cause="input_nonfinite", where=None,
                                                message="m", action="skip",
                                                details={"detected_at_step": 3}),
                           history[:4], {}, {"framework": "test"}, None)
    assert main(["inspect", same_step]) == 0
    assert "found non-finite at step" not in capsys.readouterr().out


def test_ls_of_a_folder_without_dumps_names_its_folders_that_hold_some(tmp_path, capsys):
    # The demo writes to nanguard_dumps/demo; `nanguard ls` after it said only "no dumps in
    # nanguard_dumps" (a first-time user).
    make_dump(tmp_path / "demo")
    (tmp_path / "empty").mkdir()
    assert main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out == (f"no dumps in {tmp_path}; its folder holds some: {tmp_path / 'demo'} "
                   f"(nanguard ls {tmp_path / 'demo'})\n")
    assert main(["ls", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out == f"no dumps in {tmp_path / 'empty'}\n"


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"nanguard {nanguard.__version__}\n"
