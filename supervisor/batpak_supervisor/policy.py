"""The restart policy as a pure state machine: ``decide(state, event, now_ms)``.

Owns: whether a writer that stopped is restarted, refused (the service fails, with a
reason), or let go (a stop was requested). Exactly two policies exist (DESIGN.md §3):
``Once`` — one restart in the supervisor's whole life — and ``Bounded(max_restarts,
within_ms)`` — at most ``max_restarts`` restarts within ANY rolling window of
``within_ms`` (a restart at ``t`` counts against every later decision at ``now`` with
``now - t < within_ms``; windows never tumble).

Invariants: ``decide`` is total and deterministic: the same state, event and ``now_ms``
give the same answer; states are immutable; a state that has failed or stopped stays so
and answers every later event with the same terminal action. Fail-closed writer exits
(``TERMINAL_EXITS``) are never restarted. A clean exit 0 nobody asked for is a crash.

Must not import ``os``, ``time``, ``signal`` or anything that does I/O: time is passed in
(``now_ms``, any monotonic millisecond clock), so the policy is tested with a fake clock.
Imports only the ``RestartPolicy`` value of the library and the writer's exit codes
(``batpak_mp._ipc.codes``, pure).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from batpak_mp._ipc.codes import RESTART_CANNOT_HELP, WriterExit
from batpak_mp._values import RestartPolicy

# The writer's exit codes that restarting cannot help (the contract: batpak_mp._ipc.codes).
TERMINAL_EXITS: dict[int, str] = {code: f"{why} (exit {int(code)})" for code, why in RESTART_CANNOT_HELP.items()}


# ---- events ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WriterExited:
    """The writer process ended and was reaped: ``code`` for an exit, ``signal`` for a
    death by signal (exactly one of them is not None). ``was_ready`` tells whether it had
    announced readiness."""

    code: int | None
    signal: int | None = None
    was_ready: bool = True


@dataclass(frozen=True, slots=True)
class WriterHung:
    """The writer stopped heart-beating while ready; the supervisor killed and reaped it."""

    silent_ms: int


@dataclass(frozen=True, slots=True)
class ReadyTimedOut:
    """The writer never announced readiness in time; the supervisor killed and reaped it."""

    timeout_ms: int


@dataclass(frozen=True, slots=True)
class StopRequested:
    """The supervisor was told to stop (SIGTERM/SIGINT)."""


Event = WriterExited | WriterHung | ReadyTimedOut | StopRequested


# ---- actions --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Restart:
    """Start a new writer. ``restarts`` is the count in the supervisor's life including
    this one; ``in_window`` the count the policy charged (Bounded: within the window)."""

    restarts: int
    in_window: int
    limit: int
    cause: str

    def describe(self, policy: RestartPolicy) -> str:
        if policy.kind == "once":
            return f"restart {self.in_window} of {self.limit} (policy once)"
        return f"restart {self.in_window} of {self.limit} within {policy.within_ms} ms (policy {policy.spec()})"


@dataclass(frozen=True, slots=True)
class Fail:
    """Give up: mark the service failed with ``reason`` and exit non-zero.
    ``store_locked``: the writer found the store held by another live process, so the
    shared control block belongs to that process and must be left alone."""

    reason: str
    store_locked: bool = False


@dataclass(frozen=True, slots=True)
class Stop:
    """A stop was requested: drain the writer (if any) and exit cleanly."""


Action = Restart | Fail | Stop


# ---- state ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PolicyState:
    """Everything the policy remembers. ``recent_ms``: timestamps of the restarts that may
    still count against a Bounded window (pruned as they age out)."""

    policy: RestartPolicy
    restarts: int = 0
    recent_ms: tuple[int, ...] = ()
    stopping: bool = False
    outcome: Fail | Stop | None = None  # set once the supervisor is done

    @property
    def failed_reason(self) -> str | None:
        return self.outcome.reason if isinstance(self.outcome, Fail) else None


def initial(policy: RestartPolicy) -> PolicyState:
    if policy.kind not in ("once", "bounded"):
        raise ValueError(f"unknown restart policy kind {policy.kind!r}")
    return PolicyState(policy)


def describe_exit(event: WriterExited | WriterHung | ReadyTimedOut) -> str:
    """One phrase for a writer's end, for reasons and logs."""
    if isinstance(event, WriterHung):
        return f"the writer hung (no heartbeat for {event.silent_ms} ms) and was killed"
    if isinstance(event, ReadyTimedOut):
        return f"the writer was not ready within {event.timeout_ms} ms and was killed"
    when = "" if event.was_ready else " before it was ready"
    if event.signal is not None:
        return f"the writer was killed by signal {event.signal}{when}"
    if event.code == 0:
        return f"the writer exited with code 0 unasked{when}"
    return f"the writer exited with code {event.code}{when}"


def decide(state: PolicyState, event: Event, now_ms: int) -> tuple[PolicyState, Action]:
    """The next state and what the supervisor must do about ``event`` at ``now_ms``."""
    if state.outcome is not None:
        return state, state.outcome
    if isinstance(event, StopRequested):
        return replace(state, stopping=True), Stop()
    if isinstance(event, WriterExited) and event.signal is None and event.code in TERMINAL_EXITS:
        fail = Fail(TERMINAL_EXITS[event.code], store_locked=event.code == WriterExit.LOCKED)
        return replace(state, outcome=fail), fail
    if state.stopping:  # the writer ended after a stop was asked for: done, whatever it said
        return replace(state, outcome=Stop()), Stop()
    return _crashed(state, describe_exit(event), now_ms)


def _crashed(state: PolicyState, cause: str, now_ms: int) -> tuple[PolicyState, Action]:
    policy = state.policy
    if policy.kind == "once":
        if state.restarts >= 1:
            fail = Fail(f"restart policy once exhausted (its one restart was used); last: {cause}")
            return replace(state, outcome=fail), fail
        new = replace(state, restarts=state.restarts + 1, recent_ms=(now_ms,))
        return new, Restart(new.restarts, 1, 1, cause)
    recent = tuple(t for t in state.recent_ms if now_ms - t < policy.within_ms)
    if len(recent) >= policy.max_restarts:
        fail = Fail(f"restart policy {policy.spec()} exhausted ({len(recent)} restarts within the last "
                    f"{policy.within_ms} ms); last: {cause}")
        return replace(state, recent_ms=recent, outcome=fail), fail
    recent += (now_ms,)
    new = replace(state, restarts=state.restarts + 1, recent_ms=recent)
    return new, Restart(new.restarts, len(recent), policy.max_restarts, cause)
