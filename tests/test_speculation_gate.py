"""The adaptive speculation gate's policy, alone (the engines' use of it is tested end to end)."""

from mlx_serve.engines.speculation_gate import SpeculationGate


def test_accepted_drafts_keep_the_gate_open() -> None:
    gate = SpeculationGate(min_acceptance=0.3)
    for _ in range(50):
        gate.record(drafted=10, accepted=6)
        assert gate.open


def test_rejected_drafts_pause_speculation_then_probe_again_with_growing_pauses() -> None:
    gate = SpeculationGate(min_acceptance=0.3)
    gate.record(drafted=10, accepted=0)
    assert gate.open  # not enough evidence yet
    gate.record(drafted=10, accepted=1)
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
    gate = SpeculationGate(min_acceptance=0.3)
    gate.record(10, 0), gate.record(10, 0)
    gate.decoded_without_draft(16)
    gate.record(10, 0)
    gate.decoded_without_draft(32)
    assert gate.open
    gate.record(10, 9), gate.record(10, 8)
    assert gate.open
    while gate.open:  # the engines only draft (and record) while the gate is open
        gate.record(10, 0)
    gate.decoded_without_draft(16)
    assert gate.open  # back to the first, short pause


def test_zero_threshold_never_closes() -> None:
    gate = SpeculationGate(min_acceptance=0)
    for _ in range(10):
        gate.record(10, 0)
    assert gate.open
