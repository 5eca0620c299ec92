"""How one destination's rows land in its table: append, replace, merge, and create
(internal to the load layer)."""
