"""Python client for kvtierd, the KVTier KV-cache offload daemon.

    import kvtier
    model = kvtier.ModelSpec("llama-3.1-8b", layers=32, kv_heads=8, head_dim=128, dtype="bfloat16")
    with kvtier.Client() as kv:
        cached = kv.lookup(model, tokens)
        kv.put(model, tokens, keys, values)
        keys, values = kv.get(model, tokens)
"""

from ._wire import EvictResult, Extent, PageInfo, RegisteredModel, SessionEntry, SessionInfo
from .client import Client, LookupResult, PageLease, PutResult
from .errors import KVTierConnectionError, KVTierError, ProtocolViolation
from .model import ModelShape, ModelSpec
from .paths import NoDefaultPath, default_socket_path, default_state_dir
from .prefix import PrefixCache

__version__ = "0.1.0"

__all__ = [
    "Client",
    "EvictResult",
    "Extent",
    "KVTierConnectionError",
    "KVTierError",
    "LookupResult",
    "ModelShape",
    "ModelSpec",
    "PageInfo",
    "PageLease",
    "PrefixCache",
    "ProtocolViolation",
    "PutResult",
    "RegisteredModel",
    "SessionEntry",
    "SessionInfo",
    "NoDefaultPath",
    "default_socket_path",
    "default_state_dir",
]
