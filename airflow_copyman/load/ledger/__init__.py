"""The load ledger: which destinations a task loaded already (internal to the load layer)."""
