"""Names, defaults and limits shared by every zfalkon process.

Each value is documented where it is defined; the README and ``docs/protocol.md`` refer
to these names.
"""

#: Wire protocol version. Peers must speak the same protocol version; the package version
#: is informational only (a 0.1.3 worker serves a 0.1.4 broker if the protocol matches).
PROTOCOL_VERSION = 3

#: TCP port the broker listens on when ``--listen`` gives none.
DEFAULT_PORT = 7450

#: Largest frame the broker accepts (ZMQ_MAXMSGSIZE); a larger one drops the peer. Room
#: for one task or result of MAX_TASK_BYTES with its frame's fields.
MAX_FRAME_BYTES = 136 * 1024 * 1024

#: A batch frame (SUBMIT, TASKS, RESULTS) is closed once its blobs pass this many bytes.
FRAME_SOFT_BYTES = 8 * 1024 * 1024

#: Largest task blob a client may submit, and largest result a slot returns (a larger
#: result becomes a SerializationError result): a 100 MiB numpy array fits. (Bigger data
#: belongs in files: ``inputs=``/``outputs=``, staged from S3 or a shared path.)
MAX_TASK_BYTES = 128 * 1024 * 1024
MAX_RESULT_BYTES = 128 * 1024 * 1024

#: Most tasks the broker puts in one frame to a worker slot, and a client in one frame to
#: the broker.
MAX_BATCH = 1024

#: Each of a shell task's stdout and stderr is kept up to this many bytes; the rest is
#: read and discarded, and the result says it was truncated.
OUTPUT_CAP_BYTES = 1024 * 1024

#: Seconds between heartbeats from a worker agent to the broker (and between ZMTP
#: heartbeats on every connection, which also keep NAT state alive).
HEARTBEAT_SECONDS = 2.0
#: A worker that misses this many heartbeats in a row is declared lost: every task its
#: slots held (running or prefetched) goes back to the queue.
HEARTBEAT_MISSES = 3
#: A task exposed to this many lost workers fails with WorkerLost instead of a new try.
MAX_ATTEMPTS = 3
#: A task blamed for this many crashes of the process that ran it -- its slot died, or its
#: worker agent died, while running it -- fails with WorkerCrashed naming it (quarantined)
#: instead of going to another worker. ``zfalkon broker --max-crashes N`` sets it; 1 fails
#: a task at its first crash. (A task that kills only its own task host fails at once:
#: its slot answers WorkerCrashed itself.)
MAX_CRASHES = 2
#: A slot's lease on the tasks it holds. Anything the slot sends renews it, and so does its
#: agent's HEARTBEAT while the slot runs a task (a 10-hour task keeps its lease). A slot
#: silent this long loses its tasks back to the queue (each counts an attempt).
LEASE_SECONDS = HEARTBEAT_SECONDS * HEARTBEAT_MISSES
#: A slot that has returned nothing for this long while holding prefetched tasks has them
#: taken back (work stealing) when the queue is empty and another slot idles.
STEAL_SECONDS = 1.0
#: Client keys are below this, so task ids (``key << 40 | seq``) stay below 2**63. Keys are
#: reused once every key below it has been handed out.
MAX_CLIENT_KEY = 1 << 23

#: How long a client or slot waits for the broker's welcome before it gives up (a worker
#: agent waits as long as it takes, saying so every 10 s).
CONNECT_TIMEOUT_SECONDS = 10.0

#: A slot keeps at least this much measured work (seconds) requested ahead of itself, and
#: enough more to cover its measured round trip to the broker (see ``slotcore.window_for``).
PREFETCH_SECONDS = 0.1
#: Bounds of a slot's window (tasks it asks to hold: running, queued, or returned and not
#: yet received by the broker).
MIN_WINDOW = 1
MAX_WINDOW = 65536
#: A slot measures its round trip to the broker (PING/PONG) this often while it works.
PING_SECONDS = 1.0
#: A slot returns results when it has this many, or when the oldest waited this long.
RESULT_FLUSH_COUNT = 256
RESULT_FLUSH_SECONDS = 0.005

#: Largest file a task may carry inline, as an input or a returned output (larger ones go
#: through S3: see zfalkon/staging.py).
INLINE_FILE_BYTES = 1024 * 1024

#: Client: tasks ``Executor.map`` keeps submitted ahead of the consumer.
MAP_BUFFER = 65536

#: A client whose connection is gone (it vanished without BYE, or its link stalls) may
#: come back for this long: its tasks keep running and their results are held for it
#: (with a journal, in the journal too); then its tasks and results are dropped.
CLIENT_HOLD_SECONDS = 3600.0
#: The same without a journal (results are held in the broker's memory only).
CLIENT_AWAY_SECONDS = 300.0

#: Seconds a process being stopped gets between SIGTERM and SIGKILL.
STOP_GRACE_SECONDS = 10.0
#: Seconds a stopping slot waits, at most, for the broker to acknowledge its last results
#: before it says BYE and exits (within STOP_GRACE_SECONDS: its agent's BYE, sent once the
#: slot has exited, must not overtake them; see zfalkon.slot.Slot._confirm).
STOP_CONFIRM_SECONDS = 5.0

#: Environment variable naming the broker for clients and the CLI.
BROKER_ENV = "ZFALKON_BROKER"
#: Environment variable naming a key bundle (``--keys``) for clients and the CLI.
KEYS_ENV = "ZFALKON_KEYS"
#: Environment variable naming the broker's key directory for ``zfalkon keys``.
KEY_DIR_ENV = "ZFALKON_KEY_DIR"
