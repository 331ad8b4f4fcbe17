"""The ground role in four rooms (ARCHITECTURE §2): `model`, `learning`, `federation`, `cluster`; the top level holds
what composes them (`cli`, `agent`) and what every room shares (`settings`, `errors`, `records`, `usage`)."""
