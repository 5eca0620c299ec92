"""Connections of a load: endpoints, session settings, bounded statements, lock waits, and
which failures a retry can fix (internal to the load layer)."""
