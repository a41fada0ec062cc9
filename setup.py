"""Which packages the distribution holds: see pyproject.toml (setuptools reads it) for the rest.

The design keeps ``blocks/`` and ``flows/`` at the top of the repository; they install as
``prefect_roboflow.blocks`` and ``prefect_roboflow.flows`` with every subpackage found here (no
hand-kept list), and ``_package/`` is the package's own top (``__version__``, ``py.typed``).
Package data is every file git tracks under those folders (``MANIFEST.in``).
"""

from setuptools import find_packages, setup

TOPS = {"blocks": "blocks", "flows": "flows"}
packages = ["prefect_roboflow"] + [
    f"prefect_roboflow.{name}" for top in TOPS for name in find_packages(include=[top, f"{top}.*"])
]
setup(
    packages=packages,
    package_dir={"prefect_roboflow": "_package", **{f"prefect_roboflow.{top}": path for top, path in TOPS.items()}},
)
