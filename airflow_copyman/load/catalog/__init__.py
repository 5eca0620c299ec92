"""What the servers say about a load's tables: names and their hints, columns and types,
which table a name is, merge keys' equality, size estimates (internal to the load layer)."""
