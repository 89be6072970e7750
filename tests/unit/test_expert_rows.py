"""Per-expert state-dict names resolve on a stacked GroupedExperts (``experts.<e>.w_up.weight``)."""

from __future__ import annotations

import pytest
import torch

from moe_dist.model.experts import GroupedExperts


def _experts() -> GroupedExperts:
    torch.manual_seed(0)
    return GroupedExperts(d_model=4, d_ff=6, expert_type="swiglu", num_experts=4)


def test_every_state_dict_key_resolves_to_its_own_values():
    experts = _experts()
    experts.keep(range(2, 4))  # expert parallelism: rows 0-1 are global experts 2-3
    sd = experts.state_dict()
    assert sorted(sd) == sorted(f"{e}.{m}.weight" for e in (2, 3) for m in ("w_gate", "w_up", "w_down"))
    for key, value in sd.items():
        e, matrix, _ = key.split(".")
        resolved = getattr(getattr(experts, e), matrix).weight
        assert torch.equal(resolved, value), key


def test_a_write_through_a_resolved_name_reaches_the_stacked_parameter():
    experts = _experts()
    before = experts.w_up.detach().clone()
    with torch.no_grad():
        getattr(experts, "1").w_up.weight.fill_(7.0)
    assert torch.equal(experts.w_up[1], torch.full((6, 4), 7.0))
    assert torch.equal(experts.w_up[0], before[0]) and torch.equal(experts.w_up[2:], before[2:])


def test_an_expert_not_held_or_an_unknown_matrix_is_an_attribute_error():
    experts = _experts()
    experts.keep(range(2, 4))
    with pytest.raises(AttributeError):
        getattr(experts, "0")
    with pytest.raises(AttributeError):
        getattr(experts, "4")
    with pytest.raises(AttributeError, match="expert 2 has no matrix 'w_out'"):
        getattr(experts, "2").w_out
    silu = GroupedExperts(d_model=4, d_ff=6, expert_type="silu_mlp", num_experts=2)
    with pytest.raises(AttributeError, match="no matrix 'w_gate'"):
        getattr(silu, "0").w_gate
    assert not hasattr(experts, "no_such_attribute")
