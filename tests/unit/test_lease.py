"""When the worker may skip asking the database whether its lease still holds."""

from __future__ import annotations

import uuid

import pytest

from core.lease import Lease, lease_certainly_held


@pytest.mark.parametrize(
    ("elapsed", "held"),
    [(0.0, True), (10.0, True), (44.9, True), (45.0, False), (80.0, False), (-1.0, False)],
)
def test_only_the_first_half_of_a_90s_lease_is_trusted_without_asking(
    elapsed: float, held: bool
) -> None:
    """Past half the lease (a slow attempt, a paused process) the database must be asked; a
    clock that went backwards is not trusted either."""
    assert lease_certainly_held(100.0, 100.0 + elapsed, 90.0) is held


def test_a_renewal_moves_the_trusted_window_of_the_lease_the_processor_holds() -> None:
    """The worker renews the same Lease object its processor reads, so a long attempt whose
    lease was renewed skips the round trip again, and one whose renewal failed does not."""
    lease = Lease(uuid.uuid4(), attempt=1, confirmed_at=100.0)
    assert not lease.certainly_held(now=160.0, lease_seconds=90.0)
    lease.confirmed_at = 130.0  # a renewal sent at t=130 succeeded
    assert lease.certainly_held(now=160.0, lease_seconds=90.0)
