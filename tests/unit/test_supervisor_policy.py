"""Unit tests of the pure restart policy (``batpak_supervisor.policy``) with a fake clock.

Owns: the edges of both policies (Once: exactly one restart; Bounded: exactly N restarts
in any rolling window, the N+1th refused, the window rolling over), terminal exit codes,
and stop handling. Pure: no processes, no sleeping; ``now_ms`` is a plain integer.
"""

from __future__ import annotations

import pytest
from batpak_supervisor import policy as P

from batpak_mp import RestartPolicy

CRASH = P.WriterExited(code=None, signal=9)


def feed(state: P.PolicyState, times: list[int], event: P.Event = CRASH) -> tuple[P.PolicyState, list[P.Action]]:
    actions = []
    for t in times:
        state, action = P.decide(state, event, t)
        actions.append(action)
    return state, actions


def restarted(actions: list[P.Action]) -> list[bool]:
    return [isinstance(a, P.Restart) for a in actions]


# ---- Once ---------------------------------------------------------------------------------
def test_once_allows_exactly_one_restart_in_the_supervisors_life() -> None:
    state = P.initial(RestartPolicy.once())
    state, a1 = P.decide(state, CRASH, 0)
    assert isinstance(a1, P.Restart) and a1.restarts == 1 and (a1.in_window, a1.limit) == (1, 1)
    # even a day later, the second crash is refused: Once is per life, not per window
    state, a2 = P.decide(state, P.WriterExited(code=1), 86_400_000)
    assert isinstance(a2, P.Fail)
    assert "once" in a2.reason and "exited with code 1" in a2.reason
    assert state.failed_reason == a2.reason and state.restarts == 1


def test_once_hang_and_ready_timeout_count_as_crashes() -> None:
    state = P.initial(RestartPolicy.once())
    state, a1 = P.decide(state, P.WriterHung(silent_ms=3100), 10)
    assert isinstance(a1, P.Restart) and "hung" in a1.cause
    state, a2 = P.decide(state, P.ReadyTimedOut(timeout_ms=30_000), 20)
    assert isinstance(a2, P.Fail) and "not ready within 30000 ms" in a2.reason


# ---- Bounded -------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5])
def test_bounded_allows_exactly_n_in_the_window_and_refuses_the_next(n: int) -> None:
    state = P.initial(RestartPolicy.bounded(n, 1_000))
    state, actions = feed(state, [10 * i for i in range(n + 1)])
    assert restarted(actions) == [True] * n + [False]
    assert [a.in_window for a in actions[:n] if isinstance(a, P.Restart)] == list(range(1, n + 1))
    fail = actions[-1]
    assert isinstance(fail, P.Fail) and f"bounded:{n}:1000 exhausted" in fail.reason
    assert state.restarts == n


def test_bounded_window_boundary_is_exclusive() -> None:
    """A restart at t stops counting exactly at t + within_ms."""
    state = P.initial(RestartPolicy.bounded(2, 1_000))
    state, actions = feed(state, [0, 500])
    assert restarted(actions) == [True, True]
    _, refused = P.decide(state, CRASH, 999)  # 0 is still 999 ms old: window full
    assert isinstance(refused, P.Fail)
    _, allowed = P.decide(state, CRASH, 1_000)  # 0 has aged out: one slot free
    assert isinstance(allowed, P.Restart) and allowed.in_window == 2 and allowed.restarts == 3


def test_bounded_window_rolls_over_and_allows_again() -> None:
    state = P.initial(RestartPolicy.bounded(3, 1_000))
    state, actions = feed(state, [0, 100, 200, 1_200, 1_300, 1_400, 2_500, 5_000, 5_001, 5_002])
    assert restarted(actions) == [True] * 10
    assert [a.in_window for a in actions if isinstance(a, P.Restart)] == [1, 2, 3, 1, 2, 3, 1, 1, 2, 3]
    _, last = P.decide(state, CRASH, 5_003)
    assert isinstance(last, P.Fail)


def test_bounded_window_is_rolling_not_tumbling() -> None:
    """Restarts at 900 and 1100 fill a 2-per-1000ms window at 1500 although a tumbling
    window [1000, 2000) would hold only one of them."""
    state = P.initial(RestartPolicy.bounded(2, 1_000))
    state, actions = feed(state, [900, 1_100])
    assert restarted(actions) == [True, True]
    _, action = P.decide(state, CRASH, 1_500)
    assert isinstance(action, P.Fail)
    _, action = P.decide(state, CRASH, 1_900)  # 900 aged out
    assert isinstance(action, P.Restart)


def test_bounded_zero_never_restarts() -> None:
    _, action = P.decide(P.initial(RestartPolicy.bounded(0, 1_000)), CRASH, 0)
    assert isinstance(action, P.Fail)


def test_bounded_forgets_old_restarts_so_state_stays_small() -> None:
    state = P.initial(RestartPolicy.bounded(2, 100))
    state, actions = feed(state, [i * 100 for i in range(1_000)])
    assert all(restarted(actions))
    assert len(state.recent_ms) <= 2 and state.restarts == 1_000


# ---- exits ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "words"), [
    (70, "fsync"), (71, "corruption"), (72, "locked"), (2, "arguments"),
])
def test_fail_closed_exits_are_terminal_even_with_restarts_left(code: int, words: str) -> None:
    state = P.initial(RestartPolicy.bounded(100, 60_000))
    state, action = P.decide(state, P.WriterExited(code=code), 0)
    assert isinstance(action, P.Fail) and words in action.reason and f"exit {code}" in action.reason
    assert action.store_locked == (code == 72)
    assert state.restarts == 0
    # terminal: whatever comes next, the answer stays the same
    assert P.decide(state, CRASH, 1)[1] == action
    assert P.decide(state, P.StopRequested(), 2)[1] == action


def test_terminal_exit_while_stopping_still_fails() -> None:
    """A writer whose final fsync fails during the drain poisons the store: not a clean stop."""
    state, _ = P.decide(P.initial(RestartPolicy.once()), P.StopRequested(), 0)
    _, action = P.decide(state, P.WriterExited(code=70), 1)
    assert isinstance(action, P.Fail)


def test_signal_deaths_with_terminal_numbers_are_crashes() -> None:
    """Signal 2 (SIGINT) is not exit code 2: only exit codes are fail-closed."""
    _, action = P.decide(P.initial(RestartPolicy.once()), P.WriterExited(code=None, signal=2), 0)
    assert isinstance(action, P.Restart)


def test_clean_exit_nobody_asked_for_is_a_crash() -> None:
    state = P.initial(RestartPolicy.once())
    state, action = P.decide(state, P.WriterExited(code=0), 0)
    assert isinstance(action, P.Restart) and "code 0 unasked" in action.cause
    _, action = P.decide(state, P.WriterExited(code=0, was_ready=False), 1)
    assert isinstance(action, P.Fail) and "before it was ready" in action.reason


def test_crash_before_ready_is_described() -> None:
    _, action = P.decide(P.initial(RestartPolicy.once()), P.WriterExited(code=1, was_ready=False), 0)
    assert isinstance(action, P.Restart) and action.cause.endswith("code 1 before it was ready")


# ---- stop ----------------------------------------------------------------------------------
def test_stop_then_writer_exit_is_a_clean_stop_whatever_the_exit() -> None:
    for exit_event in (P.WriterExited(code=0), P.WriterExited(code=None, signal=9), P.WriterExited(code=1)):
        state = P.initial(RestartPolicy.bounded(1, 1_000))
        state, first = P.decide(state, P.StopRequested(), 0)
        assert isinstance(first, P.Stop) and state.stopping
        state, second = P.decide(state, exit_event, 5)
        assert isinstance(second, P.Stop) and state.outcome == P.Stop()
        assert state.restarts == 0


def test_stop_after_policy_exhausted_keeps_the_failure() -> None:
    state, _ = P.decide(P.initial(RestartPolicy.bounded(0, 10)), CRASH, 0)
    _, action = P.decide(state, P.StopRequested(), 1)
    assert isinstance(action, P.Fail)


def test_decide_is_deterministic_and_states_are_immutable() -> None:
    state = P.initial(RestartPolicy.bounded(2, 1_000))
    a = P.decide(state, CRASH, 7)
    b = P.decide(state, CRASH, 7)
    assert a == b and state.restarts == 0 and state.recent_ms == ()


def test_restart_describe_names_the_policy() -> None:
    pol = RestartPolicy.bounded(5, 60_000)
    _, action = P.decide(P.initial(pol), CRASH, 0)
    assert isinstance(action, P.Restart)
    assert action.describe(pol) == "restart 1 of 5 within 60000 ms (policy bounded:5:60000)"
    once = RestartPolicy.once()
    _, action = P.decide(P.initial(once), CRASH, 0)
    assert isinstance(action, P.Restart) and action.describe(once) == "restart 1 of 1 (policy once)"


def test_unknown_policy_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        P.initial(RestartPolicy("backoff", 3, 10))


def test_policy_module_does_no_io() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(P))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"os", "time", "signal", "subprocess", "select", "posix_ipc", "mmap", "socket"}
