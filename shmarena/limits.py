"""Every bound of the protocol and of what one client may make the daemon
hold, in one place. Pure: plain numbers, imported by both sides.

A bound the daemon enforces per client is reported in `stats["limits"]` under
the key in its comment, and a request that would pass it is refused with
LimitReached naming that key.
"""

from __future__ import annotations

# Limits. Frames above MAX_FRAME_BYTES are dropped by ZeroMQ (ZMQ_MAXMSGSIZE)
# before they reach Python.
MAX_FRAME_BYTES = 1 << 20
MAX_BATCH = 4096
MAX_OWNER_NAME = 200
MAX_SIZE_BYTES = 1 << 62
REPLY_CACHE_ENTRIES = 256
MAX_PID = 1 << 22  # Linux's PID_MAX_LIMIT

MAX_EVENTS = 1 << 16  # integers in one POST
MAX_FRAMES = 16  # requests in one ZeroMQ message (a client's posts, then its request)
MAX_FILLS = 64  # classes in one FILL
MAX_SESSIONS = (1 << 23) - 1  # so a session's generations fit in 64 bits
MAX_NAME = 200  # characters in a published name or a queue name
MAX_PAYLOAD_BYTES = 256 << 10  # the in-band part of one queued message
MAX_QUEUE_CREDIT = 1024  # slots one QRESERVE may reserve
MAX_PREFETCH = 256  # messages one QTAKE may take ahead
MAX_TAKEN_AHEAD = 4096  # "taken_ahead_per_session", all queues (daemon/queues.py)
MAX_QUEUED = 1 << 20  # messages in one queue, whatever its maxsize
MAX_WAIT_S = 3600.0  # the longest one waiting request is kept; clients ask again
MAX_KEPT_PER_SESSION = 1024  # waiting requests (all ops together) one session may have kept
MAX_BLOCKS_REPLY = 200_000  # blocks one BLOCKS reply lists (about 4 MB of msgpack)
EVENTS_KEPT = 1 << 16  # name events the daemon remembers for subscribers
MAX_EVENTS_PER_REPLY = 1024
# Replies to one client that has not read them yet: this many in its ZeroMQ
# pipe (the socket's send high-water mark), then up to MAX_QUEUED_REPLY_BYTES
# more in the daemon's own queue for it (a burst: one message may carry
# MAX_FRAMES requests). Past both the client is not reading: further replies
# to it are dropped (counted, logged) until it reads again. So what one client
# can make the daemon hold is about MAX_BUFFERED_REPLIES of its largest
# replies plus MAX_QUEUED_REPLY_BYTES.
MAX_BUFFERED_REPLIES = 16
MAX_QUEUED_REPLY_BYTES = 4 << 20

# What one client may make the daemon hold (docs/reliability.md). Each bound
# is reported in `stats["limits"]` under the key in its comment, and a request
# that would pass it is refused with LimitReached naming that key (details
# `limit`, `value`), changing nothing. The sizes let a heavy legitimate user
# through (tens of thousands of live owners, names and messages) while a
# runaway loop stops at tens of MiB of daemon heap, not at the machine's RAM:
# an owner costs the daemon about 1 KiB, a name about 0.5 KiB, a queue about
# 1 KiB before its messages.
MAX_OWNERS_PER_SESSION = 1 << 16  # "owners_per_session": live owners a session
# created (session-scoped, and detached ones while their creator lives)
MAX_DETACHED_OWNERS = 1 << 16  # "detached_owners": they outlive sessions, so a total
MAX_NAMES_PER_SESSION = 1 << 16  # "names_per_session": names a session published
MAX_NAMES = 1 << 18  # "names": published names in all (they outlive sessions)
MAX_QUEUES_PER_SESSION = 1024  # "queues_per_session": queues a session has open
MAX_QUEUES = 4096  # "queues": queues in all
# In-band bytes of queued messages live in the daemon's heap (blocks do not:
# they are in the arena). A message costs its payload plus MESSAGE_COST_BYTES,
# plus HANDLE_COST_BYTES per handle it carries (what the daemon keeps for it),
# so empty messages are bounded too. 64 MiB in all is 256 full payloads, or a
# thousand of the ~64 KB pickles a queue of small objects carries.
MAX_QUEUE_PAYLOAD_BYTES = 16 << 20  # "queued_payload_bytes_per_queue"
MAX_QUEUED_PAYLOAD_BYTES = 64 << 20  # "queued_payload_bytes": all queues together
# "listing_rows": rows in one OWNERS, CLIENTS or NAMES reply. The daemon builds
# one page per request, so a listing of many owners does not hold up the other
# clients for its whole length, and a reply stays far below a client's message
# limit (an owner row with its allocation sites is up to ~1.5 KiB).
MAX_LISTING_ROWS = 10_000
# "remembered_frees": blocks whose last owner the daemon remembers (why each
# left it: freed, owner recycled, session ended), so a stale handle's refusal
# says what happened; beyond it the oldest is forgotten (nothing is refused).
MAX_REMEMBERED_FREES = 1 << 14  # about 3.5 MiB of daemon heap when full
MESSAGE_COST_BYTES = 128
HANDLE_COST_BYTES = 64
