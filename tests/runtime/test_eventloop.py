"""The event-loop choice of the edge and the agent."""

from __future__ import annotations

import asyncio

import pytest

from runtime import eventloop


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_choice_runs_the_standard_loop() -> None:
    assert eventloop.run(loop_module(), "asyncio").startswith("asyncio")


@pytest.mark.parametrize("choice", ["auto", "uvloop"])
def test_uvloop_is_used_when_installed(choice: str) -> None:
    pytest.importorskip("uvloop")
    assert eventloop.run(loop_module(), choice).startswith("uvloop")
