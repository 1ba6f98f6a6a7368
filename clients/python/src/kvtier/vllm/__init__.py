"""KVTier for vLLM: ``KVTierConnector``, a vLLM v1 KV connector over kvtierd.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"socket": "/run/kvtier/kvtierd.sock"}}'

Needs vLLM (``pip install ./clients/python[vllm]``); docs/integrations/vllm.md has the details.
The connector is imported on first use, so ``kvtier.vllm._layout`` (torch only) loads without vLLM.
"""

__all__ = ["ConnectorSettings", "KVTierConnector"]


def __getattr__(name):
    if name in __all__:
        from . import connector

        return getattr(connector, name)
    raise AttributeError(f"module 'kvtier.vllm' has no attribute {name!r}")
