"""The JSON answers of the inference server: a classification (shared by
`POST /photo` and `GET /stream`), its Server-Timing, and errors in the one
shape every hop uses (`httpcontract.problem`), with the seed's
`"message": "error"` kept beside it for the seed's clients."""

from __future__ import annotations

from typing import Any

import numpy as np
from aiohttp import web

from httpcontract import problem
from httpcontract.timing import entries

from .models import Classifier

CODES = {400: "bad_image", 404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type",
         500: "internal_error", 503: "busy"}


def error(status: int, reason: str, headers: dict[str, str] | None = None, code: str | None = None,
          request_id: str | None = None) -> web.Response:
    body = problem.encode(status, code or CODES.get(status, "error"), reason, request_id, message="error")
    return web.Response(body=body, status=status, headers=headers, content_type=problem.CONTENT_TYPE)


def classification(clf: Classifier, probs: np.ndarray[Any, Any]) -> dict[str, Any]:
    """label, class_id, confidence and top5 of one image's probabilities."""
    top = np.argsort(-probs)[:5]
    class_id = int(top[0])
    return {
        "label": clf.label(class_id),
        "class_id": class_id,
        "confidence": round(float(probs[class_id]), 6),
        "top5": [{"label": clf.label(int(i)), "class_id": int(i), "probability": round(float(probs[i]), 6)}
                 for i in top],
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}".rstrip("0").rstrip(".") or "0"


def server_timing(phases: list[tuple[str, float]]) -> str:
    """The Server-Timing value of an answer: (phase, seconds) in order."""
    return entries(phases)
