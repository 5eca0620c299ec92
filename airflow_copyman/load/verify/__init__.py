"""``verify="checksum"``: compare what the source sent with what each destination wrote
(internal to the load layer)."""
