"""The forensic dump: one zip archive of JSON and .npy entries per event. No pickle."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import secrets
import stat
import time
import urllib.parse
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from nanguard.events import Event, StepRecord

FORMAT = "nanguard-dump"
FORMAT_VERSION = 1
SUFFIX = ".nanguard.zip"


class DumpError(Exception):
    """A file is not a readable nanguard dump (missing, truncated, corrupt or foreign).

    Example:
        >>> try:
        ...     raise DumpError("not a nanguard dump: x.zip")
        ... except DumpError as err:
        ...     str(err)
        'not a nanguard dump: x.zip'
    """


@dataclasses.dataclass
class Dump:
    """A dump read back from disk by :func:`load`.

    Attributes:
        path: Where it was read from.
        event: The :class:`Event`.
        history: The steps up to and including the bad one, oldest first.
        tensors: Forensic tensors (batch inputs and targets, model output, localized tensors).
        meta: Format, environment versions, config, rank and anything else recorded.
        state: Model (``model.*``) and optimizer (``optimizer.*``) state, when dumped: a
            read-only mapping whose arrays are read from the file on first access (a large
            model's state is not held in memory by a load that does not use it).

    Example:
        >>> import nanguard
        >>> d = nanguard.load("nanguard_dumps/some_dump.nanguard.zip")  # doctest: +SKIP
        >>> d.event.cause, d.history[-1].step  # doctest: +SKIP
        ('input_nonfinite', 12)
    """

    path: str
    event: Event
    history: list[StepRecord]
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any]
    state: Mapping[str, np.ndarray]

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.meta.get("config", {}))


def environment(**frameworks: str) -> dict[str, str]:
    """Versions of Python, numpy and the given frameworks, for the dump's meta."""
    env = {"python": platform.python_version(), "numpy": np.__version__}
    env.update(frameworks)
    env["platform"] = platform.platform()
    return env


def dump_name(event: Event) -> str:
    return f"step{event.step:08d}_rank{event.rank}_{event.cause}{SUFFIX}"


# An array, or a callable making it when the dump is written (one array in memory at a time:
# a model's state copied off a GPU all at once would take its size in host memory).
ArrayOrMaker = np.ndarray | Callable[[], Any]


def write_dump(
    dump_dir: str,
    event: Event,
    history: list[StepRecord],
    tensors: Mapping[str, ArrayOrMaker],
    meta: Mapping[str, Any],
    state: Mapping[str, ArrayOrMaker] | None = None,
) -> str:
    """Write one dump atomically and return its path.

    The archive is written to a temporary file in ``dump_dir`` and only then given its
    name, so a crash never leaves a half-written dump under the final name; a name taken
    already (another run sharing ``dump_dir``) gets a ``_1``, ``_2``, ... suffix. The JSON
    is compressed; the ``.npy`` entries are stored as they are and written in chunks (float
    weights compress by under 10%, at about 30 MB/s: minutes for a large model's abort
    dump), each array made only when it is written.
    """
    os.makedirs(dump_dir, exist_ok=True)
    # The OS applies the user's umask to a file created this way (mkstemp's is always 0600).
    tmp = os.path.join(dump_dir, f".partial-{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("event.json", _json(event.to_dict()))
            zf.writestr("history.json", _json([r.to_dict() for r in history]))
            left_out = []
            for prefix, group in (("tensors", tensors), ("state", state or {})):
                for name, value in group.items():
                    array = _storable(value() if callable(value) else value)
                    if array is None:
                        left_out.append(f"{prefix}/{name}")
                    else:
                        _write_npy(zf, f"{prefix}/{_entry(name)}.npy", array)
                    del array
            full_meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
            if left_out:
                full_meta["left_out"] = left_out
            zf.writestr("meta.json", _json(full_meta))
            raw.flush()
            os.fsync(raw.fileno())
        return _claim(tmp, os.path.join(dump_dir, dump_name(event)))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _write_npy(zf: zipfile.ZipFile, member: str, array: np.ndarray) -> None:
    info = zipfile.ZipInfo(member, date_time=time.localtime()[:6])
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o600 << 16  # as writestr gives its entries
    # An entry past 2 GiB needs the zip64 extension, declared before its size is known.
    with zf.open(info, "w", force_zip64=array.nbytes > 2**30) as f:
        np.lib.format.write_array(f, array, allow_pickle=False)  # in 16 MiB chunks


def _claim(tmp: str, final: str) -> str:
    """Give the finished ``tmp`` the first free name of ``final``, ``final_1``, ...: a hard
    link fails when the name exists, so two runs sharing a dump_dir never overwrite each
    other's dumps. Where the file system has no hard links, the name is checked, then
    replaced (a narrow race between runs)."""
    stem, n = final[: -len(SUFFIX)], 0
    while True:
        name = f"{stem}_{n}{SUFFIX}" if n else final
        try:
            os.link(tmp, name)
            return name
        except FileExistsError:
            n += 1
        except OSError:
            if os.path.exists(name):
                n += 1
                continue
            os.replace(tmp, name)
            return name


def load(path: str | bytes | os.PathLike[str], *, arrays: bool = True) -> Dump:
    """Read a dump written by any nanguard adapter.

    Args:
        path: The dump file.
        arrays: False reads only the event, history and meta (``tensors`` and ``state``
            stay empty): fast for a listing, whatever the size of the dumped state.

    Returns:
        The :class:`Dump`.

    Raises:
        DumpError: The file is missing, truncated, corrupt or not a nanguard dump. Loading
            never unpickles and so never runs code from the file.

    Example:
        >>> import nanguard
        >>> dump = nanguard.load("nanguard_dumps/x.nanguard.zip")  # doctest: +SKIP
        >>> print(dump.event.message)  # doctest: +SKIP
    """
    p = os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):
            # A FIFO, a device: opening one blocks or reads forever.
            what = "is a directory" if os.path.isdir(p) else "not a regular file (a pipe?)"
            raise DumpError(f"{what}, not a dump: {p}")
        with zipfile.ZipFile(p) as zf:
            names = set(zf.namelist())
            if "meta.json" not in names or "event.json" not in names:
                raise DumpError(f"not a nanguard dump (no meta.json/event.json): {p}")
            meta = _read_json(zf, "meta.json")
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise DumpError(f"not a nanguard dump (format is not {FORMAT!r}): {p}")
            if int(meta.get("format_version", 0)) > FORMAT_VERSION:
                raise DumpError(
                    f"dump format version {meta.get('format_version')} is newer than this "
                    f"nanguard reads ({FORMAT_VERSION}); upgrade nanguard: {p}"
                )
            _check_meta(meta)
            event = Event.from_dict(_read_json(zf, "event.json"))
            _check_details(event.details)
            raw_history = _read_json(zf, "history.json") if "history.json" in names else []
            if not isinstance(raw_history, list):
                raise ValueError("history.json is not a list")
            history = [StepRecord.from_dict(h) for h in raw_history]
            tensors: dict[str, np.ndarray] = {}
            members: dict[str, str] = {}
            for name in zf.namelist() if arrays else ():
                prefix, _, rest = name.partition("/")
                if rest.endswith(".npy") and prefix in ("tensors", "state"):
                    key = urllib.parse.unquote(rest[:-4])
                    if prefix == "tensors":
                        _refuse_bomb(zf, name)
                        tensors[key] = _read_npy(zf, name)
                    else:  # checked (header, checksum) now, read when used
                        _read_npy(zf, name, keep=False)
                        members[key] = name
            sums = {name: zf.getinfo(name).CRC for name in members.values()}
    except DumpError:
        raise
    except FileNotFoundError as err:
        raise DumpError(f"no such dump: {p}") from err
    except IsADirectoryError as err:
        raise DumpError(f"is a directory, not a dump: {p}") from err
    except PermissionError as err:
        raise DumpError(f"cannot read the dump (permission denied): {p}") from err
    except (zipfile.BadZipFile, EOFError) as err:
        if "CRC" in str(err):  # "Bad CRC-32 for file 'state/model.w.npy'"
            raise DumpError(f"corrupt nanguard dump ({err}): {p}") from err
        raise DumpError(f"not a nanguard dump (truncated or not a zip archive): {p}") from err
    except Exception as err:  # noqa: BLE001 - any other failure is a corrupt dump
        raise DumpError(f"corrupt nanguard dump ({type(err).__name__}: {err}): {p}") from err
    # The absolute path: a later os.chdir must not lose the file the state is read from.
    return Dump(p, event, history, tensors, meta,
                StateArrays(os.path.abspath(p), members, sums))


class StateArrays(Mapping[str, np.ndarray]):
    """A dump's model and optimizer state, each array read from the file when first used
    (and kept). :func:`load` has checked every entry already; a file changed or removed
    since raises :class:`DumpError` here."""

    def __init__(self, path: str, members: Mapping[str, str],
                 checksums: Mapping[str, int]) -> None:
        self._path = path
        self._members = dict(members)
        self._checksums = dict(checksums)  # each entry's CRC when load() checked it
        self._read: dict[str, np.ndarray] = {}
        # Opened at the first read and kept: reopening per entry re-read the whole central
        # directory each time (reading 4,000 entries took 34 s, a reviewer found).
        self._zf: zipfile.ZipFile | None = None

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._read:
            member = self._members[key]  # KeyError for a name not in the dump
            try:
                if self._zf is None:
                    self._zf = zipfile.ZipFile(self._path)
                zf = self._zf
                if self._checksums.get(member) != zf.getinfo(member).CRC:
                    raise DumpError(f"{member} changed since the dump was loaded (the "
                                    f"file was replaced): {self._path}")
                self._read[key] = _read_npy(zf, member)
            except DumpError:
                raise
            except Exception as err:  # noqa: BLE001 - as load(): never anything else
                raise DumpError(f"cannot read {member} from the dump ({type(err).__name__}: "
                                f"{err}): {self._path}") from err
        return self._read[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __repr__(self) -> str:
        return f"<nanguard dump state: {len(self)} arrays, read on use>"

    def close(self) -> None:
        """Close the file the arrays are read from (read ones stay; a later read opens it
        again)."""
        if self._zf is not None:
            self._zf.close()
            self._zf = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


_CHUNK = 16 * 2**20
INFLATE_LIMIT = 2**30  # see _refuse_bomb


def _refuse_bomb(zf: zipfile.ZipFile, name: str) -> None:
    """A forensic tensor (a batch, an output: tens of MiB at most) in a compressed entry
    declaring gigabytes, 100 times its size, is a zip bomb: refused before it is inflated.
    (nanguard stores its arrays uncompressed; the state is read only when used.)"""
    info = zf.getinfo(name)
    if (info.compress_type != zipfile.ZIP_STORED and info.file_size > INFLATE_LIMIT
            and info.file_size > 100 * max(1, info.compress_size)):
        raise DumpError(f"not a nanguard dump ({name} declares {info.file_size} bytes "
                        f"inflated from {info.compress_size}: a zip bomb): {zf.filename}")


def _read_npy(zf: zipfile.ZipFile, name: str, keep: bool = True) -> np.ndarray:
    """One ``.npy`` entry, read in chunks (memory: the array, not the entry twice over).
    Its header must declare exactly the entry's data, so no entry makes a reader allocate
    more than the archive says it holds; ``read_array`` reads ``.npy`` only (``np.load``
    would open an ``.npz``, or a pickle). ``keep=False`` checks the entry (header, then
    the zip checksum, streamed) and returns an empty array."""
    info = zf.getinfo(name)
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise DumpError(f"{name} is a .npy version {version} this nanguard cannot read")
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
        if dtype.hasobject:
            raise ValueError(f"{name} holds Python objects (a pickle), which nanguard never loads")
        declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if f.tell() + declared != info.file_size:
            raise ValueError(f"{name} declares {declared} bytes of data, the entry holds "
                             f"{info.file_size - f.tell()}")
        if not keep:
            while f.read(_CHUNK):  # to its end: the zip checks the entry's checksum there
                pass
            return np.empty(0)
    with zf.open(info) as f:
        array = np.lib.format.read_array(f, allow_pickle=False)
        f.read(1)  # at its end: the checksum is checked
    return array


# A dump's JSON is an event, a config and at most history_size steps: megabytes. A member
# declaring more is a zip bomb (a 1 MB file inflating to gigabytes) or not a dump.
JSON_LIMIT = 256 * 2**20


def _read_json(zf: zipfile.ZipFile, name: str) -> Any:
    size = zf.getinfo(name).file_size
    if size > JSON_LIMIT:
        raise DumpError(f"not a nanguard dump ({name} declares {size} bytes, over "
                        f"{JSON_LIMIT >> 20} MiB): {zf.filename}")
    return json.loads(zf.read(name))


def _check_meta(meta: dict[str, Any]) -> None:
    """The meta fields readers rely on have their types (a hand-edited dump may not)."""
    for name, kind in (("environment", dict), ("config", dict), ("world_size", int),
                       ("rank", int), ("framework", str)):
        if name in meta and (not isinstance(meta[name], kind) or isinstance(meta[name], bool)):
            raise ValueError(f"meta.json: {name} has the wrong type: {meta[name]!r}")
    names = meta.get("param_names")
    if names is not None and not (isinstance(names, list)
                                  and all(isinstance(n, str) for n in names)):
        raise ValueError(f"meta.json: param_names is not a list of names: {names!r}")


def _check_details(details: Mapping[str, Any]) -> None:
    """The structured details the reports read (``layer_growth``) have their shape."""
    growth = details.get("layer_growth")
    if growth is None:
        return
    top = growth.get("top", []) if isinstance(growth, dict) else None
    if (not isinstance(growth, dict) or not growth.keys() >= _GROWTH_KEYS
            or not isinstance(top, list)
            or not all(isinstance(t, dict) and t.keys() >= _TOP_KEYS for t in top)):
        raise ValueError(f"event.json: details.layer_growth is malformed: {growth!r}")


_GROWTH_KEYS = frozenset({"first", "step", "from", "to", "ratio"})
_TOP_KEYS = frozenset({"name", "step", "ratio"})


def tensor_summary(array: np.ndarray) -> dict[str, Any]:
    """Shape, dtype and counts of NaN and Inf of one array, JSON-ready."""
    out: dict[str, Any] = {"shape": list(array.shape), "dtype": str(array.dtype)}
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        out["nan"] = int(np.isnan(array).sum())
        out["inf"] = int(np.isinf(array).sum())
        # Complex values have no order: no min/max.
        fin = array[np.isfinite(array)] if array.dtype.kind == "f" else array[:0]
        out["min"] = float(fin.min()) if fin.size else None
        out["max"] = float(fin.max()) if fin.size else None
    else:
        numeric = array.dtype.kind in "iu" and array.size
        out["nan"] = 0
        out["inf"] = 0
        out["min"] = array.min().item() if numeric else None
        out["max"] = array.max().item() if numeric else None
    return out


def _entry(name: str) -> str:
    """A tensor's name as its archive entry: percent-encoded (``/``, spaces, non-ASCII
    module names...), so that ``load`` gives back the exact name and two names never share
    an entry."""
    return urllib.parse.quote(name, safe="._-")


def named_leaves(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """The leaves of a nested batch with the path every adapter's dump names them by:
    ``inputs.x`` for a dict's key, ``inputs.0`` for a list's item, the list's own path for
    a list of one item; a list of strings (a text batch) is one leaf. ``None`` is skipped."""
    if obj is None:
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from named_leaves(value, f"{prefix}.{key}")
    elif isinstance(obj, (list, tuple)) and not (
            obj and all(isinstance(v, (str, bytes)) for v in obj)):
        if len(obj) == 1:
            yield from named_leaves(obj[0], prefix)
        else:
            for i, value in enumerate(obj):
                yield from named_leaves(value, f"{prefix}.{i}")
    else:
        yield prefix, obj


def _storable(array: Any) -> np.ndarray | None:
    """The array as ``.npy`` can store it without pickle: strings and bytes in an object
    array become fixed-width ``U``/``S`` arrays; None for any other object array."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        items = array.ravel().tolist()
        for kind in (str, bytes):
            if all(isinstance(v, kind) for v in items):
                return np.array(items, dtype=kind).reshape(array.shape)
        return None
    return array


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=_jsonable)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)
