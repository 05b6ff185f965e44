"""Self-contained HTML report (placeholder)."""
from typing import Any


def render(res: dict[str, Any], run: Any) -> str:
    return "<html></html>"
