"""The kernel-class probe: the row plan for the classes two machines showed, and the probe on this machine's
real linear layers (rows of one class are bit-identical, whatever the M inside the class)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.lm.kernel_classes import PROBE_ROWS, NotInvariant, RowPlan, plan, probe, row_plan


@pytest.fixture(scope="module")
def lm(engine):
    return engine.backends.lm.lm


def classes(*bounds: tuple[int, int]) -> list[tuple[int, ...]]:
    return [tuple(m for m in PROBE_ROWS if a <= m <= b) for a, b in bounds]


def test_avx2_classes_give_one_call_padded_to_four() -> None:
    p = plan(classes((1, 1), (2, 3), (4, 10**6)))
    assert p == RowPlan(None, 4, ((1, 1), (2, 3), (4, PROBE_ROWS[-1])))
    assert "one call padded to >= 4" in p.describe()


def test_avx512_classes_give_decode_blocks() -> None:
    p = plan(classes((1, 1), (2, 15), (16, 10**6)))
    assert (p.narrow, p.wide) == ((2, 15), 16)


def test_no_open_class_is_refused() -> None:
    with pytest.raises(NotInvariant):
        plan(classes((1, 1), (2, 15), (16, 100)) + classes((128, 10**6)))
    with pytest.raises(NotInvariant):  # M = 2 position-dependent: no class for decode blocks
        plan(classes((1, 1), (3, 15), (16, 10**6)))


def test_the_probed_plan_holds_on_this_machine(lm) -> None:
    torch.set_num_threads(1)
    rp = row_plan(lm.model)
    assert rp is not None, "no batch-invariant row grouping on this machine"
    w = lm.model.model.layers[0].mlp.down_proj.weight  # [576, 1536]
    x = torch.randn(1, w.shape[1]).expand(PROBE_ROWS[-1], -1).contiguous()
    with torch.inference_mode():
        ref = F.linear(x[:rp.wide], w)[0]
        for m in (rp.wide, rp.wide + 1, 37, 200):
            assert torch.equal(F.linear(x[:m], w)[m // 2], ref), f"M = {m} left the open class"
    assert probe([w]) == probe([w])  # deterministic
