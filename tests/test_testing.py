"""The equivalence criterion itself (fastllm.testing): it must pass a correct kernel and fail on each injected
fault: a wrong kernel, a NaN, an Inf, a swapped output, a systematic 16-bit error, and a non-finite eager."""

import pytest
import torch
import torch.nn.functional as F

from fastllm.testing import (
    CriterionError,
    assert_equivalent,
    assert_same_nonfinite,
    judge,
    judge_all,
    max_abs_err,
)


def _gelu_case(dtype, n=(37, 129)):
    """(x in dtype, eager output, float64 reference) of a GELU over odd-sized random input."""
    x64 = torch.randn(*n, dtype=torch.float64)
    x = x64.to(dtype)
    return x, F.gelu(x), F.gelu(x.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_correct_kernel_passes(dtype):
    x, eager, ref = _gelu_case(dtype)
    ours = F.gelu(x.float()).to(dtype)  # a different but correct computation (fp32 math, one rounding)
    assert judge(ours, eager, ref).ok
    assert_equivalent(ours, eager, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wrong_kernel_fails(dtype):
    x, eager, ref = _gelu_case(dtype)
    wrong = F.gelu(x, approximate="tanh") if dtype == torch.float32 else (x * torch.sigmoid(1.702 * x))
    v = judge(wrong, eager, ref)
    assert not v.ok and ("exceed" in v.message or "norm-wise" in v.message)
    with pytest.raises(AssertionError, match=r"exceed|norm-wise"):
        assert_equivalent(wrong, eager, ref)


def test_one_element_off_fails():
    _, eager, ref = _gelu_case(torch.float32)
    bad = eager.clone()
    bad[5, 100] += 1e-3
    with pytest.raises(AssertionError, match=r"1 of 4773 elements .* first at \(5, 100\)"):
        assert_equivalent(bad, eager, ref)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_output_where_reference_is_finite_fails(value):
    _, eager, ref = _gelu_case(torch.float32)
    bad = eager.clone()
    bad[3, 7] = value
    with pytest.raises(AssertionError, match=r"NaN pattern|exceed"):
        assert_equivalent(bad, eager, ref)
    assert max_abs_err(bad, ref) == float("inf")  # never NaN, which would compare False against any bar


def test_missing_nan_or_inf_fails():
    _, eager, ref = _gelu_case(torch.float32)
    ref, eager = ref.clone(), eager.clone()
    ref[0, 0], eager[0, 0] = float("nan"), float("nan")
    ref[1, 1], eager[1, 1] = float("inf"), float("inf")
    ok = eager.clone()
    assert judge(ok, eager, ref).ok
    no_nan = ok.clone()
    no_nan[0, 0] = 0.0
    with pytest.raises(AssertionError, match="NaN pattern"):
        assert_equivalent(no_nan, eager, ref)
    wrong_inf = ok.clone()
    wrong_inf[1, 1] = float("-inf")
    with pytest.raises(AssertionError, match="reference is inf"):
        assert_equivalent(wrong_inf, eager, ref)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_eager_never_widens_the_tolerance(value):
    """Eager NaN/Inf where the reference is finite used to make the tolerance NaN/Inf, passing anything."""
    _, eager, ref = _gelu_case(torch.float32)
    eager = eager.clone()
    eager[2, 2] = value
    garbage = torch.full_like(eager, 1e6)
    with pytest.raises(CriterionError, match="no finite bar"):
        judge(garbage, eager, ref)
    with pytest.raises(AssertionError):
        assert_equivalent(garbage, eager, ref)


def test_swapped_outputs_fail():
    """Two outputs judged one by one: swapping them (or judging both against the larger bar) fails."""
    h64 = torch.randn(33, 65, dtype=torch.float64)
    small = (h64 * 1e-3).float()  # an output with a small scale
    large = (h64 * 1e3).float()  # and one with a large scale
    refs = [h64 * 1e-3, h64 * 1e3]
    eagers = [small, large]
    assert all(v.ok for v in judge_all([small, large], eagers, refs, ["a", "b"]))
    verdicts = judge_all([small.flip(0), large.flip(0)], eagers, refs, ["a", "b"])
    assert not any(v.ok for v in verdicts)
    # a per-row max over both outputs would let the small output err by up to the large one's bar
    off = small + 1e-4
    va, vb = judge_all([off, large], eagers, refs, ["a", "b"])
    assert not va.ok and vb.ok


def test_shape_and_dtype_mismatch_raise():
    _, eager, ref = _gelu_case(torch.float32)
    with pytest.raises(CriterionError, match="shapes differ"):
        judge(eager[:-1], eager, ref)
    with pytest.raises(CriterionError, match="dtype"):
        judge(eager.double(), eager, ref)
    with pytest.raises(CriterionError, match="outputs"):
        judge_all([eager], [eager, eager], [ref])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sixteen_bit_systematic_error_fails_normwise(dtype):
    """An error that stays under 2x eager's worst element everywhere but is systematic (every element off by
    nearly eager's worst error) passes the element-wise check and must fail the norm-wise one."""
    ref = torch.randn(257, 129, dtype=torch.float64)
    eager = ref.to(dtype)
    eager_err = (eager.double() - ref).abs().max().item()
    biased = (ref + 0.9 * eager_err * torch.sign(ref)).to(dtype)  # each element pushed away by ~eager's max
    v = judge(biased, eager, ref)
    assert v.max_err <= v.tol, "the fault must be invisible to the element-wise check"
    assert not v.ok and "norm-wise" in v.message


def test_empty_and_all_nonfinite_reference():
    e = torch.empty(0, 5)
    assert judge(e, e, e.double()).ok
    r = torch.full((3,), float("nan"), dtype=torch.float64)
    assert judge(r.float(), r.float(), r).ok
    with pytest.raises(AssertionError, match="NaN pattern"):
        assert_equivalent(torch.zeros(3), r.float(), r)


def test_same_nonfinite():
    e = torch.tensor([1.0, float("nan"), float("inf"), float("-inf")])
    assert_same_nonfinite(e.clone(), e)
    with pytest.raises(AssertionError, match="NaN pattern"):
        assert_same_nonfinite(torch.tensor([1.0, 0.0, float("inf"), float("-inf")]), e)
    with pytest.raises(AssertionError, match=r"\+inf pattern"):
        assert_same_nonfinite(torch.tensor([1.0, float("nan"), 5.0, float("-inf")]), e)
    # exact=False: only finite vs non-finite (quantized ops may turn inf into NaN)
    assert_same_nonfinite(torch.tensor([2.0, float("inf"), float("nan"), float("nan")]), e, exact=False)
    with pytest.raises(AssertionError, match="non-finite pattern"):
        assert_same_nonfinite(torch.tensor([float("nan"), 1.0, 1.0, 1.0]), e, exact=False)


def test_zero_reference_is_judged_elementwise_only():
    """A 16-bit output whose float64 reference is exactly zero (e.g. dq with one key): rounding noise within the
    element-wise bar passes; the norm-wise check has no scale to judge by. Noise beyond the bar still fails."""
    ref = torch.zeros(7, 40, dtype=torch.float64)
    eager = (1e-6 * torch.randn(7, 40)).bfloat16()
    ours = (4e-6 * torch.randn(7, 40)).bfloat16()
    assert judge(ours, eager, ref).ok
    assert not judge(torch.full((7, 40), 0.1).bfloat16(), eager, ref).ok
