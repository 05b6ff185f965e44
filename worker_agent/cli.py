"""Command line of the worker agent. Every option also reads an AGENT_*
environment variable."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
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
        try:
            cfg.token = Path(cfg.token_file).read_text().strip()
        except OSError as exc:
            raise StartupError(f"cannot read token file {cfg.token_file}: {exc.strerror}; check --token-file "
                               "(AGENT_TOKEN_FILE)") from None
    return cfg


async def run(cfg: AgentConfig) -> None:
    agent = Agent(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    log.info("agent %s (instance %s): pool %s, capacity %d, upstream %s (checked at %s), edges %s", cfg.agent_id,
             agent.instance, cfg.pool, cfg.capacity, cfg.upstream, cfg.health_path, ", ".join(cfg.edges))
    await agent.run()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        cfg = config_from_args(args)
        setup_logging(cfg.log_level)
        allocator.pin_mmap_threshold()  # keeps RSS flat under long TLS traffic
        loop.run(run(cfg), cfg.loop)
        return 0

    return run_main(body)
