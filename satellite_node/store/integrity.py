"""`Store.check_integrity`: proof that the state is what a crash-safe store can have."""

from __future__ import annotations

import json
from pathlib import Path

from protos.wire import sha256_hex
from satellite_node.manifest import file_sha256
from satellite_node.store.partial import PartialUploads


class IntegrityError(AssertionError):
    """`Store.check_integrity` found state that a crash-safe store can never have."""


def check_integrity(store: PartialUploads, live: set[str], keep_versions: int | None) -> None:
    """Raise `IntegrityError` unless the state is what a crash-safe store can have.

    Every blob in `live` (those the database refers to: expert versions, FedAvg round buffers, kept commits)
    exists and hashes to its name; every expert version's blob carries that expert; no blob, chunk folder or chunk
    record is orphaned; every recorded chunk of an upload in flight is on disk with its hash; versions count up
    from 1 (unless `keep_versions` prunes them).
    """
    problems: list[str] = []
    on_disk = {p.name.removesuffix(".safetensors") for p in store.blobs.glob("*.safetensors")}
    for h in sorted(live - on_disk):
        problems.append(f"blob {h[:16]} is recorded but missing")
    for h in sorted(on_disk - live):
        problems.append(f"blob {h[:16]} is on disk but referenced by nothing")
    for h in sorted(live & on_disk):
        if file_sha256(store.blob_path(h)) != h:
            problems.append(f"blob {h[:16]} does not hash to its name")
    for layer, expert, version, source in store._rows(
        "SELECT layer, expert, version, source_hash FROM expert_versions"
    ):
        if source in on_disk:
            names = safetensors_names(store.blob_path(source))
            if not any(n.startswith(f"expert/{layer}/{expert}/") for n in names):
                problems.append(f"expert/{layer}/{expert} v{version}: blob {source[:16]} lacks its tensors")
    for layer, expert, count, top in store._rows(
        "SELECT layer, expert, COUNT(*), MAX(version) FROM expert_versions GROUP BY layer, expert"
    ):
        if keep_versions is None and int(count) != int(top):
            problems.append(f"expert/{layer}/{expert}: versions are not 1..{top}")
    uploads = {r[0] for r in store._rows("SELECT content_hash FROM uploads")}
    committed = {r[0] for r in store._rows("SELECT content_hash FROM commits")}
    for h in sorted(uploads & committed):
        problems.append(f"upload {h[:16]} is both in flight and committed")
    for h, idx in store._rows("SELECT content_hash, idx FROM upload_chunks"):
        row = store.get_upload(h)
        if row is None:
            problems.append(f"chunk {idx} of {h[:16]} belongs to no upload")
            continue
        data = store.read_chunk(row, int(idx))
        if data is None or sha256_hex(data) != row.chunk_hashes[int(idx)]:
            problems.append(f"chunk {idx} of {h[:16]} is recorded but not on disk intact")
    for folder in store.partial.iterdir():
        if folder.name not in uploads:
            problems.append(f"partial/{folder.name} belongs to no upload")
    for folder in (store.blobs, store.partial):
        for tmp in folder.rglob(".*.tmp"):
            problems.append(f"temporary file {tmp.relative_to(store.dir)} left behind")
    if problems:
        raise IntegrityError("; ".join(problems))


def safetensors_names(path: Path) -> list[str]:
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            return []
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(handle.read(min(n, 100 << 20)))
        except ValueError:
            return []
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
