"""The adaptive speculation gate's policy, alone (the engines' use of it is tested end to end)."""

from mlx_serve.engines.speculation_gate import SpeculationGate


def still_clock() -> float:  # a clock that never moves: timing never decides, acceptance alone does
    return 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_accepted_drafts_keep_the_gate_open() -> None:
    gate = SpeculationGate(min_acceptance=0.3, clock=still_clock)
    for _ in range(50):
        gate.record(drafted=10, accepted=6)
        assert gate.open


def test_rejected_drafts_pause_speculation_then_probe_again_with_growing_pauses() -> None:
    gate = SpeculationGate(min_acceptance=0.3, clock=still_clock)
    gate.record(drafted=10, accepted=0)
    gate.record(drafted=10, accepted=1)
    assert gate.open  # not enough evidence yet
    gate.record(drafted=10, accepted=0)
    assert not gate.open
    pauses = []
    for _ in range(4):
        paused = 0
        while not gate.open:
            gate.decoded_without_draft()
            paused += 1
        pauses.append(paused)
        gate.record(drafted=10, accepted=0)  # one failed probe closes it again
    assert pauses == [16, 32, 64, 128]


def test_a_paying_probe_resets_the_pause() -> None:
    gate = SpeculationGate(min_acceptance=0.3, clock=still_clock)
    gate.record(10, 0), gate.record(10, 0), gate.record(10, 0)
    gate.decoded_without_draft(16)
    gate.record(10, 0)
    gate.decoded_without_draft(32)
    assert gate.open
    gate.record(10, 9), gate.record(10, 8), gate.record(10, 9)
    assert gate.open
    while gate.open:  # the engines only draft (and record) while the gate is open
        gate.record(10, 0)
    gate.decoded_without_draft(16)
    assert gate.open  # back to the first, short pause


def test_zero_threshold_never_closes() -> None:
    gate = SpeculationGate(min_acceptance=0, clock=still_clock)
    for _ in range(10):
        gate.record(10, 0)
    assert gate.open


def test_drafting_that_is_slower_than_plain_decoding_pauses_despite_good_acceptance() -> None:
    """A small CPU: a step verifying 10 drafts takes 7 plain steps' time, and half are accepted."""
    clock = Clock()
    gate = SpeculationGate(min_acceptance=0.3, clock=clock)

    def plain() -> None:
        clock.now += 0.008
        gate.decoded_without_draft()

    def drafting(accepted: int) -> None:
        clock.now += 0.056
        gate.record(10, accepted)

    gate.decoded_without_draft()  # the first step (after the prefill) is not timed
    for _ in range(3):
        plain()
    drafting(5)
    drafting(5)
    assert gate.open  # not enough timed drafting steps yet
    drafting(5)  # 56 ms for 6 tokens is slower than 8 ms for one
    assert not gate.open


def test_drafting_that_is_faster_keeps_the_gate_open() -> None:
    """Apple silicon: verifying 10 drafts costs little more than one plain step."""
    clock = Clock()
    gate = SpeculationGate(min_acceptance=0.3, clock=clock)
    gate.decoded_without_draft()
    for step in range(40):
        clock.now += 0.008 if step % 4 else 0.010
        gate.decoded_without_draft() if step % 4 else gate.record(10, 4)
        assert gate.open


def test_draft_length_starts_short_grows_on_full_acceptance_and_drops_on_a_miss() -> None:
    gate = SpeculationGate(min_acceptance=0.3, clock=still_clock)
    lengths = []
    for accepted_all in (True, True, True, False, True):
        k = gate.draft_length(10)
        lengths.append(k)
        gate.record(k, k if accepted_all else 1)
    assert lengths == [2, 4, 8, 10, 2]  # capped at the profile's num_pred_tokens; 1 accepted -> 2
    assert SpeculationGate(min_acceptance=0).draft_length(10) == 10  # ungated: always the most
