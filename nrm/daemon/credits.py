"""Output flow control: nrmd's memory for task output, bounded in bytes.

Every byte nrmd reads from a task's pipe for a client is *charged* until it
is known consumed, per run, per user (uid) and in total. A run whose charge
cannot grow stops being read (the task blocks on its pipe) until charges
fall; nothing is dropped.

ZeroMQ never tells a sender that a peer's pipe drained, so consumption is
learnt from the client: a run started with a ``window`` has its client
send ``credit`` requests (a running total of the bytes it consumed), and
its charge is what was sent minus what was credited. A run without a window
(an older or raw client) cannot say: its charge is what was sent, up to
what its connection's send limit lets libzmq hold (``legacy_cap``), and it
is released when the task ends. Since such charges only fall when tasks
end, runs that each hold part of the budget could wait for one another
for ever: so one of them at a time, the *lead*, may grow to ``legacy_cap``
past the budget, runs to its end and makes room (the total may exceed the
budget by one ``legacy_cap``, never more).

A run may take more output while its own window has room, its user holds
less than ``per_uid`` and all runs together hold less than ``total``. A run
paused for its user's or the total's budget asks the runs holding it for
credits (an empty ``output`` reply flagged ``credit``), so that a client
that read everything but has not yet reached its next credit says so
instead of leaving the others waiting. A run's charge still held when its
task ends stays until the client credits it (nrm's clients do as they read
the exit) or its connection is found gone.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional, Protocol

from nrm.containers.manager import READ_CHUNK

#: a client's window is kept within these: a smaller one would mean a
#: credit per chunk; a larger one more memory than a run needs to stream
WINDOW_MIN = 256 << 10
WINDOW_MAX = 1 << 20
#: what all runs of one user may hold, and all runs together
UID_BUDGET_BYTES = 16 << 20
BUDGET_BYTES = 64 << 20
#: a read smaller than this waits for more room instead
MIN_READ = 4096


class Holder(Protocol):
    """The side that streams a run to its client (``ClientSink``)."""

    def wake(self) -> None:
        """Room again: read the task's pipes."""

    def ask(self) -> None:
        """Ask the client for a credit now."""


def effective_window(requested: int) -> int:
    """The window nrmd keeps for a run that asked for ``requested`` (0: none)."""
    if requested <= 0:
        return 0
    return min(max(requested, WINDOW_MIN), WINDOW_MAX)


class Account:
    """One run's output: bytes sent, bytes its client credited, the charge."""

    __slots__ = ("uid", "window", "holder", "sent", "consumed", "charge", "asked", "finished")

    def __init__(self, uid: int, window: int, holder: Holder):
        self.uid = uid
        self.window = window
        self.holder = holder
        self.sent = 0
        self.consumed = 0
        self.charge = 0
        #: asked for a credit since the last one came (one ask is enough)
        self.asked = False
        self.finished = False


class OutputBudget:
    """The charges of every run, by user and in total, and the runs
    waiting for room (woken, oldest first, whenever a charge falls)."""

    def __init__(self, legacy_cap: int, total: int = BUDGET_BYTES,
                 per_uid: int = UID_BUDGET_BYTES):
        self.legacy_cap = legacy_cap
        self.total = total
        self.per_uid = per_uid
        self.held = 0
        self.by_uid: Dict[int, int] = {}
        #: uid -> accounts that hold bytes and can be asked for credits
        self.holders: Dict[int, Dict[Account, None]] = {}
        self.waiting: "OrderedDict[Account, None]" = OrderedDict()
        #: the run without a window that may grow past the budget
        self.lead: Optional[Account] = None
        self.counters = {"output_pauses": 0, "credit_asks": 0}

    def open(self, uid: int, window: int, holder: Holder) -> Account:
        return Account(uid, effective_window(window), holder)

    # -- taking output ----------------------------------------------------
    def room(self, acct: Account) -> int:
        """How many bytes the run may read now; 0: it waits (and is woken).

        Asking the holders for credits can free room at once: a holder
        whose client is found gone is closed, which wakes every waiting
        run, this one included, before its caller has paused it (so that
        wake-up is lost). A run no longer waiting after asking therefore
        looks again; each pass asks each holder at most once, so this ends."""
        while True:
            if acct.window:
                own = acct.window - acct.charge
            elif acct.charge >= self.legacy_cap:
                return READ_CHUNK       # the charge no longer grows: libzmq's limit paces it
            else:
                own = READ_CHUNK
            user = self.per_uid - self.by_uid.get(acct.uid, 0)
            shared = self.total - self.held
            n = min(READ_CHUNK, own, user, shared)
            if n >= MIN_READ:
                return n
            if not acct.window and (self.lead is None or self.lead is acct):
                self.lead = acct
                return READ_CHUNK
            self._wait(acct, own < MIN_READ, user < MIN_READ)
            if acct in self.waiting:
                return 0

    def _wait(self, acct: Account, own: bool, user: bool) -> None:
        if acct not in self.waiting:
            self.waiting[acct] = None
            self.counters["output_pauses"] += 1
        if own:
            self._ask(acct)
        else:       # the budget: ask those who hold it, this user's first
            for a in list(self.holders.get(acct.uid, ())):
                self._ask(a)
            if not user:
                for uid in list(self.holders):
                    for a in list(self.holders.get(uid, ())):
                        self._ask(a)

    def _ask(self, acct: Account) -> None:
        if acct.window and acct.charge > 0 and not acct.asked:
            acct.asked = True
            self.counters["credit_asks"] += 1
            acct.holder.ask()

    def sent(self, acct: Account, n: int) -> bool:
        """``n`` bytes go to the client; True when the run's window is now
        full, so the chunk should carry the ask for a credit."""
        acct.sent += n
        if acct.window:
            self._set(acct, acct.sent - acct.consumed)
            if acct.window - acct.charge < MIN_READ and not acct.asked:
                acct.asked = True
                return True
            return False
        self._set(acct, min(acct.sent, self.legacy_cap))
        return False

    # -- giving it back ---------------------------------------------------
    def credit(self, acct: Account, consumed: int) -> None:
        """The client consumed ``consumed`` bytes so far (a running total:
        a smaller or repeated value changes nothing, a larger one than was
        sent counts as everything)."""
        if not acct.window:
            return
        consumed = min(max(consumed, acct.consumed), acct.sent)
        acct.asked = False
        if consumed == acct.consumed:
            return
        acct.consumed = consumed
        self._set(acct, acct.sent - consumed)

    def finish(self, acct: Account) -> bool:
        """The task ended; True while the run still holds bytes its client
        has not credited (released by ``credit`` or ``close``)."""
        acct.finished = True
        if acct.window and acct.charge > 0:
            self.waiting.pop(acct, None)
            return True
        self.close(acct)
        return False

    def close(self, acct: Account) -> None:
        """The run is over for good (client gone, or nothing held)."""
        self.waiting.pop(acct, None)
        if self.lead is acct:
            self.lead = None
            if self.waiting:
                self._wake()
        self._set(acct, 0)

    def _set(self, acct: Account, charge: int) -> None:
        delta = charge - acct.charge
        if not delta:
            return
        acct.charge = charge
        self.held += delta
        uid = acct.uid
        left = self.by_uid.get(uid, 0) + delta
        if left:
            self.by_uid[uid] = left
        else:
            self.by_uid.pop(uid, None)
        mine = self.holders.get(uid)
        if charge and acct.window:
            if mine is None:
                mine = self.holders[uid] = {}
            mine[acct] = None
        elif mine is not None:
            mine.pop(acct, None)
            if not mine:
                del self.holders[uid]
        if delta < 0 and self.waiting:
            self._wake()

    def _wake(self) -> None:
        waiting, self.waiting = self.waiting, OrderedDict()
        for acct in waiting:
            if not acct.finished:
                acct.holder.wake()

    def status(self) -> dict:
        return {"held_bytes": self.held, "budget_bytes": self.total,
                "uid_budget_bytes": self.per_uid, "waiting_runs": len(self.waiting),
                "users": len(self.by_uid), **self.counters}


def lingering(acct: Optional[Account]) -> bool:
    """A finished run whose client has not yet credited all it was sent."""
    return acct is not None and acct.finished and acct.charge > 0
