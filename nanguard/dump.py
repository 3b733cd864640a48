"""The forensic dump: one zip archive of JSON and .npy entries per event. No pickle."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import re
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from nanguard.events import Event, StepRecord

FORMAT = "nanguard-dump"
FORMAT_VERSION = 1
SUFFIX = ".nanguard.zip"
_NAME_OK = re.compile(r"[^A-Za-z0-9_.\-]+")


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
        state: Model (``model/...``) and optimizer (``optimizer/...``) state, when dumped.

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

    The archive is written to a temporary file in ``dump_dir`` and renamed into place, so
    a crash never leaves a half-written dump under the final name.
    """
    os.makedirs(dump_dir, exist_ok=True)
    final = os.path.join(dump_dir, dump_name(event))
    stem = final[: -len(SUFFIX)]
    n = 1
    while os.path.exists(final):
        final = f"{stem}_{n}{SUFFIX}"
        n += 1
    full_meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".tmp", dir=dump_dir)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("meta.json", _json(full_meta))
            zf.writestr("event.json", _json(event.to_dict()))
            zf.writestr("history.json", _json([r.to_dict() for r in history]))
            for prefix, group in (("tensors", tensors), ("state", state or {})):
                for name, array in group.items():
                    zf.writestr(f"{prefix}/{_safe(name)}.npy", _npy(array))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return final


def load(path: str | os.PathLike[str]) -> Dump:
    """Read a dump written by any nanguard adapter.

    Args:
        path: The dump file.

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
    p = os.fspath(path)
    try:
        with zipfile.ZipFile(p) as zf:
            names = set(zf.namelist())
            if "meta.json" not in names or "event.json" not in names:
                raise DumpError(f"not a nanguard dump (no meta.json/event.json): {p}")
            meta = json.loads(zf.read("meta.json"))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise DumpError(f"not a nanguard dump (format is not {FORMAT!r}): {p}")
            if int(meta.get("format_version", 0)) > FORMAT_VERSION:
                raise DumpError(
                    f"dump format version {meta.get('format_version')} is newer than this "
                    f"nanguard reads ({FORMAT_VERSION}); upgrade nanguard: {p}"
                )
            event = Event.from_dict(json.loads(zf.read("event.json")))
            raw_history = json.loads(zf.read("history.json")) if "history.json" in names else []
            history = [StepRecord.from_dict(h) for h in raw_history]
            groups: dict[str, dict[str, np.ndarray]] = {"tensors": {}, "state": {}}
            for name in zf.namelist():
                prefix, _, rest = name.partition("/")
                if prefix in groups and rest.endswith(".npy"):
                    groups[prefix][rest[:-4]] = np.load(
                        io.BytesIO(zf.read(name)), allow_pickle=False
                    )
    except DumpError:
        raise
    except FileNotFoundError as err:
        raise DumpError(f"no such dump: {p}") from err
    except IsADirectoryError as err:
        raise DumpError(f"is a directory, not a dump: {p}") from err
    except (zipfile.BadZipFile, EOFError) as err:
        raise DumpError(f"not a nanguard dump (truncated or not a zip archive): {p}") from err
    except Exception as err:  # noqa: BLE001 - any other failure is a corrupt dump
        raise DumpError(f"corrupt nanguard dump ({type(err).__name__}: {err}): {p}") from err
    return Dump(p, event, history, groups["tensors"], meta, groups["state"])


def tensor_summary(array: np.ndarray) -> dict[str, Any]:
    """Shape, dtype and counts of NaN and Inf of one array, JSON-ready."""
    out: dict[str, Any] = {"shape": list(array.shape), "dtype": str(array.dtype)}
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        out["nan"] = int(np.isnan(array).sum())
        out["inf"] = int(np.isinf(array).sum())
        fin = array[np.isfinite(array)]
        out["min"] = float(fin.min()) if fin.size else None
        out["max"] = float(fin.max()) if fin.size else None
    else:
        out["nan"] = 0
        out["inf"] = 0
        out["min"] = array.min().item() if array.size and array.dtype != bool else None
        out["max"] = array.max().item() if array.size and array.dtype != bool else None
    return out


def _safe(name: str) -> str:
    return _NAME_OK.sub("_", name).strip("_") or "tensor"


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
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
