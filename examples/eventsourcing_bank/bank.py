"""An ``eventsourcing`` application on batpak-mp, run by several worker processes at once.

``Bank`` is an ordinary eventsourcing application (``Account`` aggregates: opened,
deposited). Nothing in it names batpak-mp: the environment picks the persistence module,

    PERSISTENCE_MODULE=batpak_mp.eventsourcing  BATPAK_MP_DATA_DIR=/path/to/served/store

and every process that constructs ``Bank()`` with that environment shares one store: the
same aggregates, one notification log numbered 1, 2, 3... in commit order with no gaps,
whatever process saved the event. ``Ledger`` is a follower (an eventsourcing
``EventSourcedProjection``): for every event of the bank it records one ``Entry``,
atomically with its tracking position, so it sees each event exactly once even when it is
stopped and started again.

This module is imported by its package name, ``examples.eventsourcing_bank.bank``, in
every process (eventsourcing stores each event's class as a topic, module and name), by
``run.py`` (workers, follower, demo) and ``wsgi.py`` (gunicorn) beside it.
"""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.domain import Aggregate, DomainEventProtocol, event
from eventsourcing.persistence import IntegrityError
from eventsourcing.projection import EventSourcedProjection

SAVE_ATTEMPTS = 50  # a save that lost a race to another process is retried this often


class Account(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = 0

    @classmethod
    def create_id(cls, owner: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"batpak-mp:example:account:{owner}")

    @event("Deposited")
    def deposit(self, amount: int) -> None:
        self.balance += amount


HOUSE = Account.create_id("house")  # the account every worker deposits into


class Bank(Application[UUID]):
    """Accounts and deposits; every save returns the notification ids it was given."""

    def open(self, owner: str) -> tuple[UUID, list[int]]:
        account = Account(owner)
        return account.id, [r.notification.id for r in self.save(account)]

    def open_house(self) -> list[int]:
        """Open the shared account once, whichever process gets there first (the others get [])."""
        try:
            return [r.notification.id for r in self.save(Account("house"))]
        except IntegrityError:
            return []  # another worker opened it

    def deposit(self, account_id: UUID, amount: int) -> list[int]:
        """Deposit, retrying on a fresh copy when another process saved the account first."""
        for _ in range(SAVE_ATTEMPTS):
            account: Account = self.repository.get(account_id)
            account.deposit(amount)
            try:
                return [r.notification.id for r in self.save(account)]
            except IntegrityError:
                continue
        raise RuntimeError(f"gave up depositing into {account_id} after {SAVE_ATTEMPTS} races")

    def balance(self, account_id: UUID) -> int:
        try:
            account: Account = self.repository.get(account_id)
        except AggregateNotFoundError:
            raise KeyError(account_id) from None
        return account.balance


class Entry(Aggregate):
    """The ledger's record of one event of the bank (its id is the event's originator and
    version, so a second record of the same event is an IntegrityError)."""

    @event("Recorded")
    def __init__(self, originator: str, version: int, topic: str) -> None:
        self.originator = originator
        self.version = version
        self.topic = topic

    @classmethod
    def create_id(cls, originator: str, version: int, topic: str) -> UUID:
        return uuid5(NAMESPACE_URL, f"batpak-mp:example:entry:{originator}:{version}")


class Ledger(EventSourcedProjection[UUID]):
    """Follows the bank: one ``Entry`` per bank event, recorded with its tracking position."""

    name = "Ledger"

    def policy(self, domain_event: DomainEventProtocol[Any], processing_event: ProcessingEvent[UUID]) -> None:
        entry = Entry(str(domain_event.originator_id), domain_event.originator_version, type(domain_event).__qualname__)
        processing_event.collect_events(entry)

    def entries(self) -> int:
        """How many entries the ledger holds (its notification log's newest id)."""
        return self.recorder.max_notification_id() or 0
