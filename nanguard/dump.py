"""The forensic dump: one zip archive of JSON and .npy entries per event. No pickle."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import secrets
import stat
import urllib.parse
import zipfile
from collections.abc import Iterator, Mapping
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
        state: Model (``model.*``) and optimizer (``optimizer.*``) state, when dumped.

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
    state: dict[str, np.ndarray]

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


def write_dump(
    dump_dir: str,
    event: Event,
    history: list[StepRecord],
    tensors: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    state: Mapping[str, np.ndarray] | None = None,
) -> str:
    """Write one dump atomically and return its path.

    The archive is written to a temporary file in ``dump_dir`` and only then given its
    name, so a crash never leaves a half-written dump under the final name; a name taken
    already (another run sharing ``dump_dir``) gets a ``_1``, ``_2``, ... suffix.
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
                for name, array in group.items():
                    data = _npy(array)
                    if data is None:
                        left_out.append(f"{prefix}/{name}")
                    else:
                        zf.writestr(f"{prefix}/{_entry(name)}.npy", data)
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
            groups: dict[str, dict[str, np.ndarray]] = {"tensors": {}, "state": {}}
            for name in zf.namelist() if arrays else ():
                prefix, _, rest = name.partition("/")
                if prefix in groups and rest.endswith(".npy"):
                    # read_array reads .npy only (np.load would open an .npz, or a pickle).
                    groups[prefix][urllib.parse.unquote(rest[:-4])] = np.lib.format.read_array(
                        io.BytesIO(zf.read(name)), allow_pickle=False
                    )
    except DumpError:
        raise
    except FileNotFoundError as err:
        raise DumpError(f"no such dump: {p}") from err
    except IsADirectoryError as err:
        raise DumpError(f"is a directory, not a dump: {p}") from err
    except PermissionError as err:
        raise DumpError(f"cannot read the dump (permission denied): {p}") from err
    except (zipfile.BadZipFile, EOFError) as err:
        raise DumpError(f"not a nanguard dump (truncated or not a zip archive): {p}") from err
    except Exception as err:  # noqa: BLE001 - any other failure is a corrupt dump
        raise DumpError(f"corrupt nanguard dump ({type(err).__name__}: {err}): {p}") from err
    return Dump(p, event, history, groups["tensors"], meta, groups["state"])


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


def _npy(array: Any) -> bytes | None:
    """The ``.npy`` bytes of an array; None for one that cannot be stored without pickle (an
    object array other than text: strings and bytes become fixed-width ``U``/``S`` arrays)."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        items = array.ravel().tolist()
        for kind in (str, bytes):
            if all(isinstance(v, kind) for v in items):
                array = np.array(items, dtype=kind).reshape(array.shape)
                break
        else:
            return None
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


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
