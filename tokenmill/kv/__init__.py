from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.manager import KVCacheManager

__all__ = ["BlockPool", "KVCacheManager"]
