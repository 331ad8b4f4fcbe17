"""MQTT topic names of ARCHITECTURE §5.3 (topic root `emsfl/v1`)."""

from __future__ import annotations

ROOT = "emsfl/v1"
CLOCK = f"{ROOT}/clock"
ORBIT_STATUS = f"{ROOT}/orbit/status"
ORBIT_CMD = f"{ROOT}/orbit/cmd"
ORBIT_CMD_REPLY = f"{ROOT}/orbit/cmd/reply"
ORBIT_SATELLITES = f"{ROOT}/orbit/satellites"  # sub-satellite points for displays


def link(cluster: str) -> str:
    return f"{ROOT}/link/{cluster}"


def contacts(cluster: str) -> str:
    return f"{ROOT}/contacts/{cluster}"


def node_status(role: str, node_id: str) -> str:
    return f"{ROOT}/node/{role}/{node_id}/status"


def cluster_of_link_topic(topic: str) -> str | None:
    """The cluster id of an `emsfl/v1/link/<cluster>` topic, else None."""
    prefix = f"{ROOT}/link/"
    if topic.startswith(prefix) and "/" not in topic[len(prefix) :]:
        return topic[len(prefix) :]
    return None
