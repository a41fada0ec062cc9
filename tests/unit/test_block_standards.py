"""Every block of the package meets Prefect's block standards and registers."""

from __future__ import annotations

import subprocess
import sys
from abc import ABC

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from prefect.utilities.dispatch import get_registry_for_type
from prefect.utilities.importtools import to_qualified_name

import prefect_roboflow.blocks as package

BLOCKS = sorted(
    (
        b
        for b in get_registry_for_type(Block).values()
        # Interfaces (ABC among the direct bases, as Prefect tells them) are not registered blocks.
        if to_qualified_name(b).startswith("prefect_roboflow") and ABC not in b.__bases__
    ),
    key=lambda b: b.__name__,
)


def test_the_four_blocks_are_found() -> None:
    assert [b.__name__ for b in BLOCKS] == ["Clip", "InferenceServer", "OwlV2", "PerceptionEncoder"]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.__name__)
class TestAllBlocksAdhereToStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self, block: type[Block]) -> type[Block]:
        return block

    def test_has_a_valid_image(self, block: type[Block]) -> None:
        # The standard check downloads the logo; CI has no network, so check the URL's form.
        assert str(block._logo_url).startswith("https://")


def test_exported_members_match_all() -> None:
    public = {name for name in dir(package) if not name.startswith("_")}
    modules = {"clip", "exceptions", "images", "owlv2", "perception_encoder", "server", "tasks"}
    assert public - modules == set(package.__all__)


def test_top_level_import_stays_light() -> None:
    code = (
        "import sys, prefect_roboflow.blocks as b; "
        "heavy = [m for m in ('numpy', 'PIL', 'supervision', 'cv2', 'pandas') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def test_blocks_save_and_load_with_nested_server() -> None:
    from pydantic import SecretStr

    from prefect_roboflow.blocks import Clip, InferenceServer

    server = InferenceServer(api_url="http://127.0.0.1:9001", api_key=SecretStr("k-123"), max_concurrency=4)
    await Clip(server=server, version="ViT-B-32").save("test-clip", overwrite=True)
    loaded = await Clip.load("test-clip")
    assert loaded.version == "ViT-B-32"
    assert loaded.server.max_concurrency == 4
    assert loaded.server.api_key is not None and loaded.server.api_key.get_secret_value() == "k-123"


async def test_prefect_block_register_cli_registers_all_blocks() -> None:
    import os

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    prefect_cli = [sys.executable, "-m", "prefect", "block", "register", "-m", "prefect_roboflow.blocks"]
    done = subprocess.run(prefect_cli, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    async with get_client() as client:
        slugs = {t.slug for t in await client.read_block_types()}
    assert {"roboflow-inference-server", "roboflow-clip", "roboflow-perception-encoder", "roboflow-owlv2"} <= slugs
