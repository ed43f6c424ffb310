"""Sphinx configuration: MyST pages, numpydoc docstrings, the executed notebooks as stored.

Built by ``make docs`` (warnings are errors) and by tests/test_docs.py.
"""

from __future__ import annotations

import functools
import inspect
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

from docutils.statemachine import StringList
from sphinx.ext.autosummary import Autosummary

import gpusc

project = "gpusc"
author = "the gpusc developers"
copyright = "the gpusc developers"
release = version = gpusc.__version__

extensions = [
    "myst_nb",  # MyST markdown pages and .ipynb notebooks (includes myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
]


def public_api(module_name: str) -> list[str]:
    """``gpusc.<module_name>``'s public functions as "module.function", in its ``__all__``'s order.

    A namespace in ``__all__`` (``experimental.pp``: scanpy.experimental's names) contributes
    its members.
    """
    module = getattr(gpusc, module_name)
    names = []
    for name in module.__all__:
        member = getattr(module, name)
        if isinstance(member, SimpleNamespace):
            names += [f"{module_name}.{name}.{attr}" for attr in vars(member)]
        else:
            names.append(f"{module_name}.{name}")
    return names


# The API reference follows each module's __all__: a function added there gets its page
# without editing the docs. `settings` is an object, documented on docs/api.md itself.
API = {module_name: public_api(module_name) for module_name in gpusc.__all__ if module_name != "settings"}

# One stub page per function in docs/generated/ (ignored by git), written here rather than by
# autosummary_generate, which finds names only in the literal text of the pages. Start from
# none: a stub left from a function that was renamed or removed would be a page outside
# every toctree, which -W turns into an error.
GENERATED = Path(__file__).parent / "generated"
shutil.rmtree(GENERATED, ignore_errors=True)
GENERATED.mkdir()
for dotted in (name for names in API.values() for name in names):
    full_name = f"gpusc.{dotted}"
    parent, _, name = full_name.rpartition(".")
    obj = functools.reduce(getattr, dotted.split("."), gpusc)
    directive = "autoclass" if inspect.isclass(obj) else "autofunction"
    title = full_name.replace("_", r"\_")  # reST would read name_ as a link target
    (GENERATED / f"{full_name}.rst").write_text(
        f"{title}\n{'=' * len(title)}\n\n.. currentmodule:: {parent}\n\n.. {directive}:: {name}\n"
    )
autosummary_generate = False

# Signatures show the annotations; the docstrings' Parameters sections say the rest.
autodoc_typehints = "signature"
numpydoc_show_class_members = False
# Our docstrings' "Returns" sections are prose and key lists, not "name : type" pairs only.
numpydoc_validation_checks: set[str] = set()

# The stub pages above are reST; the pages MyST markdown.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
myst_enable_extensions = ["colon_fence"]
# Notebooks are rendered from their stored outputs; tests/test_notebooks.py executes
# them, `make notebooks` stores fresh outputs.
nb_execution_mode = "off"
nb_merge_streams = True

exclude_patterns = ["_build", "**.ipynb_checkpoints"]

html_theme = "sphinx_book_theme"
html_title = "gpusc"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "show_toc_level": 2,
}


# Our Returns sections start with prose ("None, or the new AnnData with copy=True. Sets:")
# and then list the keys written into the AnnData as "``obsm['X_umap']`` : dtype" entries.
# numpydoc reads every unindented line of the section as one entry, so a sentence that
# wraps over several lines would become several entries (and an inline literal that wraps
# would break): join such runs of lines into one before numpydoc parses the section.
def _join_returns_prose(app, what, name, obj, options, lines):
    def is_underline(line):
        return set(line.strip()) == {"-"}

    def is_prose(line):  # an unindented line that is not a "name : type" entry
        return bool(line.strip()) and not line[0].isspace() and " : " not in line and not is_underline(line)

    out, in_returns = [], False
    for i, line in enumerate(lines):
        is_header = i + 1 < len(lines) and is_underline(lines[i + 1])
        if is_header:
            in_returns = line.strip() in ("Returns", "Yields")
        elif in_returns and is_prose(line) and out and is_prose(out[-1]):
            out[-1] = f"{out[-1]} {line.strip()}"
            continue
        out.append(line)
    lines[:] = out


# numpydoc prints a return entry's name in bold, but our names are already literals (the
# keys written into the AnnData) and reST cannot nest a literal in bold: keep the literal.
def _unbold_literal_names(app, what, name, obj, options, lines):
    lines[:] = [re.sub(r"\*\*(``[^*]+?``)\*\*", r"\1", line) for line in lines]


class PublicAPI(Autosummary):
    """``.. gpusc-api:: pp``: the autosummary table of a module's public functions.

    Lists ``API`` for that module (its ``__all__``) and links the stub pages written above.
    Use it in reST (an eval-rst block in a MyST page: autosummary writes its table in reST)
    after ``.. currentmodule:: gpusc``.
    """

    required_arguments = 1
    has_content = False
    option_spec: ClassVar[dict] = {}

    def run(self):
        module_name = self.arguments[0]
        if module_name not in API:
            raise self.error(f"gpusc-api: {module_name!r} is not a public module of gpusc ({sorted(API)})")
        self.content = StringList(API[module_name], source="gpusc.__all__")
        self.options = {"toctree": "generated", "nosignatures": None}
        return super().run()


def setup(app):
    app.add_directive("gpusc-api", PublicAPI)
    app.connect("autodoc-process-docstring", _join_returns_prose, priority=400)  # before numpydoc (500)
    app.connect("autodoc-process-docstring", _unbold_literal_names, priority=600)  # after it
