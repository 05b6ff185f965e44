"""How the server gives out the machine's cores: decode threads (image
decoding and preprocessing, one image per thread) and the inference engine's
own threads (onnxruntime intra/inter-op pools and whether they spin while
idle, TensorFlow's intra/inter-op pools, OpenCV's thread count).

`thread_plan(cores, settings)` is the decision, a pure function; `apply_*`
hand it to an engine. The defaults come from measurements on a 2-core
machine (docs/inference.md, "Threads"): one decode thread per 4 cores (at
least 1), every core for the forward pass, and onnxruntime's spinning off
whenever decode threads share the forward pass's cores, because an idle
spinning thread burns the core a decode thread needs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from runtime.settings import option

log = logging.getLogger("inference")

SPINNING = ("auto", "on", "off")
GROUP = "Threads"


@dataclass(frozen=True)
class ThreadSettings:
    """What the operator asked for; 0 and "auto" mean: derive from the cores."""
    decode_threads: int = option(0, group=GROUP, help="threads decoding and preprocessing uploads (serve); 0: one "
                                                      "per 4 usable cores, at least 1")
    inference_threads: int = option(0, group=GROUP, help="threads of one forward pass (onnxruntime intra-op, "
                                                         "TensorFlow intra-op, OpenCV); 0: every usable core")
    inter_op_threads: int = option(1, group=GROUP, help="onnxruntime/TensorFlow threads running independent graph "
                                                        "nodes side by side")
    spinning: str = option("auto", group=GROUP, choices=SPINNING,
                           help="onnxruntime's idle threads spin for work; auto: off when decode threads share the "
                                "inference cores")

    def __post_init__(self) -> None:
        if self.decode_threads < 0 or self.inference_threads < 0:
            raise ValueError("--decode-threads and --inference-threads must be 0 (auto) or more")
        if self.inter_op_threads < 1:
            raise ValueError("--inter-op-threads must be at least 1")
        if self.spinning not in SPINNING:
            raise ValueError(f"--spinning must be one of {', '.join(SPINNING)}, not {self.spinning!r}")


@dataclass(frozen=True)
class ThreadPlan:
    cores: int
    decode: int
    intra_op: int
    inter_op: int
    spinning: bool
    why: str

    def describe(self) -> str:
        return (f"threads: {self.cores} cores; {self.decode} decode, {self.intra_op} inference (intra-op), "
                f"{self.inter_op} inter-op, spinning {'on' if self.spinning else 'off'} ({self.why})")


def thread_plan(cores: int, settings: ThreadSettings) -> ThreadPlan:
    cores = max(1, cores)
    decode = settings.decode_threads or max(1, cores // 4)
    intra = settings.inference_threads or cores
    shared = decode + intra > cores
    if settings.spinning == "auto":
        spinning = not shared and intra > 1
        why = ("decode threads share the inference cores, so spinning is off" if shared
               else "inference has its cores to itself, so it may spin" if spinning
               else "one inference thread, nothing to spin")
    else:
        spinning = settings.spinning == "on"
        why = f"spinning forced {settings.spinning}"
    return ThreadPlan(cores, decode, intra, settings.inter_op_threads, spinning, why)


def usable_cores() -> int:
    """The cores this process may run on (taskset, cgroup cpusets), not the
    machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def onnxruntime_options(plan: ThreadPlan) -> Any:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = plan.intra_op
    so.inter_op_num_threads = plan.inter_op
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if plan.spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if plan.spinning else "0")
    return so


def apply_tensorflow(plan: ThreadPlan) -> None:
    """Must run before TensorFlow executes its first op; later it cannot
    change, which is said in the log rather than ignored."""
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(plan.intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(plan.inter_op)
    except RuntimeError as exc:
        log.warning("TensorFlow was already running; its thread counts stay as they were (%s)", exc)


def apply_opencv(plan: ThreadPlan) -> None:
    import cv2
    cv2.setNumThreads(plan.intra_op)
