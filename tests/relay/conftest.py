from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import Pki, System, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def system(pki: Pki, tmp_path: Path) -> AsyncIterator[System]:
    s = System(pki, tmp_path)
    try:
        yield s
    finally:
        await s.close()
