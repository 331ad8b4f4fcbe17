"""emsfl: EMS-FL testbed. The roles live in `orbit_service`, `satellite_node` and `ground_node`."""

__version__ = "0.1.0"
