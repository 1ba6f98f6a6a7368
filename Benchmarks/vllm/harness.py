"""Drives ``engine.py`` processes: the shared part of the vLLM tests and benchmarks.

``vllm_python()`` is the interpreter that has vLLM (``$KVTIER_VLLM_PYTHON``, made by
``Benchmarks/vllm/setup-venv``); ``prepared_model(python)`` the SmolLM2 folder (or ``Unavailable``
with the reason); ``EngineProcess`` one engine, started in the background so that several can
load at once.
"""

from __future__ import annotations

import json
import os
import random
import select
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CLIENT_SRC = REPO / "clients" / "python" / "src"

# An engine loads in 1-2.5 minutes on two busy cores; only a stuck one takes this long.
START_DEADLINE_SECONDS = 900
# A request of a few thousand tokens takes seconds to tens of seconds on two cores.
REQUEST_DEADLINE_SECONDS = 600


class Unavailable(Exception):
    """vLLM or the model is not available here; the message says why."""


def vllm_python() -> str:
    python = os.environ.get("KVTIER_VLLM_PYTHON")
    if not python:
        raise Unavailable("KVTIER_VLLM_PYTHON is not set (Benchmarks/vllm/setup-venv makes a venv with vLLM and prints it)")
    if not os.access(python, os.X_OK):
        raise Unavailable(f"KVTIER_VLLM_PYTHON={python} is not an executable")
    return python


def prepared_model(python: str) -> str:
    """The SmolLM2 folder, prepared by ``python`` (which has transformers and gguf) on first use."""
    run = subprocess.run([python, str(HERE / "smollm2.py")], capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        raise Unavailable(f"SmolLM2 cannot be prepared: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
    return run.stdout.strip().splitlines()[-1]


def prompt(n: int, seed: int) -> List[int]:
    """``n`` random token ids of SmolLM2's vocabulary (49,152), the same for the same seed: for
    timing, where the text does not matter."""
    rng = random.Random(seed)
    return [rng.randrange(300, 49000) for _ in range(n)]


def text_tokens(python: str, model: str) -> List[int]:
    """This repository's docs/*.md, in name order, as SmolLM2 tokens (about 60,000): real text,
    on which greedy decoding is confident, for the tests that compare tokens between engines
    (random ids make near-ties that any change of summation order can flip)."""
    code = ("import json, sys; from transformers import AutoTokenizer; "
            "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "print(json.dumps(t.encode(sys.stdin.read(), add_special_tokens=False)))")
    text = "\n\n".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))
    run = subprocess.run([python, "-c", code, model], input=text, capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        raise RuntimeError(f"tokenizing the docs failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout)


class EngineProcess:
    """One ``engine.py`` process. ``socket`` None: plain vLLM; else the KVTier connector on it."""

    def __init__(self, python: str, model: str, socket: Optional[str] = None, *, extra_config: Optional[dict] = None,
                 name: str = "engine", log_dir: Optional[str] = None, prefix_caching: bool = True):
        self.name = name
        self.log_path = os.path.join(log_dir or tempfile.gettempdir(), f"vllm-{name}-{os.getpid()}.log")
        self.log = open(self.log_path, "w")
        argv = [python, str(HERE / "engine.py"), "--model", model]
        if socket:
            argv += ["--kvtier-socket", socket, "--extra-config", json.dumps(extra_config or {})]
        if not prefix_caching:
            argv.append("--no-prefix-caching")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(CLIENT_SRC), os.environ.get("PYTHONPATH")])))
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        # vLLM's CPU build reserves one more core for any KV connector, so on a small machine an
        # engine with a connector would run another number of OpenMP threads than one without,
        # and sum in another order. The same reservation for every engine keeps them comparable.
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.start_seconds: Optional[float] = None

    def _line(self, deadline_seconds: float, what: str) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], deadline_seconds)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.kill()
            raise RuntimeError(f"{self.name}: no answer ({what}) within {deadline_seconds:.0f} s or the engine died; "
                               f"log tail:\n{self.log_tail()}")
        return json.loads(line)

    def wait_ready(self) -> "EngineProcess":
        if self.start_seconds is None:
            self.start_seconds = self._line(START_DEADLINE_SECONDS, "start")["start_seconds"]
        return self

    def generate(self, tokens: List[int], max_tokens: int = 16) -> dict:
        """``{"tokens", "seconds", "cached"}`` of one greedy request."""
        self.wait_ready()
        self.proc.stdin.write(json.dumps({"op": "generate", "prompt": tokens, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        reply = self._line(REQUEST_DEADLINE_SECONDS, "generate")
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {reply['error']}")
        return reply

    def log_tail(self, chars: int = 6000) -> str:
        self.log.flush()
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log_tail(1 << 30)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(120)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.kill()
        self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
