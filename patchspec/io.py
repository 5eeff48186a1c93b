"""Saving and loading results with their provenance: netCDF (h5netcdf) and zarr.

netCDF attributes hold only strings, numbers and flat numeric arrays, while a result's attrs
carry the spec as a dict, per-example baselines as lists, and possibly ``None`` or booleans.
:func:`save` keeps strings and numeric arrays as they are and writes every other attr as JSON,
listing those keys in a ``patchspec_json`` attr; :func:`load` decodes them again, so that::

    load(save(result, "r.nc")) is identical to result   # values, coords, token labels, attrs

and ``PatchSpec.from_dict(load("r.nc").attrs["spec"])`` rebuilds the spec that made it.
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr

from patchspec.errors import InputError

Format = Literal["netcdf", "zarr"]
FORMATS: tuple[str, ...] = ("netcdf", "zarr")
#: Attr listing the JSON-encoded attrs of a variable (a JSON list of their keys).
JSON_KEYS = "patchspec_json"
#: Dataset attr naming the variable of a saved DataArray (its name, possibly None).
DATAARRAY = "patchspec_dataarray"
#: Variable name of a saved DataArray that had no name (xarray's own convention).
UNNAMED = "__xarray_dataarray_variable__"


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)


def _encode(attrs: dict[Any, Any], where: str) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    encoded = []
    for key, value in attrs.items():
        if key == JSON_KEYS:
            raise InputError(f"attr {JSON_KEYS!r} of {where} is reserved by patchspec.io")
        keep = isinstance(value, str) or (
            isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iuf"
        )
        if keep:
            out[key] = value
            continue
        try:
            out[key] = json.dumps(value, default=_plain)
        except (TypeError, ValueError) as err:
            raise InputError(
                f"attr {key!r} of {where} ({type(value).__name__}) cannot be saved: it must be "
                f"JSON-serialisable (strings, numbers, booleans, None, lists, dicts): {err}"
            ) from None
        encoded.append(key)
    if encoded:
        out[JSON_KEYS] = json.dumps(encoded)
    return out


def _decode(attrs: dict[Any, Any]) -> dict[Any, Any]:
    attrs = dict(attrs)
    keys = json.loads(attrs.pop(JSON_KEYS, "[]"))
    for key in keys:
        attrs[key] = json.loads(attrs[key])
    return attrs


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
            "saving to zarr needs the zarr package; pip install zarr, or use a .nc path"
        )


def save(
    result: xr.DataArray | xr.Dataset, path: str | Path, *, format: Format | None = None
) -> Path:
    """Write a result (values, coords, token labels and all attrs) to ``path``.

    Args:
        result: A DataArray from ``spec.run(...)`` or a Dataset from ``Sweep(...).run(...)``
            (or anything derived from them).
        path: The file (netCDF, e.g. ``result.nc``) or directory (zarr, ``result.zarr``).
        format: ``"netcdf"`` or ``"zarr"``; default from the suffix (``.zarr`` is zarr).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        InputError: an attr cannot be serialised, or the format's package is missing.

    Example:
        >>> import tempfile, os
        >>> r = xr.DataArray([1.0, 2.0], dims="layer", name="m", attrs={"spec": {"a": [1]}})
        >>> path = save(r, os.path.join(tempfile.mkdtemp(), "r.nc"))
        >>> load(path).attrs["spec"]
        {'a': [1]}
    """
    path = Path(path)
    fmt = _format(path, format)
    if isinstance(result, xr.DataArray):
        name = UNNAMED if result.name is None else str(result.name)
        dataset = result.copy(deep=False).to_dataset(name=name, promote_attrs=False)
        dataset.attrs = {DATAARRAY: result.name}
    elif isinstance(result, xr.Dataset):
        dataset = result.copy(deep=False)
    else:
        raise InputError(f"save needs an xarray DataArray or Dataset, got {type(result).__name__}")
    dataset.attrs = _encode(dataset.attrs, "the result")
    for key, variable in dataset.variables.items():
        variable.attrs = _encode(variable.attrs, f"variable {key!r}")
    if fmt == "zarr":
        _check_zarr()
        dataset.to_zarr(path, mode="w", consolidated=False)
    else:
        dataset.to_netcdf(path, engine=_netcdf_engine())
    return path


def _restore_strings(dataset: xr.Dataset) -> xr.Dataset:
    """Give string variables back a numpy unicode dtype (files store them as objects)."""
    for key, variable in dataset.variables.items():
        if variable.dtype == object and all(isinstance(v, str) for v in variable.values.ravel()):
            restored = variable.copy(data=variable.values.astype(str))
            if key in dataset.coords:
                dataset = dataset.assign_coords({key: restored})
            else:
                dataset[key] = restored
    return dataset


def load(path: str | Path, *, format: Format | None = None) -> xr.DataArray | xr.Dataset:
    """Read a result written by :func:`save`: a DataArray if one was saved, else a Dataset.

    Everything is read into memory and the file is closed.

    Args:
        path: The netCDF file or zarr directory.
        format: ``"netcdf"`` or ``"zarr"``; default from the suffix.

    Returns:
        The result, identical to the one saved.

    Raises:
        InputError: ``path`` does not exist or the format's package is missing.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"no saved result at {str(path)!r}")
    fmt = _format(path, format)
    if fmt == "zarr":
        _check_zarr()
        with xr.open_zarr(path, consolidated=False) as opened:
            dataset = opened.load()
    else:
        with xr.open_dataset(path, engine=_netcdf_engine()) as opened:
            dataset = opened.load()
    dataset = _restore_strings(dataset)
    for variable in dataset.variables.values():
        variable.attrs = _decode(variable.attrs)
        variable.encoding = {}
    dataset.attrs = _decode(dataset.attrs)
    if DATAARRAY not in dataset.attrs:
        return dataset
    name = dataset.attrs.pop(DATAARRAY)
    array = dataset[UNNAMED if name is None else str(name)]
    return array.rename(name)
