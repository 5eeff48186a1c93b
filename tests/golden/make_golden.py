"""Write the golden results ``tests/golden/golden_<model>.nc`` and ``manifest.json``.

Every case of :mod:`tests.golden.cases` is run on the tiny gpt2 and qwen2 models of
:mod:`tests.models` (default seed) with the default (batched) engine, checked against the
reference engine (to 1e-5), and saved with :func:`patchspec.save`. Only the public API is used.

Run it from a pristine checkout of the commit the goldens should freeze, e.g.::

    rm -rf /tmp/pristine && mkdir /tmp/pristine && git archive HEAD | tar -x -C /tmp/pristine
    cd /tmp/pristine && PYTHONPATH=/tmp/pristine python tests/golden/make_golden.py \\
        --out /path/to/repo/tests/golden
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
import xarray as xr

import patchspec as ps
from tests.golden.cases import CASES, GOLDEN_DIR, MODELS, encode
from tests.models import build


def _values(result: xr.DataArray | xr.Dataset) -> dict[str, np.ndarray]:
    if isinstance(result, xr.DataArray):
        return {"result": result.values}
    return {str(k): v.values for k, v in result.data_vars.items()}


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=GOLDEN_DIR, help="output folder")
    parser.add_argument("--commit", default=None, help="commit recorded in the manifest")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"patchspec imported from {ps.__file__}")
    args.out.mkdir(parents=True, exist_ok=True)
    for model_name in MODELS:
        with tempfile.TemporaryDirectory() as folder:
            model = build(model_name, Path(folder))
            encoded = []
            for name, case in CASES.items():
                if model_name not in case.models:
                    continue
                batched = case.run(model, "batched")
                reference = case.run(model, "reference")
                for key, value in _values(batched).items():
                    other = _values(reference)[key]
                    np.testing.assert_allclose(
                        value, other, rtol=1e-5, atol=1e-5, err_msg=f"{model_name} {name} {key}"
                    )
                encoded.append(encode(name, batched))
                print(f"{model_name:6s} {name:40s} {dict(batched.sizes)}")
        golden = xr.merge(encoded, combine_attrs="no_conflicts", compat="identical")
        golden.attrs["patchspec_golden_model"] = model_name
        golden.attrs["patchspec_golden_cases"] = [
            name for name, case in CASES.items() if model_name in case.models
        ]
        path = ps.save(golden, args.out / f"golden_{model_name}.nc")
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    manifest = {
        "commit": args.commit or _commit(),
        "models": list(MODELS),
        "model_builder": "tests.models.build(name, folder) (default seed 0)",
        "default_inputs": "tests.models.prompts(n=2, length=6, seed=1)",
        "engine": "batched (checked against reference to 1e-5)",
        "cases": {name: case.describe() for name, case in CASES.items()},
    }
    manifest_path = args.out / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=repr) + "\n")
    print(f"wrote {manifest_path}")


if __name__ == "__main__":
    main()
