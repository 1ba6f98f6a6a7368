"""One vLLM engine in its own process, driven by JSON lines: the unit of the vLLM tests and
benchmarks (an engine takes a minute or two to start on two cores, so each process serves many
requests).

    python Benchmarks/vllm/engine.py --model DIR [--kvtier-socket PATH] [--extra-config JSON]

Without ``--kvtier-socket`` the engine is plain vLLM. It prints ``{"ready": ...}`` once the
engine is up, then answers each line on stdin:

    {"op": "generate", "prompt": [token ids], "max_tokens": 16}
      -> {"tokens": [...], "seconds": 1.23, "cached": 1792}
    {"op": "quit"}

``cached`` is vLLM's ``num_cached_tokens`` for the request: local prefix-cache hits plus tokens
the connector loaded. Greedy decoding (temperature 0). vLLM's own logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--kvtier-socket", default=None, help="use KVTierConnector with this kvtierd socket")
    parser.add_argument("--extra-config", default="{}", help="more kv_connector_extra_config keys, as JSON")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--no-prefix-caching", action="store_true", help="turn off vLLM's own prefix cache")
    args = parser.parse_args()

    # The engine's output protocol is stdout; everything vLLM prints goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU build

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kv = None
    if args.kvtier_socket:
        extra = {"socket": args.kvtier_socket, **json.loads(args.extra_config)}
        kv = KVTransferConfig(kv_connector="KVTierConnector", kv_connector_module_path="kvtier.vllm",
                              kv_role="kv_both", kv_connector_extra_config=extra)
    started = time.perf_counter()
    llm = LLM(model=args.model, dtype="bfloat16", max_model_len=args.max_model_len, enforce_eager=True,
              enable_prefix_caching=not args.no_prefix_caching, kv_transfer_config=kv, seed=0)
    protocol.write(json.dumps({"ready": True, "start_seconds": round(time.perf_counter() - started, 1)}) + "\n")

    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        if request.get("op") != "generate":
            protocol.write(json.dumps({"error": f"unknown op {request.get('op')!r}"}) + "\n")
            continue
        params = SamplingParams(temperature=0.0, max_tokens=int(request.get("max_tokens", 16)), ignore_eos=True)
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": request["prompt"]}], params, use_tqdm=False)[0]
        seconds = time.perf_counter() - t0
        protocol.write(json.dumps({"tokens": list(out.outputs[0].token_ids), "seconds": seconds,
                                   "cached": out.num_cached_tokens or 0}) + "\n")
    del llm
    return 0


if __name__ == "__main__":
    sys.exit(main())
