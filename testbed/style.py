"""One look for every figure: method names as in the literature and the Okabe–Ito colour-blind-safe palette.

Each strategy and each cluster keeps its colour in every figure of a run and of an experiment
(Okabe & Ito, "Color Universal Design", 2008; also safe in greyscale print for the strategies).
"""

from __future__ import annotations

OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}

METHOD_NAMES = {"emsfl": "EMS-FL", "fedavg": "FedAvg", "fedasync": "FedAsync", "centralised": "Centralised"}
METHOD_COLOURS = {
    "emsfl": OKABE_ITO["vermillion"],
    "fedavg": OKABE_ITO["blue"],
    "fedasync": OKABE_ITO["bluish_green"],
    "centralised": OKABE_ITO["black"],
}
# Clusters in their topology order; distinct from each other, not from the strategies (never in one figure).
CLUSTER_COLOURS = (
    OKABE_ITO["orange"],
    OKABE_ITO["sky_blue"],
    OKABE_ITO["reddish_purple"],
    OKABE_ITO["bluish_green"],
    OKABE_ITO["yellow"],
    OKABE_ITO["blue"],
    OKABE_ITO["vermillion"],
)
UNASSIGNED = "#DDDDDD"  # an expert without an owner, a missing value
PNG_DPI = 300
FIGURE_FORMATS = ("pdf", "png")


def method_name(strategy: str) -> str:
    """`emsfl` -> `EMS-FL`; an unknown name is shown as given."""
    return METHOD_NAMES.get(strategy, strategy)


def method_colour(strategy: str, index: int = 0) -> str:
    return METHOD_COLOURS.get(strategy, CLUSTER_COLOURS[index % len(CLUSTER_COLOURS)])


def cluster_colour(index: int) -> str:
    """The colour of the cluster at `index` in the topology's cluster list (sorted ids where no order is known)."""
    return CLUSTER_COLOURS[index % len(CLUSTER_COLOURS)]
