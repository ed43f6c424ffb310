"""The docs site builds with warnings as errors and has an API page for every public function."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import gpusc

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["index", "installation", "coming-from-scanpy", "memory", "scaling", "api", "benchmarks",
         "tutorials/pbmc3k"]


def public_functions() -> list[str]:
    """Dotted names under gpusc of every function in a public module's ``__all__``."""
    names = []
    for module_name in gpusc.__all__:
        if module_name == "settings":  # an object, documented on the API page itself
            continue
        module = getattr(gpusc, module_name)
        for name in module.__all__:
            member = getattr(module, name)
            if isinstance(member, SimpleNamespace):  # experimental.pp: scanpy.experimental's names
                names += [f"{module_name}.{name}.{attr}" for attr in vars(member)]
            else:
                names.append(f"{module_name}.{name}")
    return names


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(out / "doctrees"), str(ROOT / "docs"), str(out / "html")]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the docs build failed (make docs):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out / "html"


def test_pages_exist(site):
    missing = [page for page in PAGES if not (site / f"{page}.html").is_file()]
    assert not missing


def test_every_public_function_has_an_api_page(site):
    names = public_functions()
    assert len(names) > 30 and "pp.neighbors" in names and "experimental.pp.highly_variable_genes" in names
    missing, unrendered = [], []
    for name in names:
        page = site / "generated" / f"gpusc.{name}.html"
        if not page.is_file():
            missing.append(name)
            continue
        html = page.read_text()
        # autodoc rendered the function and numpydoc its sections
        if f'id="gpusc.{name}"' not in html or ("Returns" not in html and "Parameters" not in html):
            unrendered.append(name)
    assert not missing, f"no API page for {missing}: each module needs a `.. gpusc-api:: <module>` table in docs/api.md"
    assert not unrendered, f"API pages without the function's docstring: {unrendered}"
    # ... and the reference page's tables link every one of them
    api = (site / "api.html").read_text()
    unlinked = [name for name in names if f'href="generated/gpusc.{name}.html#gpusc.{name}"' not in api]
    assert not unlinked, f"docs/api.md does not link {unlinked}"
    assert ":py:obj:" not in api, "autosummary's table was parsed as MyST: put the directive in eval-rst"


def test_settings_are_documented(site):
    html = (site / "api.html").read_text()
    assert 'id="gpusc._settings.Settings"' in html
    assert 'id="gpusc._settings.gpu_available"' in html


def test_tutorial_rendered_with_its_stored_outputs(site):
    html = (site / "tutorials" / "pbmc3k.html").read_text()
    # the figures of the executed notebook (violin, scatter, HVG, PCA, UMAP, markers, dotplot)
    assert html.count("<img") >= 7
    assert "running on the" in html  # a stored stream output


def test_benchmarks_page_is_the_generated_one(site):
    # docs/benchmarks.md (written by benchmarks/make_docs.py) is included as it is, plots too
    source = (ROOT / "docs" / "benchmarks.md").read_text()
    plots = [line.split("(")[-1].rstrip(")").split("/")[-1] for line in source.splitlines() if line.startswith("![")]
    assert plots
    assert all((site / "_images" / plot).is_file() for plot in plots)
