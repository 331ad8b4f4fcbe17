"""Durable, versioned state of the satellite node (ARCHITECTURE §5.5): `Store` and the rows it hands out."""

from satellite_node.store.integrity import IntegrityError
from satellite_node.store.partial import ChunkWriter
from satellite_node.store.rows import (
    AffinityRow,
    AssignmentRecord,
    ClusterRow,
    ExpertVersionRow,
    RoundUpload,
    UploadRow,
)
from satellite_node.store.schema import DB_FILE
from satellite_node.store.state import Store

__all__ = [
    "DB_FILE",
    "AffinityRow",
    "AssignmentRecord",
    "ChunkWriter",
    "ClusterRow",
    "ExpertVersionRow",
    "IntegrityError",
    "RoundUpload",
    "Store",
    "UploadRow",
]
