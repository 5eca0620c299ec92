"""Copy management: move COPY data from one producer to many receivers, on psycopg 3.

Follows the design of py-postgresql's ``postgresql.copyman`` (Producer, Receivers, faults,
reconcile, CopyFail), fixing its known defects: counts mean records and payload bytes for
every producer, receivers are fed concurrently behind bounded queues, every receiver's end
is verified against the source's row count, and a failed copy aborts every COPY cleanly.

This package imports no Airflow module.
"""

from ._digest import Digest, StreamDigest
from ._errors import (
    Cancelled,
    CopyFail,
    CopyUsageError,
    Fault,
    ProducerFault,
    ProducerTimeout,
    ReceiverFault,
    ReceiverTimeout,
    RowCountMismatch,
)
from ._fittings import (
    CallReceiver,
    IteratorProducer,
    NullProducer,
    NullReceiver,
    Producer,
    Receiver,
    Wait,
)
from ._limits import ABORT_TIMEOUT, CANCEL_WAIT, MAX_WAIT, POLL
from ._manager import BATCH_BYTES, QUEUE_BYTES, RECEIVER_TIMEOUT, CopyManager, transfer
from ._sql import is_copy_statement
from ._statement import StatementProducer, StatementReceiver
from ._steps import Driver, Step, Steps, Want

__all__ = [
    "ABORT_TIMEOUT",
    "BATCH_BYTES",
    "CANCEL_WAIT",
    "MAX_WAIT",
    "POLL",
    "QUEUE_BYTES",
    "RECEIVER_TIMEOUT",
    "CallReceiver",
    "Cancelled",
    "CopyFail",
    "CopyManager",
    "CopyUsageError",
    "Digest",
    "Driver",
    "Fault",
    "IteratorProducer",
    "NullProducer",
    "NullReceiver",
    "Producer",
    "ProducerFault",
    "ProducerTimeout",
    "Receiver",
    "ReceiverFault",
    "ReceiverTimeout",
    "RowCountMismatch",
    "StatementProducer",
    "StatementReceiver",
    "Step",
    "Steps",
    "StreamDigest",
    "Wait",
    "Want",
    "is_copy_statement",
    "transfer",
]
