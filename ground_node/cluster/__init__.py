"""The cluster room (ARCHITECTURE §2, §3 step 5): the gateway of a multi-device cluster and its device agents.
No torch at module level: the gateway needs none; a device imports its trainer when it runs."""
