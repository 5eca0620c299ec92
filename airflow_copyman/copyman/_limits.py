"""The named limits of every wait, in the engine and in the load layer on top of it: how
long one wait may last before a stop or a deadline is looked at again, and how long the
ends of a stop may take. One place, so that a change of one is seen with the others.
"""

from __future__ import annotations

#: Longest single wait of the copy's loop and of the one driver (so also of a load's own
#: statements, commits and read-backs), so that ``cancel()``, a stop and deadlines are
#: noticed promptly (the loop also wakes for data, so this only bounds an idle wait).
MAX_WAIT = 0.5
#: Longest single wait for connections being opened (on threads: see
#: ``load.connection.bounded.connect_all``), so that a stop is noticed promptly.
POLL = 0.1
#: How long a cancelled statement (or a COMMIT after a stop) may take to end.
CANCEL_WAIT = 2.0
#: How long aborting a COPY may wait on its server (after a cancel request) before giving up
#: and closing the connection (the server then rolls the transaction back itself).
ABORT_TIMEOUT = 5.0
