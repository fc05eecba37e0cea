"""Execute the three analysis notebooks with CI-sized parameters (stories260K, a few hundred
tokens) into a temporary folder; the committed copies are left untouched."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
STORIES = ROOT.parent / "shared" / "data" / "models" / "stories260K" / "stories260K.bin"
WIKI = ROOT.parent / "shared" / "data" / "text" / "wikitext2_test.txt"

pytest.importorskip("nbclient", reason="nbclient is not installed (pip install llmint8[notebooks])")
pytest.importorskip("nbformat", reason="nbformat is not installed (pip install llmint8[notebooks])")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install llmint8[notebooks])")
pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install llmint8[notebooks])")
if not STORIES.exists() or not WIKI.exists():
    pytest.skip(f"shared model/text data not found beside the repository ({STORIES.parent.parent.parent})",
                allow_module_level=True)


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", NB_DIR / "run_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RUNNER = _runner()


def _outputs_text(nb) -> str:
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if "text" in o:
                parts.append(o["text"])
            elif "data" in o and "text/plain" in o["data"]:
                parts.append(o["data"]["text/plain"])
    return "\n".join(parts)


@pytest.mark.parametrize("name", RUNNER.NOTEBOOKS)
def test_notebook_runs_with_ci_parameters(name, tmp_path):
    import nbformat

    before = (NB_DIR / name).read_bytes()
    t0 = time.time()
    RUNNER.run_notebook(NB_DIR / name, tmp_path / name, RUNNER.CI_PARAMETERS, timeout=600)
    elapsed = time.time() - t0
    assert (NB_DIR / name).read_bytes() == before, "the committed notebook must not be modified"
    nb = nbformat.read(str(tmp_path / name), as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "stories260K" in injected[0].source
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = _outputs_text(nb)
    assert "stories260K" in text and "This run covered" in text
    images = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    assert images >= 1
    assert elapsed < 300, f"{name} took {elapsed:.0f} s with CI parameters"


def test_committed_notebooks_have_parameters_cell_and_outputs():
    import nbformat

    for name in RUNNER.NOTEBOOKS:
        nb = nbformat.read(str(NB_DIR / name), as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        assert "MODELS" in tagged[0].source and "TOKENS" in tagged[0].source
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert outputs, f"{name} is committed without outputs"
        assert not [o for o in outputs if o.get("output_type") == "error"], name
        json.dumps(nb)  # valid JSON structure
