"""An agent whose worker token the edge refuses: it backs off, says which
option the token came from, and gives up at --max-auth-failures (issue 19)."""

from __future__ import annotations

from pathlib import Path

from tests.harness import System, wait_for


async def test_agent_with_a_refused_token_file_names_it_warns_it_is_world_readable_and_gives_up(
        system: System, tmp_path: Path) -> None:
    _, up = await system.upstream()
    _, edge = await system.edge()
    token = tmp_path / "token"
    token.write_text("ewt_not-a-token-the-edge-knows\n")
    token.chmod(0o644)
    agent = system.agent("w-bad", edge, up, "--token-file", str(token), "--max-auth-failures", "3")

    async def exited() -> bool:
        return not agent.alive()

    took = await wait_for(exited, 30, lambda: "the agent to give up\n" + agent.log())
    log = agent.log()
    assert agent.p.returncode == 2, log
    assert f"--token-file {token}" in log and "--token /" not in log  # the option actually used
    assert "readable by every user" in log and "chmod 600" in log
    assert "giving up after --max-auth-failures 3" in log and log.count("HTTP 401") == 4  # logged at attempts 1 and 2; the 3rd: logged, then `error:`
    assert "Traceback" not in log
    assert took >= 1.5  # waited (0.5-1 s, then 1-2 s) between attempts, not a tight loop
