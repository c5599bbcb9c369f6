"""How many embedding loops work (worker/loops.py): pure, with a fake clock and CPU counter."""

from __future__ import annotations

import threading

import pytest

from worker import loops
from worker.loops import LoopScale


class Clocks:
    def __init__(self) -> None:
        self.now = 0.0
        self.used = 0.0

    def step(self, wall_s: float, cpu_s: float) -> None:
        self.now += wall_s
        self.used += cpu_s


def scale_of(most: int) -> tuple[LoopScale, Clocks]:
    clocks = Clocks()
    return LoopScale(most, clock=lambda: clocks.now, cpu=lambda: clocks.used), clocks


# (process CPU per wall second, share of cycles waiting on the provider, claims full) -> loops after 4 rounds
@pytest.mark.parametrize(
    ("cpu_share", "wait_share", "full", "active"),
    [
        (0.5, 0.6, True, 4),  # a backlog behind the provider's latency: one more each round, up to most
        (0.5, 0.05, True, 1),  # a backlog, but the provider answers at once: more loops would only compute
        (0.9, 0.6, True, 1),  # the process's CPU is spent: more loops would queue for the GIL
        (0.5, 0.6, False, 1),  # no backlog: one loop keeps up
    ],
)
def test_loops_join_under_a_backlog_behind_the_provider_while_the_cpu_has_room(
    cpu_share: float, wait_share: float, full: bool, active: int
) -> None:
    scale, clocks = scale_of(4)
    for _ in range(4):
        clocks.step(loops.CHANGE_EVERY_S, cpu_share * loops.CHANGE_EVERY_S)
        scale.noted(full=full, wall_s=1.0, waited_s=wait_share)
    assert scale.active == active


def test_loops_leave_one_at_a_time_and_never_below_one() -> None:
    scale, clocks = scale_of(3)
    for _ in range(5):
        clocks.step(1.0, 0.2)
        scale.noted(full=True, wall_s=1.0, waited_s=0.9)
    assert scale.active == 3
    scale.noted(full=False, wall_s=0.1, waited_s=0.0)
    assert scale.active == 2
    clocks.step(1.0, 0.95)  # the CPU spent
    scale.noted(full=True, wall_s=1.0, waited_s=0.9)
    assert scale.active == 1
    scale.noted(full=False, wall_s=0.1, waited_s=0.0)
    assert scale.active == 1


def test_loops_join_no_faster_than_every_change_interval() -> None:
    scale, clocks = scale_of(6)
    for _ in range(10):  # ten cycles inside one interval
        clocks.step(loops.CHANGE_EVERY_S / 20, 0.0)
        scale.noted(full=True, wall_s=0.01, waited_s=0.009)
    assert scale.active == 1
    clocks.step(loops.CHANGE_EVERY_S, 0.0)
    scale.noted(full=True, wall_s=0.01, waited_s=0.009)
    assert scale.active == 2


def test_a_waiting_loop_is_admitted_when_it_joins_and_released_at_stop() -> None:
    scale, clocks = scale_of(2)
    stop = threading.Event()
    assert scale.admitted(0, stop, timeout_s=0.0)  # the first always works
    assert not scale.admitted(1, stop, timeout_s=0.01)
    admitted: list[bool] = []
    waiter = threading.Thread(target=lambda: admitted.append(scale.admitted(1, stop, timeout_s=10)))
    waiter.start()
    clocks.step(1.0, 0.1)
    scale.noted(full=True, wall_s=1.0, waited_s=0.8)
    waiter.join(5)
    assert admitted == [True]
    scale.noted(full=False, wall_s=0.1, waited_s=0.0)
    waiter = threading.Thread(target=lambda: admitted.append(scale.admitted(1, stop, timeout_s=10)))
    waiter.start()
    stop.set()
    scale.release()
    waiter.join(5)
    assert admitted == [True, False] and not waiter.is_alive()  # stopped: no further cycle
    assert not scale.admitted(0, stop, timeout_s=0.0)
