"""Command line of the worker agent. Every option also reads an AGENT_*
environment variable."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import stat
from pathlib import Path

from runtime import allocator, settings
from runtime import eventloop as loop
from runtime.cli import StartupError, run_main, setup_logging

from .agent import Agent
from .config import AgentConfig

log = logging.getLogger("worker_agent")
ENV_PREFIX = "AGENT"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="worker-agent",
                                description="Dial out to the edge(s) and serve their requests from a local upstream. "
                                            "Every option also reads the environment variable named in its help; a "
                                            "flag beats the variable.")
    settings.add_arguments(p, AgentConfig, ENV_PREFIX)
    return p


def config_from_args(a: argparse.Namespace) -> AgentConfig:
    try:
        cfg = settings.resolve(AgentConfig, ENV_PREFIX, a)
    except settings.SettingError as exc:
        raise StartupError(str(exc)) from None
    if cfg.token_file:
        flag = "--token-file" if getattr(a, "token_file", None) is not None else "AGENT_TOKEN_FILE"
        try:
            cfg.token = Path(cfg.token_file).read_text().strip()
        except OSError as exc:
            raise StartupError(f"cannot read token file {cfg.token_file}: {exc.strerror}; check {flag}") from None
        cfg.token_source = f"{flag} {cfg.token_file}"
    else:
        cfg.token_source = "--token" if getattr(a, "token", None) is not None else "AGENT_TOKEN"
    return cfg


def warn_if_world_readable(path: str | None) -> None:
    """The token is a secret: group-readable is a deployment choice (the
    systemd units share it with group edge-worker), readable by everyone is not."""
    if not path:
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        log.warning("token file %s is readable by every user on this machine (mode %o); run `chmod 600 %s` "
                    "(or 640 with a group of its own)", path, mode & 0o777, path)


async def run(cfg: AgentConfig) -> None:
    warn_if_world_readable(cfg.token_file)
    agent = Agent(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    log.info("agent %s (instance %s): pool %s, capacity %d, upstream %s (checked at %s), edges %s", cfg.agent_id,
             agent.instance, cfg.pool, cfg.capacity, cfg.upstream, cfg.health_path, ", ".join(cfg.edges))
    await agent.run()
    if agent.fatal is not None:
        raise StartupError(agent.fatal)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        cfg = config_from_args(args)
        setup_logging(cfg.log_level)
        allocator.pin_mmap_threshold()  # keeps RSS flat under long TLS traffic
        loop.run(run(cfg), cfg.loop)
        return 0

    return run_main(body)
