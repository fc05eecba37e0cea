"""The int8 GEMM is exact: int32 results equal NumPy's int64 product of the same operands."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmint8
from llmint8 import _C


def ref(a, b):
    return a.astype(np.int64) @ b.astype(np.int64).T


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 64), k=st.integers(1, 300), n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_int8_gemm_exact_on_random_shapes(m, k, n, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(-127, 128, (m, k), dtype=np.int8)
    b = rng.integers(-127, 128, (n, k), dtype=np.int8)
    c = llmint8.int8_matmul(a, b)
    assert c.dtype == np.int32 and c.shape == (m, n)
    np.testing.assert_array_equal(c, ref(a, b))


@pytest.mark.parametrize("value_a,value_b", [(127, 127), (-127, -127), (127, -127), (-128, -128), (-128, 127)])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 4095, 5), (33, 257, 65), (1, 8192, 7)])
def test_int8_gemm_extremes(value_a, value_b, m, k, n):
    a = np.full((m, k), value_a, np.int8)
    b = np.full((n, k), value_b, np.int8)
    np.testing.assert_array_equal(llmint8.int8_matmul(a, b), ref(a, b))


def test_reference_loop_agrees():
    rng = np.random.default_rng(5)
    a = rng.integers(-128, 128, (17, 131), dtype=np.int8)
    b = rng.integers(-128, 128, (29, 131), dtype=np.int8)
    np.testing.assert_array_equal(_C.int8_matmul(a, b, reference=True), ref(a, b))
    np.testing.assert_array_equal(_C.int8_matmul(a, b), ref(a, b))


def test_empty_rows():
    a = np.zeros((0, 16), np.int8)
    b = np.ones((4, 16), np.int8)
    assert llmint8.int8_matmul(a, b).shape == (0, 4)
