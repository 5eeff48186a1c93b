"""Saving and loading results with their provenance: netCDF (h5netcdf) and zarr.

:func:`save` and :func:`load` promise::

    load(save(result, "r.nc")) is identical to result   # values, coords, names, dtypes, attrs

down to the types inside the attrs (``{0: ...}`` keeps its int key, tuples stay tuples, numpy
scalars and arrays keep their dtype), and ``PatchSpec.from_dict(load("r.nc").attrs["spec"])``
rebuilds the spec that made it.

**Safe writes.** Everything that netCDF cannot store is found *before* anything is written: a
value :func:`save` cannot encode raises :class:`~patchspec.errors.InputError` naming it and where
it sits. The file is written to a temporary file in the same folder and moved over ``path``
(``os.replace``) only once it is complete, so a save that fails for any reason leaves the file
that was at ``path`` untouched and no temporary file behind.

**The file format** (``patchspec_format = 1``), readable by any netCDF tool:

* every variable's attrs, and a Dataset's own attrs, are kept in one attr ``patchspec_attrs``: JSON
  in which tuples, dicts with non-string keys, sets, bytes, complex numbers and numpy scalars and
  arrays are tagged objects (``{"__patchspec_type__": "tuple", "items": [...]}``), so they come
  back with their types; attrs whose names are plain identifiers and whose values are strings or
  numbers are *also* written as ordinary netCDF attributes, for other tools (``load`` reads only
  ``patchspec_attrs``);
* names netCDF cannot store (``"a/b"``, an empty name, a NUL byte, a non-string name such as
  ``0``) are written under a sanitised name (``"a_b"``) and the original is restored on load;
* strings netCDF cannot store (with a NUL byte, or a lone surrogate) are stored JSON-escaped;
* the Dataset attr ``patchspec_contents`` lists every variable with its original name, dims,
  shape and dtype; :func:`load` checks the file against it (a truncated or edited file is an
  error, not a smaller result).

Subclasses of dict, list and tuple (an ``OrderedDict``, a named tuple) come back as the plain
type with equal contents; enums and other subclasses of int, float and str, paths, dates and other
objects are refused.

Files written before the format had a version (they carry ``patchspec_json`` or
``patchspec_dataarray`` attrs) are read as *legacy* files: string attrs as they are, the attrs
listed in ``patchspec_json`` decoded as plain JSON (so tuples read as lists, dict keys as
strings). Any other netCDF file without ``patchspec_format`` is not a patchspec result and
:func:`load` says so; open it with ``xarray.open_dataset``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Hashable, Mapping
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr

from patchspec.errors import InputError, PatchSpecError

Format = Literal["netcdf", "zarr"]
FORMATS: tuple[str, ...] = ("netcdf", "zarr")
#: The file format :func:`save` writes (the Dataset attr ``patchspec_format``); :func:`load`
#: reads this and every older one, and refuses newer ones.
FORMAT_VERSION = 1
#: Dataset attr holding the format version.
FORMAT_ATTR = "patchspec_format"
#: Attr holding every attr of a variable (or of the Dataset) as type-tagged JSON.
ATTRS = "patchspec_attrs"
#: Dataset attr listing what the file holds (kind, variables, names, dims, shapes, dtypes).
CONTENTS = "patchspec_contents"
#: Legacy (unversioned) files: attr listing the JSON-encoded attrs of a variable.
JSON_KEYS = "patchspec_json"
#: Legacy files: Dataset attr naming the variable of a saved DataArray (its name, possibly None).
DATAARRAY = "patchspec_dataarray"
#: Variable name of a saved DataArray that had no name (xarray's own convention).
UNNAMED = "__xarray_dataarray_variable__"
#: Key marking a tagged value in ``patchspec_attrs``.
TAG = "__patchspec_type__"
_RESERVED = {FORMAT_ATTR, ATTRS, CONTENTS, JSON_KEYS, DATAARRAY}
#: Attr names netCDF libraries or xarray's CF decoding give a meaning; never written as copies.
_CF_NAMES = {
    "units", "calendar", "missing_value", "scale_factor", "add_offset", "dtype", "coordinates",
    "compress", "bounds", "grid_mapping", "valid_min", "valid_max", "valid_range",
    "CLASS", "NAME", "REFERENCE_LIST", "DIMENSION_LIST",
}  # fmt: skip
_PLAIN_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.+-]*")
_ARRAY_KINDS = "biufcUSO"
#: Path markers of a dict key and a set item in error messages.
_KEY, _ITEM = "<key>", "<item>"
_NAMES = {"netcdf": "netCDF", "zarr": "zarr"}


# -- type-tagged JSON -------------------------------------------------------------------------


class _Unsupported(Exception):
    def __init__(self, path: tuple[Any, ...], value: Any) -> None:
        super().__init__(path)
        self.path, self.value = path, value


def _tagged(kind: str, **fields: Any) -> dict[str, Any]:
    return {TAG: kind, **fields}


def _to_json(value: Any, path: tuple[Any, ...] = ()) -> Any:
    """``value`` as JSON-able data; types JSON lacks become tagged objects.

    Raises:
        _Unsupported: with the path (keys and indices) to the first value it cannot encode.
    """
    if value is None or isinstance(value, bool) or type(value) in (int, float, str):
        return value
    if isinstance(value, np.generic):
        if value.dtype.kind not in _ARRAY_KINDS or value.dtype.kind == "O":
            raise _Unsupported(path, value)
        return _tagged("numpy", dtype=value.dtype.str, value=_to_json(value.item(), path))
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _ARRAY_KINDS:
            raise _Unsupported(path, value)
        items = [_to_json(v, (*path, i)) for i, v in enumerate(value.ravel().tolist())]
        return _tagged("ndarray", dtype=value.dtype.str, shape=list(value.shape), items=items)
    if isinstance(value, int | float | str):  # subclasses (enums, ...) would come back plain
        raise _Unsupported(path, value)
    if isinstance(value, complex):
        return _tagged("complex", real=value.real, imag=value.imag)
    if isinstance(value, bytes):
        return _tagged("bytes", hex=value.hex())
    if isinstance(value, list):
        return [_to_json(v, (*path, i)) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return _tagged("tuple", items=[_to_json(v, (*path, i)) for i, v in enumerate(value)])
    if isinstance(value, set | frozenset):
        items = sorted((_to_json(v, (*path, _ITEM)) for v in value), key=json.dumps)
        return _tagged(type(value).__name__, items=items)
    if isinstance(value, dict):
        if all(type(k) is str for k in value) and TAG not in value:
            return {k: _to_json(v, (*path, k)) for k, v in value.items()}
        pairs = [[_to_json(k, (*path, _KEY)), _to_json(v, (*path, k))] for k, v in value.items()]
        return _tagged("dict", items=pairs)
    raise _Unsupported(path, value)


def _from_json(data: Any) -> Any:
    """Invert :func:`_to_json`."""
    if isinstance(data, list):
        return [_from_json(v) for v in data]
    if not isinstance(data, dict):
        return data
    if TAG not in data:
        return {k: _from_json(v) for k, v in data.items()}
    kind = data[TAG]
    if kind == "tuple":
        return tuple(_from_json(v) for v in data["items"])
    if kind == "dict":
        return {_hashable(_from_json(k)): _from_json(v) for k, v in data["items"]}
    if kind in ("set", "frozenset"):
        members = {_hashable(_from_json(v)) for v in data["items"]}
        return members if kind == "set" else frozenset(members)
    if kind == "complex":
        return complex(data["real"], data["imag"])
    if kind == "bytes":
        return bytes.fromhex(data["hex"])
    if kind == "numpy":
        return np.array(_from_json(data["value"]), dtype=np.dtype(data["dtype"]))[()]
    if kind == "ndarray":
        dtype = np.dtype(data["dtype"])
        items = [_from_json(v) for v in data["items"]]
        if dtype.kind == "O":
            out = np.empty(len(items), dtype=object)
            out[:] = items
            return out.reshape(data["shape"])
        return np.array(items, dtype=dtype).reshape(data["shape"])
    raise ValueError(f"unknown tagged value {kind!r} (written by a newer patchspec?)")


def _hashable(value: Any) -> Hashable:
    try:
        hash(value)
    except TypeError:
        raise ValueError(f"{value!r} cannot be a dict key or set item") from None
    return value


def _dumps(value: Any, where: str) -> str:
    """Type-tagged JSON text of a dict of attrs; pure ASCII, so NUL bytes and surrogates survive.

    Raises:
        InputError: naming the attr (and the place inside it) that cannot be encoded.
    """
    try:
        return json.dumps(_to_json(value))
    except _Unsupported as err:
        key, *inner = err.path
        at = f" at {''.join(f'[{p!r}]' for p in inner)}" if inner else ""
        raise InputError(
            f"attr {key!r} of {where}{at} cannot be saved: type {type(err.value).__name__} "
            f"({_short(err.value)}) is not supported; attrs may hold strings, numbers, booleans, None, lists, "
            "tuples, dicts, sets, bytes and numpy scalars and arrays (convert it, e.g. to str, "
            "or drop it)"
        ) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- names and values netCDF can store --------------------------------------------------------


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _storable_string(text: str) -> bool:
    return "\x00" not in text and _utf8(text)


def _storable_name(name: Hashable) -> bool:
    """A name netCDF (HDF5, netCDF-C) stores as it is."""
    if not isinstance(name, str) or not name or "/" in name or not name.isprintable():
        return False
    first = name[0]
    return (
        (first.isalnum() or first == "_" or ord(first) > 127)
        and name == name.rstrip()
        and _utf8(name)
    )


def _sanitised(name: Hashable) -> str:
    text = "".join(
        c if c.isprintable() and c != "/" and _utf8(c) else "_" for c in str(name)
    ).rstrip()
    if not text or not (text[0].isalnum() or text[0] == "_" or ord(text[0]) > 127):
        text = "_" + text
    return text


def _plain_copy(key: Any, value: Any) -> bool:
    """Whether an attr is also written as an ordinary netCDF attribute (for other tools)."""
    if not isinstance(key, str) or not _PLAIN_KEY.fullmatch(key) or key in _CF_NAMES | _RESERVED:
        return False
    if isinstance(value, str):
        return _storable_string(value)
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    if isinstance(value, float | np.integer | np.floating):
        return True
    return (
        isinstance(value, np.ndarray)
        and value.ndim == 1
        and value.size > 0
        and value.dtype.kind in "iuf"
    )


def _describe(name: Hashable) -> str:
    return f"variable {name!r}"


def _encode_attrs(attrs: Mapping[Any, Any], where: str) -> dict[str, Any]:
    if not attrs:
        return {}
    out = {key: value for key, value in attrs.items() if _plain_copy(key, value)}
    out[ATTRS] = _dumps(dict(attrs), where)
    return out


def _encode_strings(variable: xr.Variable, name: Hashable) -> tuple[xr.Variable, bool]:
    """The variable, with its strings JSON-escaped if netCDF cannot store them as they are."""
    kind = variable.dtype.kind
    if kind not in "UO":
        return variable, False
    values = variable.values
    flat = values.ravel()
    for index, item in enumerate(flat):
        if not isinstance(item, str):
            at = np.unravel_index(index, values.shape) if values.shape else ()
            raise InputError(
                f"{_describe(name)} holds a {type(item).__name__} ({_short(item)}) at index "
                f"{tuple(int(i) for i in at)}; netCDF stores arrays of strings or of numbers, "
                "not mixed objects (convert the values first)"
            )
    if all(_storable_string(item) for item in flat):
        return variable, False
    escaped = np.array([json.dumps(item) for item in flat], dtype=str).reshape(values.shape)
    return variable.copy(data=escaped), True


def _check_dataset(dataset: xr.Dataset) -> None:
    for name, index in dataset.indexes.items():
        if isinstance(index, pd.MultiIndex):
            raise InputError(
                f"coordinate {name!r} is a pandas MultiIndex, which netCDF cannot store; "
                f"call .reset_index({name!r}) before saving"
            )


def _encode(result: xr.DataArray | xr.Dataset) -> xr.Dataset:
    """The Dataset to write: every name, string and attr in a form netCDF stores exactly."""
    if isinstance(result, xr.DataArray):
        kind, name = "DataArray", result.name
        taken = {*result.coords, *result.dims}
        key: Hashable = name if isinstance(name, str) and name not in taken else UNNAMED
        dataset = result.to_dataset(name=key, promote_attrs=False)
        data_attrs: dict[Any, Any] = {}
    elif isinstance(result, xr.Dataset):
        kind, name, key, dataset = "Dataset", None, None, result
        data_attrs = dict(result.attrs)
    else:
        raise InputError(f"save needs an xarray DataArray or Dataset, got {type(result).__name__}")
    _check_dataset(dataset)
    names = [*dataset.variables, *(d for d in dataset.dims if d not in dataset.variables)]
    stored: dict[Hashable, str] = {}
    used = {n for n in names if _storable_name(n)}
    for original in names:
        if _storable_name(original):
            stored[original] = str(original)
            continue
        base = candidate = _sanitised(original)
        count = 1
        while candidate in used:
            count += 1
            candidate = f"{base}_{count}"
        used.add(candidate)
        stored[original] = candidate
    entries: list[dict[str, Any]] = []
    coords: dict[Hashable, xr.Variable] = {}
    data_vars: dict[Hashable, xr.Variable] = {}
    for original, variable in dataset.variables.items():
        where = "the result" if kind == "DataArray" and original == key else _describe(original)
        variable, escaped = _encode_strings(variable, original)
        out = xr.Variable(
            tuple(stored[d] for d in variable.dims),
            variable.data,
            _encode_attrs(variable.attrs, where),
        )
        entry = {
            "stored": stored[original],
            "name": result.name if kind == "DataArray" and original == key else original,
            "coord": original in dataset.coords,
            "dims": [stored[d] for d in variable.dims],
            "shape": list(variable.shape),
            "dtype": dataset.variables[original].dtype.str,
        }
        if escaped:
            entry["strings"] = "json"
        entries.append(entry)
        (coords if original in dataset.coords else data_vars)[stored[original]] = out
    dims = [[stored[d], d] for d in dataset.dims if stored[d] != d]
    contents = {"kind": kind, "name": name, "variables": entries, "dims": dims}
    try:
        listing = json.dumps(_to_json(contents))
    except _Unsupported as err:
        raise InputError(
            f"the name {_short(err.value)} ({type(err.value).__name__}) of a variable, dim or "
            "the result cannot be saved; names may be strings, numbers, tuples or None"
        ) from None
    attrs: dict[str, Any] = {FORMAT_ATTR: FORMAT_VERSION, CONTENTS: listing}
    attrs.update(_encode_attrs(data_attrs, "the result"))
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


# -- decoding -----------------------------------------------------------------------------


def _decode_attrs(attrs: Mapping[Any, Any]) -> dict[Any, Any]:
    return dict(_from_json(json.loads(attrs[ATTRS]))) if ATTRS in attrs else {}


def _decode_v1(dataset: xr.Dataset, source: str) -> xr.DataArray | xr.Dataset:
    contents = _from_json(json.loads(dataset.attrs[CONTENTS]))
    entries = contents["variables"]
    expected = {e["stored"]: e for e in entries}
    missing = [s for s in expected if s not in dataset.variables]
    extra = [str(s) for s in dataset.variables if s not in expected]
    if missing or extra:
        problem = f"lacks variables {missing}" if missing else f"has variables {extra} it did not"
        raise InputError(
            f"{source} {problem} (patchspec_contents lists {sorted(expected)}); the file is "
            "truncated or was edited after patchspec saved it"
        )
    renames = {stored: original for stored, original in contents["dims"]}
    data_vars: dict[Hashable, xr.Variable] = {}
    coords: dict[Hashable, xr.Variable] = {}
    for entry in entries:
        variable = dataset.variables[entry["stored"]]
        if list(variable.dims) != entry["dims"] or list(variable.shape) != entry["shape"]:
            raise InputError(
                f"{source}: variable {entry['stored']!r} has dims {variable.dims} and shape "
                f"{variable.shape}, but patchspec wrote {tuple(entry['dims'])} and "
                f"{tuple(entry['shape'])}; the file is truncated or was edited"
            )
        values = variable.values
        dtype = np.dtype(entry["dtype"])
        if entry.get("strings") == "json":
            values = np.array([json.loads(v) for v in values.ravel()], dtype=object).reshape(
                values.shape
            )
        if dtype.kind in "UOS" and values.dtype != dtype:
            values = values.astype(dtype)
        elif values.dtype != dtype:
            raise InputError(
                f"{source}: variable {entry['stored']!r} reads as dtype {values.dtype}, but "
                f"patchspec wrote {dtype}; the file was edited after patchspec saved it"
            )
        attrs = _decode_attrs(variable.attrs)
        dims = tuple(renames.get(d, d) for d in variable.dims)
        out = xr.Variable(dims, values, attrs)
        name = entry["name"] if contents["kind"] == "Dataset" or entry["coord"] else entry["stored"]
        (coords if entry["coord"] else data_vars)[name] = out
    if contents["kind"] == "Dataset":
        return xr.Dataset(data_vars, coords=coords, attrs=_decode_attrs(dataset.attrs))
    [variable] = data_vars.values()
    return xr.DataArray(variable, coords=coords, name=contents["name"])


def _restore_strings(dataset: xr.Dataset) -> xr.Dataset:
    """Legacy files: give string variables back a numpy unicode dtype."""
    for key, variable in dataset.variables.items():
        if variable.dtype == object and all(isinstance(v, str) for v in variable.values.ravel()):
            restored = variable.copy(data=variable.values.astype(str))
            if key in dataset.coords:
                dataset = dataset.assign_coords({key: restored})
            else:
                dataset[key] = restored
    return dataset


def _decode_legacy_attrs(attrs: dict[Any, Any]) -> dict[Any, Any]:
    attrs = dict(attrs)
    for key in json.loads(attrs.pop(JSON_KEYS, "[]")):
        attrs[key] = json.loads(attrs[key])
    return attrs


def _decode_legacy(dataset: xr.Dataset, source: str) -> xr.DataArray | xr.Dataset:
    dataset = _restore_strings(dataset)
    for variable in dataset.variables.values():
        variable.attrs = _decode_legacy_attrs(dict(variable.attrs))
    dataset.attrs = _decode_legacy_attrs(dataset.attrs)
    if DATAARRAY not in dataset.attrs:
        return dataset
    name = dataset.attrs.pop(DATAARRAY)
    key = UNNAMED if name is None else str(name)
    if key not in dataset.data_vars:
        raise InputError(f"{source} lacks its data variable {key!r}; the file is truncated")
    return dataset[key].rename(name)


def _is_legacy(dataset: xr.Dataset) -> bool:
    attrs = [dataset.attrs, *(v.attrs for v in dataset.variables.values())]
    return DATAARRAY in dataset.attrs or any(JSON_KEYS in a for a in attrs)


# -- files ----------------------------------------------------------------------------------


def _format(path: Path, fmt: Format | None) -> str:
    if fmt is None:
        fmt = "zarr" if path.suffix == ".zarr" else "netcdf"
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {FORMATS}, got {fmt!r}")
    return fmt


def _netcdf_engine() -> Literal["h5netcdf", "netcdf4"]:
    """``h5netcdf`` (with its ``h5py`` backend), else ``netcdf4``."""
    if find_spec("h5netcdf") is not None and find_spec("h5py") is not None:
        return "h5netcdf"
    if find_spec("netCDF4") is not None:
        return "netcdf4"
    raise InputError(
        "netCDF files need h5netcdf with h5py (or netCDF4); pip install 'patchspec[io]'"
    )


def _check_zarr() -> None:
    if find_spec("zarr") is None:
        raise InputError(
            "saving to zarr needs the zarr package: pip install 'patchspec[zarr]', or use a .nc path"
        )


def _is_zarr_store(path: Path) -> bool:
    return any((path / marker).exists() for marker in ("zarr.json", ".zgroup", ".zattrs"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _replace_file(tmp: Path, path: Path) -> None:
    _fsync(tmp)
    if path.exists():
        shutil.copymode(path, tmp)
    os.replace(tmp, path)


def _replace_dir(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.replace(tmp, path)
        return
    backup = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
    os.replace(path, backup)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(backup, path)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _write_atomically(
    path: Path, write: Callable[[Path], None], replace: Callable[[Path, Path], None]
) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, Exception) and not isinstance(err, PatchSpecError):
            raise InputError(
                f"could not save to {str(path)!r} ({type(err).__name__}: {err}); nothing was "
                "written there (a file already at that path is unchanged)"
            ) from err
        raise


def save(
    result: xr.DataArray | xr.Dataset, path: str | Path, *, format: Format | None = None
) -> Path:
    """Write a result (values, coords, token labels and all attrs) to ``path``, atomically.

    The result is checked and encoded first (see the module docs); then it is written to a
    temporary file next to ``path``, which replaces ``path`` only once complete. A failed save
    leaves whatever was at ``path`` as it was.

    Args:
        result: A DataArray from ``spec.run(...)`` or a Dataset from ``Sweep(...).run(...)``
            (or anything derived from them).
        path: The file (netCDF, e.g. ``result.nc``) or directory (zarr, ``result.zarr``).
        format: ``"netcdf"`` or ``"zarr"``; default from the suffix (``.zarr`` is zarr).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        InputError: a value cannot be stored (an attr of an unsupported type, an array of mixed
            objects, a MultiIndex), the folder does not exist, the write failed, or the
            format's package is missing.

    Example:
        >>> import tempfile, os
        >>> r = xr.DataArray([1.0, 2.0], dims="layer", name="m", attrs={"spec": {0: (1, 2)}})
        >>> path = save(r, os.path.join(tempfile.mkdtemp(), "r.nc"))
        >>> load(path).attrs["spec"]
        {0: (1, 2)}
    """
    path = Path(path)
    fmt = _format(path, format)
    dataset = _encode(result)
    if path.is_symlink():  # replace the file the link points to, not the link
        path = Path(os.path.realpath(path))
    if not path.parent.is_dir():
        raise InputError(
            f"cannot save to {str(path)!r}: folder {str(path.parent)!r} does not exist"
        )
    if fmt == "zarr":
        _check_zarr()
        if path.exists() and not (path.is_dir() and _is_zarr_store(path)):
            raise InputError(
                f"cannot save to {str(path)!r}: something that is not a zarr store is there; "
                "remove it or choose another path"
            )

        def write_zarr(tmp: Path) -> None:
            dataset.to_zarr(tmp, mode="w-", consolidated=False)

        _write_atomically(path, write_zarr, _replace_dir)
    else:
        engine = _netcdf_engine()
        if path.is_dir():
            raise InputError(
                f"cannot save to {str(path)!r}: it is a folder (a .zarr path saves zarr)"
            )
        _write_atomically(path, lambda tmp: dataset.to_netcdf(tmp, engine=engine), _replace_file)
    return path


def _open(path: Path, fmt: str) -> xr.Dataset:
    source = repr(str(path))
    try:
        if fmt == "zarr":
            _check_zarr()
            with xr.open_zarr(path, consolidated=False) as opened:
                return opened.load()
        engine = _netcdf_engine()
        if path.is_dir():
            raise InputError(f"{source} is a folder, not a netCDF file (a .zarr path loads zarr)")
        extra: dict[str, Any] = {"phony_dims": "access"} if engine == "h5netcdf" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with xr.open_dataset(path, engine=engine, **extra) as opened:
                return opened.load()
    except PatchSpecError:
        raise
    except Exception as err:
        raise InputError(
            f"{source} is not a readable {_NAMES[fmt]} file ({type(err).__name__}: {err}); it may be "
            "truncated, still being written, or not a saved result"
        ) from None


def load(path: str | Path, *, format: Format | None = None) -> xr.DataArray | xr.Dataset:
    """Read a result written by :func:`save`: a DataArray if one was saved, else a Dataset.

    Everything is read into memory and the file is closed. The file is checked against the
    list of contents :func:`save` wrote into it.

    Args:
        path: The netCDF file or zarr directory.
        format: ``"netcdf"`` or ``"zarr"``; default from the suffix.

    Returns:
        The result, identical to the one saved.

    Raises:
        InputError: naming ``path``: it does not exist, is not a netCDF (zarr) file, is
            truncated, is not a patchspec result, was written by a newer patchspec (a newer
            ``patchspec_format``), or the format's package is missing.
    """
    import patchspec.accessor  # noqa: F401  (registers .patch on what is loaded)

    path = Path(path)
    source = repr(str(path))
    if not path.exists():
        raise InputError(f"no saved result at {source}")
    fmt = _format(path, format)
    dataset = _open(path, fmt)
    version = dataset.attrs.get(FORMAT_ATTR)
    try:
        if version is None:
            if not _is_legacy(dataset):
                raise InputError(
                    f"{source} is a {_NAMES[fmt]} file but not a patchspec result (it has no "
                    f"{FORMAT_ATTR!r} attr); open it with xarray.open_dataset"
                )
            return _decode_legacy(dataset, source)
        if isinstance(version, bool) or not isinstance(version, int | np.integer) or version < 1:
            raise InputError(f"{source} has an invalid {FORMAT_ATTR!r} attr {version!r}")
        if version > FORMAT_VERSION:
            raise InputError(
                f"{source} was written in patchspec file format {int(version)}, newer than this "
                f"patchspec reads (up to {FORMAT_VERSION}); upgrade patchspec to load it"
            )
        if CONTENTS not in dataset.attrs:
            raise InputError(
                f"{source} lacks its {CONTENTS!r} attr; the file was edited or truncated"
            )
        return _decode_v1(dataset, source)
    except PatchSpecError:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise InputError(
            f"{source} has corrupt patchspec metadata ({type(err).__name__}: {err})"
        ) from None
