"""Execute the analysis notebooks with nbclient.

    python notebooks/run_notebooks.py              # full parameters, outputs written in place
    python notebooks/run_notebooks.py --ci --out /tmp/nb   # CI-sized run into another folder
    python notebooks/run_notebooks.py --set 'MODELS=["stories260K"]' --set TOKENS=512 01

Parameters are injected papermill-style: a cell tagged ``injected-parameters`` with the given
assignments is placed right after the cell tagged ``parameters``, so the notebook's defaults
stay visible and the overrides are recorded in the executed copy.
"""

from __future__ import annotations

import argparse
import ast
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

NOTEBOOKS = (
    "01_outlier_emergence.ipynb",
    "02_quantization_methods.ipynb",
    "03_zeroing_outliers.ipynb",
)

#: Small enough for CI (all three notebooks in well under 10 minutes on 2 cores).
CI_PARAMETERS = {"MODELS": ["stories260K"], "TOKENS": 256, "EXTRA_CHECKPOINTS": []}


def _parameter_source(params: dict) -> str:
    lines = ["# Parameters injected by run_notebooks.py"]
    lines += [f"{k} = {v!r}" for k, v in params.items()]
    return "\n".join(lines)


def run_notebook(src: pathlib.Path, dst: pathlib.Path, parameters: dict | None = None,
                 timeout: int = 1800, kernel_name: str = "python3") -> None:
    """Execute notebook ``src`` (with ``parameters`` injected) and write it to ``dst``.

    The kernel runs in the notebooks folder with the repository on ``PYTHONPATH``. Raises
    ``nbclient.exceptions.CellExecutionError`` when a cell fails.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(src), as_version=4)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    if parameters:
        idx = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
        if idx is None:
            raise ValueError(f"{src.name} has no cell tagged 'parameters'")
        cell = nbformat.v4.new_code_cell(_parameter_source(parameters))
        cell.metadata["tags"] = ["injected-parameters"]
        nb.cells.insert(idx + 1, cell)
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + env_path if env_path else "")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                                resources={"metadata": {"path": str(HERE)}})
        client.execute()
    finally:
        os.environ["PYTHONPATH"] = env_path
        if not env_path:
            del os.environ["PYTHONPATH"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(dst))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("which", nargs="*", help="notebook name prefixes (default: all), e.g. 01 03")
    p.add_argument("--ci", action="store_true", help="CI-sized parameters (stories260K, few tokens)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a parameter (VALUE is a Python literal)")
    p.add_argument("--out", default=None, help="write executed notebooks here (default: in place)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    a = p.parse_args(argv)
    params = dict(CI_PARAMETERS) if a.ci else {}
    for s in a.set:
        k, _, v = s.partition("=")
        try:
            params[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            params[k.strip()] = v
    names = [n for n in NOTEBOOKS if not a.which or any(n.startswith(w) for w in a.which)]
    out = pathlib.Path(a.out) if a.out else HERE
    for n in names:
        t0 = time.time()
        run_notebook(HERE / n, out / n, params or None, timeout=a.timeout)
        print(f"{n}: executed in {time.time() - t0:.1f} s -> {out / n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
