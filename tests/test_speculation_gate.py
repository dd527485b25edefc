"""The speculation gate's policy, alone (the engines' use of it is tested end to end)."""

import pytest

from mlx_serve.engines.speculation_gate import SpeculationGate, StepCosts, expected_tokens, shadow_check


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Machine:
    """Steps on a fake machine: a one-token step takes `plain` seconds, each drafted token adds
    `slope` of that."""

    def __init__(self, gate: SpeculationGate, clock: Clock, plain: float = 0.008, slope: float = 0.8) -> None:
        self.gate, self.clock, self.plain, self.slope = gate, clock, plain, slope
        gate.record(0, 0)  # the first step follows the prefill: never timed

    def step(self, proposed: int, accepted_if_drafted: int, foreseen: bool) -> int:
        """One step with `proposed` tokens from the lookup; returns how many it drafted."""
        k = self.gate.draft_length(proposed)
        self.clock.now += self.plain * (1 + self.slope * k)
        if k:
            self.gate.record(k, min(accepted_if_drafted, k))
        else:
            self.gate.record(0, 0, predicted=foreseen if proposed else None)
        return k


def test_expected_tokens_and_shadow_checks() -> None:
    assert expected_tokens(0.0, 5) == [1] * 6  # nothing accepted: the model's own token only
    assert expected_tokens(1.0, 5)[5] == 6
    assert expected_tokens(0.5, 2) == pytest.approx([1, 1.5, 1.75])
    assert shadow_check([7, 8], [], 7) is True
    assert shadow_check([7, 8], [], 9) is False
    assert shadow_check([], [], 9) is None  # nothing proposed: nothing learned
    assert shadow_check([7, 8], [7], 7) is None  # drafted: the verification itself counts


def test_no_evidence_no_draft() -> None:
    gate = SpeculationGate(min_acceptance=0.3, clock=Clock())
    assert gate.draft_length(10) == 0


def test_novel_text_never_drafts() -> None:
    """The lookup proposes something every step (chance matches), and one in ten is foreseen."""
    clock = Clock()
    machine = Machine(SpeculationGate(min_acceptance=0.3, clock=clock), clock, slope=0.05)
    drafted = sum(machine.step(10, 0, foreseen=step % 10 == 0) for step in range(500))
    assert drafted == 0


def test_text_that_starts_quoting_opens_the_gate_without_a_single_rejected_draft() -> None:
    clock = Clock()
    gate = SpeculationGate(min_acceptance=0.3, clock=clock)
    machine = Machine(gate, clock, slope=0.05)  # Apple silicon: a drafted token costs 5% of a step
    for _ in range(40):
        assert machine.step(10, 0, foreseen=False) == 0
    opened_after = next(n for n in range(1, 20) if machine.step(10, 10, foreseen=True))
    assert opened_after <= 4  # a few foreseen tokens are enough
    drafts = [machine.step(10, 10, foreseen=True) for _ in range(30)]
    assert drafts == sorted(drafts) and drafts[-1] == 10  # and drafts grow with the evidence


def test_on_a_small_cpu_only_near_certain_drafts_pay() -> None:
    """A drafted token costs 0.8 of a plain step (2-core CPU): with 70% acceptance drafting loses,
    so once drafting steps have been timed the gate stops (but for one draft every EXPLORE_AFTER
    steps, to time it again); at near-certain acceptance a short draft still pays."""
    clock = Clock()
    costs = StepCosts()
    gate = SpeculationGate(min_acceptance=0.3, costs=costs, clock=clock)
    machine = Machine(gate, clock, slope=0.8)
    for step in range(30):  # 7 of 10 foreseen, then drafts accepted at the same rate
        machine.step(10, 2, foreseen=step % 10 < 7)
    assert costs.timed() and all(cost == pytest.approx(1 + 0.8 * k) for k, cost in costs.timed().items())
    assert sum(machine.step(10, 2, foreseen=step % 10 < 7) > 0 for step in range(100)) <= 2

    sure = SpeculationGate(min_acceptance=0.3, costs=costs, clock=clock)
    machine = Machine(sure, clock, slope=0.8)
    for _ in range(30):  # sizes not timed yet are tried once
        sure.acceptance = 0.95
        machine.step(10, 10, foreseen=True)
    sure.acceptance = 0.95
    assert 1 <= sure.draft_length(10) <= 3  # short drafts: long ones cost more than they bring
    sure.acceptance = 1.0
    assert sure.draft_length(10) == 10  # certain: every drafted token saves 0.2 of a step


def test_costs_are_interpolated_between_timed_sizes_and_assumed_cheap_beyond() -> None:
    costs = StepCosts()
    costs.add(1, 0.01)
    costs.add(3, 0.03)  # 2 drafted: 3 steps
    costs.add(11, 0.08)  # 10 drafted: 8 steps
    assert costs.relative(1) == pytest.approx(2.0)  # between (0, 1) and (2, 3)
    assert costs.relative(6) == pytest.approx(5.5)
    assert costs.relative(12) == pytest.approx(8 + 2 * StepCosts.PRIOR_SLOPE)


def test_a_new_request_starts_from_the_models_measured_cost() -> None:
    clock = Clock()
    costs = StepCosts()
    first = Machine(SpeculationGate(0.3, costs, clock), clock, slope=0.05)
    for _ in range(20):
        first.step(10, 10, foreseen=True)
    assert all(cost == pytest.approx(1 + 0.05 * k) for k, cost in costs.timed().items())
    second = SpeculationGate(0.3, costs, clock)
    for _ in range(20):
        second.record(0, 0, predicted=True)
    assert second.draft_length(10) == 10  # cheap drafts, good acceptance: the longest


def test_steps_shared_with_other_requests_are_not_timed() -> None:
    clock = Clock()
    costs = StepCosts()
    gate = SpeculationGate(0.3, costs, clock)
    gate.record(0, 0)
    for _ in range(5):
        clock.now += 0.05  # a batch step of several sequences: not this request's cost
        gate.record(0, 0, predicted=True, timed=False)
    costs.add(3, 0.05)
    assert costs.timed() == {}  # and without a timed one-token step, nothing to compare with
    assert costs.relative(4) == 1 + 4 * StepCosts.PRIOR_SLOPE


def test_a_stale_cost_is_measured_again_when_acceptance_is_high() -> None:
    """Costs timed on a busy machine would rule drafting out for good: after EXPLORE_AFTER steps
    without a draft, a request with high acceptance drafts one token to time it again."""
    clock = Clock()
    costs = StepCosts()
    costs.add(1, 0.008)
    for k in (1, 10):
        costs.add(k + 1, 0.008 * (1 + 2 * k))  # a drafted token costs 2 steps: drafting looks hopeless
    gate = SpeculationGate(0.3, costs, clock)
    machine = Machine(gate, clock, slope=0.05)  # but the machine is fast at it now
    drafted = [machine.step(10, 10, foreseen=True) for _ in range(SpeculationGate.EXPLORE_AFTER + 5)]
    assert drafted[: SpeculationGate.EXPLORE_AFTER - 1] == [0] * (SpeculationGate.EXPLORE_AFTER - 1)
    assert any(drafted[SpeculationGate.EXPLORE_AFTER - 1 :])
    assert costs.timed()[1] < 3  # timed again (and again every EXPLORE_AFTER steps)


def test_zero_threshold_always_drafts_everything_proposed() -> None:
    gate = SpeculationGate(min_acceptance=0, clock=Clock())
    for _ in range(10):
        gate.record(10, 0)
    assert gate.draft_length(10) == 10
    assert gate.draft_length(0) == 0
