"""TORCH_CUDA_ARCH_LIST values that DeepSpeed's JIT op builder cannot parse (seen on an H200: ``9.0a``)."""

import pytest

from moe_dist.parallel.deepspeed.cuda_arch import deepspeed_arch_list, fix_arch_list_for_deepspeed


@pytest.mark.parametrize("value, expected", [
    ("9.0a", "9.0"),
    ("10.0a", "10.0"),
    ("8.0;9.0a+PTX", "8.0;9.0+PTX"),
    ("9.0 9.0a 10.0f", "9.0;10.0"),   # spaces are separators too; 9.0a duplicates 9.0
])
def test_suffixes_are_dropped(value, expected):
    assert deepspeed_arch_list(value) == expected


@pytest.mark.parametrize("value", ["9.0", "8.0;8.6+PTX", "7.5 8.0"])
def test_readable_values_are_left_alone(value):
    assert deepspeed_arch_list(value) is None


def test_the_environment_is_rewritten_with_a_note():
    env = {"TORCH_CUDA_ARCH_LIST": "9.0a"}
    note = fix_arch_list_for_deepspeed(env)
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert "TORCH_CUDA_ARCH_LIST='9.0a'" in note and "'9.0'" in note
    assert fix_arch_list_for_deepspeed({}) is None
    unchanged = {"TORCH_CUDA_ARCH_LIST": "9.0+PTX"}
    assert fix_arch_list_for_deepspeed(unchanged) is None and unchanged["TORCH_CUDA_ARCH_LIST"] == "9.0+PTX"


def test_deepspeed_parses_the_result():
    """The rewritten value goes through the same parse DeepSpeed's builder applies (its sort key)."""
    for value in ("9.0a", "8.0;9.0a+PTX", "10.0a 9.0a"):
        for cc in deepspeed_arch_list(value).split(";"):
            tuple(int(part.split("+")[0]) for part in cc.split("."))  # raises on '0a'
