"""Dump archives: round trip, atomic writes, and nothing but DumpError on bad files."""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanguard
from nanguard.dump import SUFFIX, write_dump
from nanguard.events import Event, StepRecord


def make_dump(folder, step=12, cause="input_nonfinite", state=None):
    event = Event(step=step, cause=cause, where="inputs", message=f"Step {step}: bad.",
                  action="skip")
    history = [StepRecord(step=i, loss=1.0 / (i + 1), grad_norm=2.0, lr=0.1) for i in range(step)]
    history.append(StepRecord(step=step, loss=math.nan, grad_norm=math.inf, lr=0.1,
                              action="skip", cause=cause))
    x = np.ones((4, 3), dtype=np.float32)
    x[1, 2] = np.nan
    tensors = {"inputs": x, "targets": np.array([0, 1, 2, 3])}
    return write_dump(str(folder), event, history, tensors,
                      {"framework": "test", "environment": {"python": "3"}}, state)


def test_round_trip(tmp_path):
    path = make_dump(tmp_path, state={"model.w": np.arange(6.0).reshape(2, 3)})
    assert path.endswith(SUFFIX) and os.path.basename(path).startswith("step00000012")
    d = nanguard.load(path)
    assert (d.event.step, d.event.cause, d.event.where) == (12, "input_nonfinite", "inputs")
    assert d.history[-1].step == 12 and math.isnan(d.history[-1].loss)
    assert math.isinf(d.history[-1]["grad_norm"])
    assert np.isnan(d.tensors["inputs"][1, 2]) and d.tensors["targets"].tolist() == [0, 1, 2, 3]
    assert d.state["model.w"].shape == (2, 3)
    assert d.meta["format"] == "nanguard-dump" and d.meta["framework"] == "test"


def test_tensor_names_come_back_exactly(tmp_path):
    # Module and batch keys users write: non-ASCII, '/', spaces, a leading '_', '%'. Each must
    # come back under its own name (they used to collapse into one mangled entry).
    names = ["model.heads.中文.weight", "model.heads.日本語.weight", "model.α", "model.β",
             "inputs.a/b", "inputs.a b", "inputs._x", "inputs.100%", "inputs.x"]
    tensors = {n: np.full(2, i, dtype=np.float32) for i, n in enumerate(names)}
    event = Event(step=0, cause="input_nonfinite", where=names[1], message="m", action="skip")
    path = write_dump(str(tmp_path), event, [], tensors, {"framework": "test"}, tensors)
    d = nanguard.load(path)
    assert sorted(d.tensors) == sorted(names) and sorted(d.state) == sorted(names)
    assert all(d.tensors[n][0] == i for i, n in enumerate(names))
    with zipfile.ZipFile(path) as zf:
        assert all(n.isascii() for n in zf.namelist())


def test_no_pickle_anywhere(tmp_path):
    path = make_dump(tmp_path)
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            assert name.endswith((".json", ".npy"))
            if name.endswith(".npy"):
                header = zf.read(name)[:128]
                assert b"'descr': '|O'" not in header


def test_same_step_twice_does_not_overwrite(tmp_path):
    a, b = make_dump(tmp_path), make_dump(tmp_path)
    assert a != b and os.path.exists(a) and os.path.exists(b)


class _Unreadable:
    """An array-like whose conversion fails half-way through a dump."""

    def __array__(self, *args, **kwargs):
        raise RuntimeError("device lost")


def test_no_partial_file_left_on_failure(tmp_path):
    bad = {"inputs": np.ones(3), "outputs": _Unreadable()}
    with pytest.raises(RuntimeError, match="device lost"):
        write_dump(str(tmp_path), Event(1, "loss_nonfinite", None, "m"), [], bad, {})
    assert os.listdir(tmp_path) == []


def test_text_batches_are_kept_and_other_objects_left_out(tmp_path):
    tensors = {
        "inputs": np.array([["a cat", "a dog"], ["", "x"]], dtype=object),
        "raw": np.array([b"\x00\xff", b"ok"], dtype=object),
        "weird": np.array([object(), "mixed"], dtype=object),
        "targets": np.array([1, 0]),
    }
    path = write_dump(str(tmp_path), Event(1, "target_invalid", None, "m"), [], tensors, {})
    d = nanguard.load(path)
    assert d.tensors["inputs"].dtype.kind == "U"
    assert d.tensors["inputs"].tolist() == [["a cat", "a dog"], ["", "x"]]
    assert d.tensors["raw"].tolist() == [b"\x00\xff", b"ok"]
    assert "weird" not in d.tensors and d.meta["left_out"] == ["tensors/weird"]
    summary = nanguard.dump.tensor_summary(d.tensors["inputs"])
    assert summary == {"shape": [2, 2], "dtype": "<U5", "nan": 0, "inf": 0,
                       "min": None, "max": None}


def _write_many(folder, n):
    return [make_dump(folder) for _ in range(n)]


def test_runs_sharing_a_dump_dir_never_overwrite_each_other(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        jobs = [pool.submit(_write_many, tmp_path, 15) for _ in range(2)]
        paths = [p for job in jobs for p in job.result()]
    assert len(set(paths)) == 30
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)


def test_a_taken_name_is_not_replaced(tmp_path):
    first = make_dump(tmp_path)
    with open(first, "rb") as fh:
        before = fh.read()
    second = nanguard.dump._claim(make_dump(tmp_path / "other"), first)
    with open(first, "rb") as fh:
        assert second.endswith(f"_1{SUFFIX}") and fh.read() == before


def test_dump_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = make_dump(tmp_path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_load_without_arrays_reads_the_event_only(tmp_path):
    path = make_dump(tmp_path, state={"model.w": np.zeros(3)})
    d = nanguard.load(path, arrays=False)
    assert d.event.step == 12 and len(d.history) == 13
    assert d.tensors == {} and d.state == {}


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "foreign_zip", "missing",
                                  "pickled_npy", "npz_member", "bad_json", "directory",
                                  "fifo", "newer"])
def test_unreadable_files_raise_dump_error(tmp_path, kind):
    good = make_dump(tmp_path / "good")
    path = tmp_path / f"x{SUFFIX}"
    with open(good, "rb") as fh:
        raw = fh.read()
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01not a zip at all" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign_zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("hello.txt", "hi")
    elif kind == "pickled_npy":
        import io
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as zf:
            for n in src.namelist():
                zf.writestr(n, src.read(n))
            zf.writestr("tensors/evil.npy", buf.getvalue())
    elif kind == "npz_member":  # np.load would hand back an open NpzFile, not an array
        import io
        buf = io.BytesIO()
        np.savez(buf, a=np.zeros(2))
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as zf:
            for n in src.namelist():
                zf.writestr(n, src.read(n))
            zf.writestr("tensors/packed.npy", buf.getvalue())
    elif kind == "fifo":  # opening it would block until a writer comes: never opened
        os.mkfifo(path)
    elif kind == "bad_json":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("meta.json", '{"format": "nanguard-dump"')
            zf.writestr("event.json", "{}")
    elif kind == "directory":
        path.mkdir()
    elif kind == "newer":
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as zf:
            for n in src.namelist():
                data = src.read(n)
                if n == "meta.json":
                    meta = json.loads(data)
                    meta["format_version"] = 99
                    data = json.dumps(meta).encode()
                zf.writestr(n, data)
    with pytest.raises(nanguard.DumpError) as info:
        nanguard.load(path)
    assert str(path) in str(info.value)


def _rewrite(src, dst, member, change):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == member:
                obj = json.loads(data)
                change(obj)
                data = json.dumps(obj).encode()
            zout.writestr(name, data)


@pytest.mark.parametrize(
    ("member", "change"),
    [
        ("event.json", lambda e: e.update(step="12")),
        ("event.json", lambda e: e.update(step=True)),
        # JSON holds any integer; 10**400 loaded, then broke `report` and `plot` (float()).
        ("event.json", lambda e: e.update(step=10**400)),
        ("history.json", lambda h: h[0].update(loss=10**400)),
        ("event.json", lambda e: e.update(cause=5)),
        ("event.json", lambda e: e.update(where=["a"])),
        ("event.json", lambda e: e.update(details=[1])),
        ("event.json", lambda e: e.pop("message")),
        ("history.json", lambda h: h[0].update(action=5)),
        ("history.json", lambda h: h[0].update(loss="nan")),
        ("history.json", lambda h: h.__setitem__(0, [1, 2])),
        ("meta.json", lambda m: m.update(world_size="2")),
        ("meta.json", lambda m: m.update(environment=["python"])),
        ("meta.json", lambda m: m.update(config=None)),
        ("meta.json", lambda m: m.update(param_names=5)),
        ("event.json", lambda e: e["details"].update(layer_growth=5)),
        ("event.json", lambda e: e["details"].update(layer_growth={"first": "w"})),
        ("event.json", lambda e: e["details"].update(
            layer_growth={"first": "w", "step": 1, "from": 1.0, "to": 9.0, "ratio": 9.0,
                          "top": [3]})),
    ],
)
def test_fields_of_the_wrong_type_give_dump_error(tmp_path, member, change):
    path = tmp_path / f"edited{SUFFIX}"
    _rewrite(make_dump(tmp_path / "good"), path, member, change)
    with pytest.raises(nanguard.DumpError,
                       match="wrong type|no 'message'|JSON object|not a list|malformed"):
        nanguard.load(path)


def test_json_past_the_size_limit_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    # A 1 MB zip declaring a 1 GiB history.json took ~9 s and ~2 GB per load (a black-box
    # tester's zip bomb); the declared size is checked first (the limit made small here).
    import nanguard.dump

    path = make_dump(tmp_path)
    with zipfile.ZipFile(path) as zf:
        size = zf.getinfo("history.json").file_size
    monkeypatch.setattr(nanguard.dump, "JSON_LIMIT", size - 1)
    with pytest.raises(nanguard.DumpError, match="history.json declares"):
        nanguard.load(path)


def test_a_bytes_path_loads(tmp_path):
    # os.fsencode(path) was read as a corrupt dump ("'bytes' object has no attribute 'seek'").
    path = make_dump(tmp_path)
    assert nanguard.load(os.fsencode(path)).event.step == 12


def test_a_history_that_is_not_a_list_gives_dump_error(tmp_path):
    path = tmp_path / f"edited{SUFFIX}"
    with zipfile.ZipFile(make_dump(tmp_path / "good")) as zin, \
            zipfile.ZipFile(path, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, b'{"step": 1}' if name == "history.json" else zin.read(name))
    with pytest.raises(nanguard.DumpError, match="not a list"):
        nanguard.load(path)


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(min_value=0, max_value=4000), flip=st.integers(min_value=0, max_value=255))
def test_any_damage_gives_dump_error_or_a_dump(tmp_path_factory, cut, flip):
    folder = tmp_path_factory.mktemp("fuzz")
    d = _load_damaged(make_dump(folder), cut, flip)
    assert d is None or isinstance(d.event, nanguard.Event)


def _load_damaged(good, cut, flip):
    """The dump ``good`` with one byte flipped, loaded: None when load refused it with a
    DumpError (anything else raised fails the test)."""
    raw = bytearray(Path(good).read_bytes())
    raw[cut % len(raw)] ^= flip
    path = Path(good).parent / f"damaged{SUFFIX}"
    path.write_bytes(bytes(raw))
    try:
        return nanguard.load(path)
    except nanguard.DumpError:
        return None


def test_arrays_are_stored_uncompressed_and_the_state_made_one_array_at_a_time(tmp_path):
    # An abort dump deflated every array and took the state as arrays all made beforehand:
    # float weights shrink by under 10%, deflate ran at ~30 MB/s here (120 MB of state: 3.9 s
    # to write, 0.4 s stored), and a GPU model's state sat in host memory all at once.
    import weakref

    made: list[weakref.ref] = []

    def maker(i):
        def make():
            assert all(ref() is None for ref in made), "an earlier array is still held"
            array = np.full(1000, i, np.float32)
            made.append(weakref.ref(array))
            return array
        return make

    path = make_dump(tmp_path, state={f"model.w{i}": maker(i) for i in range(3)})
    assert len(made) == 3
    with zipfile.ZipFile(path) as zf:
        kinds = {info.filename: info.compress_type for info in zf.infolist()}
    assert {k for n, k in kinds.items() if n.endswith(".npy")} == {zipfile.ZIP_STORED}
    assert kinds["history.json"] == kinds["meta.json"] == zipfile.ZIP_DEFLATED
    d = nanguard.load(path)
    assert [d.state[f"model.w{i}"][0] for i in range(3)] == [0, 1, 2]


def test_the_state_is_read_when_used(tmp_path):
    # load() read every state array into memory (a large model's abort dump: its size in
    # memory) even for `nanguard inspect`, which only counts them.
    path = make_dump(tmp_path, state={"model.w": np.arange(6.0), "optimizer.w.exp_avg":
                                      np.zeros(6)})
    d = nanguard.load(path)
    os.remove(path)
    assert d.tensors["targets"].tolist() == [0, 1, 2, 3]  # read by load itself
    assert len(d.state) == 2 and set(d.state) == {"model.w", "optimizer.w.exp_avg"}
    with pytest.raises(nanguard.DumpError, match="cannot read state/model.w.npy"):
        d.state["model.w"]
    again = nanguard.load(make_dump(tmp_path, state={"model.w": np.arange(6.0)}))
    assert again.state["model.w"].tolist() == list(range(6))
    assert again.state["model.w"] is again.state["model.w"]  # read once, kept


def _data_offset(path, member):
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(fh.read(4), "<u2")
    return info.header_offset + 30 + int(name_len) + int(extra_len)


def test_damage_inside_the_state_is_found_by_load(tmp_path):
    # The state is read when used, but load still checks every entry (its checksum).
    path = make_dump(tmp_path, state={"model.w": np.arange(1000.0)})
    raw = bytearray(Path(path).read_bytes())
    raw[_data_offset(path, "state/model.w.npy") + 500] ^= 0xFF
    damaged = tmp_path / f"damaged{SUFFIX}"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(nanguard.DumpError,
                       match=r"corrupt nanguard dump \(Bad CRC-32 for file 'state/model.w.npy'"):
        nanguard.load(damaged)


@pytest.mark.parametrize("group", ["tensors", "state"])
def test_an_npy_header_declaring_more_than_its_entry_holds_is_refused(tmp_path, group):
    # A 200-byte entry whose header declares 8 GB of float64: numpy would allocate it all
    # (and a deflated one could inflate to it) before finding the data missing.
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f8", "fortran_order": False, "shape": (10**9,)})
    buf.write(b"\x00" * 80)
    path = tmp_path / f"bomb{SUFFIX}"
    with zipfile.ZipFile(make_dump(tmp_path / "good")) as zin, \
            zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            zout.writestr(name, zin.read(name))
        zout.writestr(f"{group}/x.npy", buf.getvalue())
    with pytest.raises(nanguard.DumpError, match="declares 8000000000 bytes"):
        nanguard.load(path)


@settings(max_examples=30, deadline=None)
@given(cut=st.integers(min_value=0, max_value=8000), flip=st.integers(min_value=1, max_value=255))
def test_any_damage_to_a_dump_with_state_gives_dump_error_or_a_dump(tmp_path_factory, cut,
                                                                   flip):
    folder = tmp_path_factory.mktemp("fuzz")
    d = _load_damaged(make_dump(folder, state={"model.w": np.linspace(0, 1, 500)}), cut, flip)
    if d is not None:
        assert isinstance(d.event, nanguard.Event)
        assert all(isinstance(v, np.ndarray) for v in d.state.values())  # checked by load


def test_the_state_is_read_from_the_same_file_after_a_chdir(tmp_path, monkeypatch):
    # A dump loaded by a relative path lost its state after os.chdir (a reviewer).
    path = make_dump(tmp_path / "d", state={"model.w": np.arange(3.0)})
    monkeypatch.chdir(tmp_path)
    d = nanguard.load(os.path.relpath(path, tmp_path))
    monkeypatch.chdir("/")
    assert d.state["model.w"].tolist() == [0.0, 1.0, 2.0]


def test_a_dump_replaced_after_load_is_an_error_not_other_weights(tmp_path):
    # Another valid dump with the same entry names in its place: its weights came back as
    # this dump's, silently (a reviewer).
    path = make_dump(tmp_path / "a", state={"model.w": np.zeros(3)})
    other = make_dump(tmp_path / "b", state={"model.w": np.full(3, 42.0)})
    d = nanguard.load(path)
    os.replace(other, path)
    with pytest.raises(nanguard.DumpError, match="changed since the dump was loaded"):
        d.state["model.w"]


def test_a_deflated_tensor_inflating_to_gigabytes_is_refused_before_it_is_read(
        tmp_path, monkeypatch):
    # A 1 MB dump whose tensors/ entry inflated to 1 GiB loaded in full (a reviewer); the
    # limit made small here. The state is not refused: it is read only when used.
    import nanguard.dump

    path = tmp_path / f"bomb{SUFFIX}"
    with zipfile.ZipFile(make_dump(tmp_path / "good"), "r") as zin, \
            zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            zout.writestr(name, zin.read(name))
        for group in ("tensors", "state"):
            buf = io.BytesIO()
            np.save(buf, np.zeros(2**16))
            zout.writestr(f"{group}/zeros.npy", buf.getvalue())
    monkeypatch.setattr(nanguard.dump, "INFLATE_LIMIT", 2**16)
    with pytest.raises(nanguard.DumpError, match="tensors/zeros.npy declares .* a zip bomb"):
        nanguard.load(path)
    monkeypatch.setattr(nanguard.dump, "INFLATE_LIMIT", 2**30)
    d = nanguard.load(path)
    assert d.tensors["zeros"].shape == d.state["zeros"].shape == (2**16,)


def test_reading_the_state_opens_the_file_once(tmp_path, monkeypatch):
    # Each entry reopened the zip and re-read its whole directory: reading 4,000 entries
    # took 34 s (a reviewer).
    path = make_dump(tmp_path, state={f"model.w{i}": np.full(2, i) for i in range(50)})
    d = nanguard.load(path)
    opened = []
    real = zipfile.ZipFile

    def counting(*args, **kwargs):
        opened.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(zipfile, "ZipFile", counting)
    assert [int(d.state[f"model.w{i}"][0]) for i in range(50)] == list(range(50))
    assert len(opened) == 1
    d.state.close()
