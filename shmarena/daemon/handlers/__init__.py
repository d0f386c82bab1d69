"""The service's request handlers, one module per job. Pure.

Each handler takes a `Call` (the service, the session, the parsed request,
the time) and returns its result values, which `Service` turns into the
reply (the one place replies are built), or None when the request is kept
until it can be met; a refusal is raised as a `ShmArenaError`.
"""

from __future__ import annotations

from shmarena.daemon.handlers import admin, alloc, exchange, owners, sessions
from shmarena.daemon.handlers.base import Handler
from shmarena.protocol import Op

# Op -> its handler (HELLO, which needs the peer and its creds, is apart).
HANDLERS: dict[Op, Handler] = {
    Op.BYE: sessions.bye,
    Op.PING: admin.ping,
    Op.ALLOC: alloc.alloc,
    Op.ALLOC_MANY: alloc.alloc_many,
    Op.FREE: alloc.free,
    Op.OWNER: owners.owner,
    Op.RECYCLE: owners.recycle,
    Op.RETAIN: alloc.retain,
    Op.RELEASE: alloc.release,
    Op.FILL: alloc.fill,
    Op.POST: alloc.post,
    Op.SYNC: alloc.sync,
    Op.STATS: admin.stats_op,
    Op.OWNERS: owners.owners,
    Op.CLIENTS: owners.clients,
    Op.CHECK: admin.check,
    Op.SHUTDOWN: admin.shutdown,
    Op.SEGMENTS: admin.segments,
    Op.PUBLISH: exchange.publish,
    Op.UNPUBLISH: exchange.unpublish,
    Op.LOOKUP: exchange.waitable,
    Op.NAMES: exchange.names,
    Op.EVENTS: exchange.waitable,
    Op.QOPEN: exchange.qopen,
    Op.QPUT: exchange.waitable,
    Op.QGET: exchange.waitable,
    Op.QSTAT: exchange.qstat,
    Op.QCLOSE: exchange.qclose,
    Op.QUOTA: owners.quota,
    Op.QPUTS: exchange.qputs,
    Op.QRESERVE: exchange.waitable,
    Op.QTAKE: exchange.waitable,
    Op.QACK: exchange.qack,
    Op.QUNTAKE: exchange.quntake,
    Op.BLOCKS: admin.blocks,
}
