"""Sharded datasets: WebDataset tars + DALI indices + a manifest per split (see docs/DESIGN.md)."""

from scp_dist.shards.manifest import Manifest, ShardError, ShardInfo, read_manifest
from scp_dist.shards.writer import Sample, write_shards

__all__ = ["Manifest", "Sample", "ShardError", "ShardInfo", "read_manifest", "write_shards"]
