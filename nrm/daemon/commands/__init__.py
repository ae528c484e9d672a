"""One module per upstream verb, each with ``NAME`` and ``execute``.

``execute(daemon, requester, request)`` replies through
``requester.reply(...)``; a raised ``RunError`` becomes an error reply.
"""

from nrm.daemon.commands import (claim, forget, kill, listing, power, report, run, run_batch,
                                 setpower, signal, status)

COMMANDS = {m.NAME: m for m in (run, signal, kill, listing, status, power, setpower, report,
                                claim, forget, run_batch)}
