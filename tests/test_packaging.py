"""What a non-editable install ships: every folder of the package is listed in pyproject.

An editable install (what `make test` uses) finds any folder in the source tree, so a
subpackage missing from `[tool.setuptools] packages` would only break a real `pip install`.
"""

from __future__ import annotations

import pytest
from repo_helpers import REPO_ROOT

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")


def _folders(name: str, root):
    for folder in [root, *root.rglob("*")]:
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.iterdir()):
            yield ".".join((name, *folder.relative_to(root).parts))


def test_every_folder_of_the_package_is_shipped():
    settings = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        package
        for name, folder in settings["package-dir"].items()
        for package in _folders(name, REPO_ROOT / folder)
    }
    missing = found - set(settings["packages"])
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
