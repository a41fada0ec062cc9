"""The public face of the package (as httpx's ``tests/test_exported_members.py``) and the floor plan of
``flows/`` (``flows/README.md``): what users import is importable and documented, tests use public names
where one exists, and the flows' imports point one way, with no cycle."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FLOWS = REPO / "flows"
PUBLIC_MODULES = [
    "prefect_roboflow.blocks",
    "prefect_roboflow.blocks.tasks",
    "prefect_roboflow.blocks.images",
    "prefect_roboflow.blocks.exceptions",
    "prefect_roboflow.flows",
    "prefect_roboflow.flows.steps",
    "prefect_roboflow.flows.records",
    "prefect_roboflow.flows.vector_index",
]
PRIVATE_FOLDERS = ["_storage", "_video", "_steps", "_index", "_outputs", "_run", "_drift", "_curation"]
#: Which private folder may import which (flows/README.md); the public modules sit above them all.
MAY_IMPORT = {
    "_storage": set(),
    "_video": {"_storage"},
    "_steps": {"_video", "_storage"},
    "_index": {"_steps", "_storage"},
    "_outputs": {"_steps", "_video", "_storage"},
    "_run": {"_outputs", "_index", "_steps", "_video", "_storage", "vector_index"},
    "_drift": {"_outputs", "_index", "_steps", "_storage", "vector_index"},
    "_curation": {"_outputs", "_index", "_steps", "_storage", "vector_index"},
}


@pytest.mark.parametrize("module_name", ["prefect_roboflow.flows", "prefect_roboflow.flows.steps"])
def test_every_exported_name_is_importable_and_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__doc__, module_name
    exported = module.__all__
    assert len(set(exported)) == len(exported), "a name is exported twice"
    for name in exported:
        value = getattr(module, name)  # AttributeError: exported but missing
        if inspect.ismodule(value) or inspect.isclass(value) or callable(value):
            assert inspect.getdoc(value), f"{module_name}.{name} has no docstring"


#: What users of the blocks call, pinned: a name joins or leaves on purpose (internals such as
#: `ModelBlock` and `model_class` are private; `encode_array`, which the README tells users to call, is in).
BLOCKS_API = {
    "CLIP_DIMENSIONS", "PE_DIMENSIONS", "Box", "Clip", "ClipVersion", "EmbeddingModel", "InferenceServer",
    "OwlV2", "PerceptionEncoder", "PerceptionEncoderVersion", "ReferenceExample", "ResponseInfo",
    "encode_array", "record_responses", "InferenceError", "InferenceClientError", "InferenceConnectionError",
    "InferenceResponseError", "InferenceServerError", "InferenceStatusError", "InferenceTimeoutError",
    "InferenceTransportError", "InvalidImageError", "InvalidInputError", "ModelNotFoundError",
    "RateLimitedError", "ServerUnavailableError", "ServerUnreachableError",
}  # fmt: skip


def test_the_blocks_export_what_users_call_and_no_internals() -> None:
    blocks = importlib.import_module("prefect_roboflow.blocks")
    assert set(blocks.__all__) == BLOCKS_API
    assert len(blocks.__all__) == len(BLOCKS_API)
    for name in blocks.__all__:
        value = getattr(blocks, name)
        if inspect.isclass(value) or callable(value):
            assert inspect.getdoc(value), f"prefect_roboflow.blocks.{name} has no docstring"
    from prefect_roboflow.blocks import encode_array  # as the README writes it

    assert encode_array.__module__ == "prefect_roboflow.blocks.images"


def test_the_public_steps_take_public_types() -> None:
    from prefect_roboflow.blocks import EmbeddingModel
    from prefect_roboflow.flows import steps

    assert "EmbeddingModel" in importlib.import_module("prefect_roboflow.blocks").__all__
    hints = inspect.signature(steps.embed.fn).parameters["model"].annotation
    assert "EmbeddingModel" in str(hints)
    assert EmbeddingModel.__module__.startswith("prefect_roboflow.blocks")


def _public_names() -> set[str]:
    names: set[str] = set()
    for module_name in PUBLIC_MODULES:
        names |= set(getattr(importlib.import_module(module_name), "__all__", ()))
    return names


def test_no_test_imports_a_private_module_for_what_a_public_name_offers() -> None:
    public = _public_names()
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prefect_roboflow"):
                private = any(part.startswith("_") for part in node.module.split("."))
                for alias in node.names:
                    if private and alias.name in public:
                        offenders.append(f"{path.relative_to(REPO)}: {alias.name} from {node.module}")
    assert offenders == []


def _flows_imports() -> dict[str, set[str]]:
    """Each flows module (dotted, under flows/) → the flows modules it imports, at module level or lazily."""
    modules = {}
    for path in FLOWS.rglob("*.py"):
        parts = list(path.relative_to(FLOWS).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in modules.items():
        here = name.split(".") if name else []
        base = here if is_pkg else here[:-1]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    root = base[: len(base) - (node.level - 1)]
                    mod = ".".join(root + ([node.module] if node.module else []))
                elif node.module and node.module.startswith("prefect_roboflow.flows"):
                    mod = node.module.removeprefix("prefect_roboflow.flows").lstrip(".")
                else:
                    continue
                targets = [mod] + [f"{mod}.{a.name}".lstrip(".") for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [
                    a.name.removeprefix("prefect_roboflow.flows").lstrip(".")
                    for a in node.names
                    if a.name.startswith("prefect_roboflow.flows")
                ]
            found |= {target for target in targets if target in modules and target not in {name, ""}}
        graph[name] = found
    return graph


def test_the_flows_imports_have_no_cycle() -> None:
    # a module importing its own package's __init__ (a sibling through `from . import x`) is no cycle
    graph = {m: {t for t in deps if not m.startswith(t + ".")} for m, deps in _flows_imports().items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_private_folders_import_only_downwards() -> None:
    wrong = []
    for module, deps in _flows_imports().items():
        folder = module.split(".")[0]
        if folder not in MAY_IMPORT:
            continue
        for dep in deps:
            top = dep.split(".")[0]
            if top != folder and top not in MAY_IMPORT[folder] and top not in {"records"}:
                wrong.append(f"{module} imports {dep}")
    assert wrong == []


def test_only_public_modules_at_the_top_of_flows() -> None:
    top = sorted(p.stem for p in FLOWS.glob("*.py") if p.stem != "__init__")
    assert [name for name in top if name.startswith("_")] == []
    packages = sorted(p.name for p in FLOWS.iterdir() if (p / "__init__.py").exists())
    assert packages == sorted(PRIVATE_FOLDERS)


def test_one_place_per_concept() -> None:
    """One image-suffix list, one image-size reader, one orientation rule, one JPEG quality, one
    run-name builder, one normalise — each defined once in the package."""
    sources = {p: p.read_text() for p in [*FLOWS.rglob("*.py"), *(REPO / "blocks").rglob("*.py")]}

    def defined(pattern: str) -> list[str]:
        return sorted(str(p.relative_to(REPO)) for p, text in sources.items() if pattern in text)

    assert defined('".tiff"') == ["flows/_storage/listing.py"]
    assert defined("def image_size(") == ["blocks/images.py"]
    assert defined("def upright(") == ["blocks/images.py"]  # photos turned in one place, as the server does
    assert defined("exif_transpose") == [] and defined(".getexif()") == ["blocks/images.py"]
    assert defined("JPEG_QUALITY = ") == ["blocks/images.py"]
    assert defined("quality=95") == []
    assert defined("def run_name(") == ["blocks/tasks.py"]
    assert defined("def normalise(") == ["flows/_steps/vectors.py"]
    assert defined("def looks_like_image(") == ["flows/_storage/listing.py"]


def test_only_the_storage_layer_renames_files_or_resolves_fsspec_urls() -> None:
    """Every atomic publish and every fsspec location goes through `flows/_storage/`."""
    pattern = re.compile(r"url_to_fs|os\.replace|os\.rename")
    outside = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sorted(FLOWS.rglob("*.py"))
        if "_storage" not in path.relative_to(FLOWS).parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert outside == []


def test_only_the_index_touches_an_index_s_private_parts() -> None:
    pattern = re.compile(r"\b_OpenIndex\b|\b_Manifest\b|\b_Store\b|\bindex\._[a-z]")
    outside = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sorted(FLOWS.rglob("*.py"))
        if path.relative_to(FLOWS).parts[0] not in {"_index", "vector_index.py"}
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert outside == []
