"""jitmesh endpoint agent: link to the coordinator, local lease table, expiry, enforcers, check."""
