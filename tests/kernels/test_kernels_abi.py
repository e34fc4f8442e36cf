"""The numbers Python passes to the C++ kernels (slm/kernels/abi.py) against the kernels' own
(kernels/cpu/abi.h, returned by torch.ops.slm_cpu.abi_constants)."""

import pytest

from slm import kernels
from slm.kernels import abi

pytestmark = pytest.mark.skipif(kernels.cpu_ops() is None, reason=f"no CPU kernels: {kernels.kernel_error()}")


def test_python_and_cpp_tables_are_equal():
    names, values = kernels.cpu_ops().abi_constants()
    assert list(zip(names, values)) == abi.table()


def test_every_constant_is_in_the_table():
    # an IntEnum drops a member whose value repeats another's (an alias) from iteration, and so
    # from the table: none may
    for group in abi.GROUPS:
        assert len(group.__members__) == len(list(group)), group
