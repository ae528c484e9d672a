"""The output budget's bookkeeping (nrm/daemon/credits.py), with holders
that record what the budget asks of them."""

from nrm.daemon.credits import MIN_READ, OutputBudget


class Holder:
    """A run's sink: counts wake-ups; ``on_ask`` stands for what a send
    to its client does (a client found gone closes the run's account)."""

    def __init__(self):
        self.wakes = 0
        self.asks = 0
        self.on_ask = None

    def wake(self):
        self.wakes += 1

    def ask(self):
        self.asks += 1
        if self.on_ask:
            self.on_ask()


def test_a_run_woken_while_asking_for_credits_is_not_left_paused():
    """The user's budget is held by a finished run whose client is gone:
    asking it closes it, which frees the budget before the asking run's
    caller has paused it. The run must then be given room (or stay
    waiting to be woken), never 0 while not waiting: its task would block
    on its pipe for ever."""
    budget = OutputBudget(legacy_cap=1 << 20, per_uid=512 << 10)
    gone, live = Holder(), Holder()
    held = budget.open(1000, 1 << 20, gone)
    budget.sent(held, (512 << 10) - 1000)        # the user's budget, nearly all
    budget.finish(held)
    gone.on_ask = lambda: budget.close(held)
    run = budget.open(1000, 1 << 20, live)
    n = budget.room(run)
    assert gone.asks == 1
    assert n >= MIN_READ or run in budget.waiting, (n, budget.status())


def test_a_run_waiting_for_its_own_credit_is_woken_when_it_comes():
    budget = OutputBudget(legacy_cap=1 << 20)
    holder = Holder()
    run = budget.open(1000, 256 << 10, holder)
    assert budget.sent(run, 256 << 10) is True     # the chunk that fills it asks
    assert budget.room(run) == 0 and run in budget.waiting
    budget.credit(run, 128 << 10)
    assert holder.wakes == 1 and budget.room(run) > 0
    assert budget.status()["held_bytes"] == 128 << 10


def test_runs_waiting_on_the_users_budget_ask_its_holders_once():
    budget = OutputBudget(legacy_cap=1 << 20, per_uid=512 << 10)
    a, b = Holder(), Holder()
    first = budget.open(1000, 1 << 20, a)
    budget.sent(first, 512 << 10)
    second = budget.open(1000, 512 << 10, b)
    assert budget.room(second) == 0 and budget.room(second) == 0
    assert a.asks == 1                            # asked once until it credits
    budget.credit(first, 512 << 10)
    assert b.wakes == 1 and budget.room(second) > 0
