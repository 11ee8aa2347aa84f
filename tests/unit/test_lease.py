"""When the worker may skip asking the database whether its lease still holds."""

from __future__ import annotations

import pytest

from core.lease import lease_certainly_held


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
