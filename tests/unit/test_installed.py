"""The suite tests the package as users install it (``scripts/test.sh`` builds the wheel and installs
it, not editable, into a fresh virtualenv), and that wheel holds the whole source tree.

Run under an editable install these fail on purpose: the suite would then test the source tree,
which no user gets.
"""

from __future__ import annotations

import importlib.metadata
import sysconfig
from pathlib import Path, PurePosixPath

import prefect_roboflow

REPO = Path(__file__).resolve().parents[2]
#: Where each folder of the source tree goes in the installed package.
SOURCE_FOLDERS = {
    "_package": "prefect_roboflow",
    "blocks": "prefect_roboflow/blocks",
    "flows": "prefect_roboflow/flows",
}
#: Source files that stay out of the wheel: the floor plan (a document for readers of the repo).
NOT_SHIPPED = {"prefect_roboflow/flows/README.md"}


def _installed_files() -> set[str]:
    files = importlib.metadata.files("prefect-roboflow") or []
    return {
        str(PurePosixPath(f)) for f in files if str(f).startswith("prefect_roboflow/") and "__pycache__" not in str(f)
    }


def _source_files() -> set[str]:
    """Every file of the package folders that a build takes (what git would track: no caches)."""
    found = set()
    for folder, target in SOURCE_FOLDERS.items():
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in {".pyc", ".pyo"}:
                found.add(f"{target}/{path.relative_to(REPO / folder).as_posix()}")
    return found - NOT_SHIPPED


def test_prefect_roboflow_is_imported_from_site_packages() -> None:
    location = Path(prefect_roboflow.__file__).resolve()
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert location.is_relative_to(site_packages), (
        f"prefect_roboflow was imported from {location}, not from {site_packages}: run the suite through "
        "scripts/test.sh, which installs the built wheel"
    )


def test_the_installed_wheel_holds_every_module_and_data_file_of_the_source_tree() -> None:
    installed, source = _installed_files(), _source_files()
    assert {f for f in source if f.endswith(".py")} <= installed, "modules missing from the wheel"
    assert source - installed == set(), "files of the source tree missing from the wheel"
    assert installed - source == set(), "files in the wheel that the source tree does not have"
    # what users rely on, named: the floor plan's private folders, package data, the typing marker
    for name in ("flows/_video/track.py", "flows/_drift/methods.py", "blocks/_data/bpe_simple_vocab_16e6.txt.gz"):
        assert f"prefect_roboflow/{name}" in installed
    assert "prefect_roboflow/py.typed" in installed


def test_the_version_is_the_distributions() -> None:
    assert prefect_roboflow.__version__ == importlib.metadata.version("prefect-roboflow")
    from prefect_roboflow import blocks

    assert blocks.__version__ == prefect_roboflow.__version__
