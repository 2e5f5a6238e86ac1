"""scripts/quant_ablation.py: which quantizers a row switches off, and its errors."""
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from quant_ablation import ablate, main  # noqa: E402

from dq.errors import DQError  # noqa: E402
from dq.models.load import build_arch  # noqa: E402
from dq.models.student import calibrate, prepare  # noqa: E402
from dq.quant.config import QuantConfig  # noqa: E402
from dq.quant.layers import iter_quant_layers  # noqa: E402


def test_rows_switch_off_exactly_their_quantizers():
    torch.manual_seed(0)
    teacher = build_arch("unet2d", seed=0)
    fam = teacher.family
    timesteps = (900, 500, 100)
    student = prepare(build_arch("unet2d", seed=0).denoiser, QuantConfig(w_bits=4, a_bits=4, timesteps=timesteps))
    c, h, w = teacher.sample_shape
    x, t = torch.randn(4, c, h, w), torch.tensor([900, 500, 100, 900])
    calibrate(student, [(x, t, None)], "minmax")
    with torch.no_grad():
        ref = fam.forward(teacher.denoiser, x, t)
        out = {row: fam.forward(ablate(student, row), x, t) for row in ("student", "weights_only", "acts_only", "float")}
    assert torch.allclose(out["float"], ref, atol=1e-5)  # nothing quantized: the float model
    errs = {row: float((o - ref).pow(2).mean()) for row, o in out.items()}
    assert errs["student"] > errs["weights_only"] > errs["float"] and errs["acts_only"] > errs["float"]
    assert ablate(student, "student") is not student  # a copy: the student itself is untouched


def test_bad_rows_and_missing_student_are_one_line(tmp_path):
    with pytest.raises(DQError, match="row 'fp' is not a student row; valid choices: student, weights_only"):
        ablate(torch.nn.Linear(2, 2), "fp")
    with pytest.raises(DQError, match=r"--rows 'w8' is not a row; valid choices: fp, student"):
        main(["--student", str(tmp_path / "s.safetensors"), "--rows", "w8"])
    with pytest.raises(DQError, match=r"--student .*s.safetensors' does not exist"):
        main(["--student", str(tmp_path / "s.safetensors")])


def test_per_block_copies_switch_off_only_that_blocks_activations():
    from quant_ablation import block_ablations
    from dq.quant.quantizers import TemporalActQuantizer, WeightQuantizer

    student = prepare(build_arch("unet2d", seed=0).denoiser, QuantConfig(w_bits=4, a_bits=4, timesteps=(900, 100)))
    copies = block_ablations(student)
    blocks = [k for k in copies if k not in ("student", "weights_only")]
    assert blocks[0] == "stem" and blocks[-1] == "head" and "mid" in blocks
    off = {}
    for k in blocks:
        m = copies[k]
        assert all(q.enabled for q in m.modules() if isinstance(q, WeightQuantizer))
        off[k] = {n for n, q in m.named_modules() if isinstance(q, TemporalActQuantizer) and not q.enabled}
        assert off[k], k  # every block reads quantized activations somewhere
    names = [n for n, q in student.named_modules() if isinstance(q, TemporalActQuantizer)]
    seen = [n for k in blocks for n in off[k]]
    assert sorted(seen) == sorted(names)  # each activation quantizer belongs to exactly one block
    assert all(q.enabled for q in copies["student"].modules() if isinstance(q, TemporalActQuantizer))


def test_kind_ablations_within_a_block_and_everywhere():
    from quant_ablation import kind_ablations
    from dq.quant.quantizers import TemporalActQuantizer

    student = prepare(build_arch("unet2d", seed=0).denoiser, QuantConfig(w_bits=4, a_bits=4, timesteps=(900, 100)))
    copies = kind_ablations(student, "up.1")
    off = {k: {n for n, q in m.named_modules() if isinstance(q, TemporalActQuantizer) and not q.enabled}
           for k, m in copies.items()}
    assert off["student"] == set()
    assert off["conv1 in up.1"] and all(n.startswith("up_blocks.1.") and ".conv1." in n for n in off["conv1 in up.1"])
    assert off["conv1 in up.1"] < off["conv1 everywhere"]  # the same kind elsewhere stays quantized in the block row
    assert any(n.startswith("down_blocks.") for n in off["conv1 everywhere"])
    with pytest.raises(DQError, match=r"--within 'up.9' is not a block of this model; valid choices: stem, "):
        kind_ablations(student, "up.9")


def test_float_acts_rows_pick_a_block_or_a_kind_in_it():
    from quant_ablation import float_acts_row
    from dq.quant.quantizers import TemporalActQuantizer

    student = prepare(build_arch("unet2d", seed=0).denoiser, QuantConfig(w_bits=4, a_bits=4, timesteps=(900,)))
    off = lambda m: {n for n, q in m.named_modules() if isinstance(q, TemporalActQuantizer) and not q.enabled}  # noqa: E731
    name, kind = float_acts_row(student, "up.1:conv1")
    block_name, block = float_acts_row(student, "up.1")
    assert (name, block_name) == ("acts float: conv1 in up.1", "acts float: up.1")
    assert off(kind) and off(kind) < off(block)
    with pytest.raises(DQError, match=r"--float-acts 'up.1:conv9': no layer kind 'conv9' in up.1; valid kinds: conv, conv1, conv2, conv_shortcut, k_quant, prob_quant, q_quant, time_emb_proj, to_k"):
        float_acts_row(student, "up.1:conv9")
    with pytest.raises(DQError, match=r"--within 'nope' is not a block of this model"):
        float_acts_row(student, "nope:conv1")
    with pytest.raises(DQError, match=r"--float-acts 'nope' is not a block of this model; valid choices: stem, "):
        float_acts_row(student, "nope")


def test_float_acts_embedding_row_is_the_student_quantize_embedding_acts_false_would_build():
    from quant_ablation import float_acts_row
    from dq.quant.quantizers import TemporalActQuantizer

    qcfg = QuantConfig(w_bits=4, a_bits=4, timesteps=(900,))
    student = prepare(build_arch("unet2d", seed=0).denoiser, qcfg)
    name, row = float_acts_row(student, "embedding")
    off = {n.removesuffix(".act_quant") for n, q in row.named_modules() if isinstance(q, TemporalActQuantizer)
           and not q.enabled}
    built = prepare(build_arch("unet2d", seed=0).denoiser, replace(qcfg, quantize_embedding_acts=False))
    float_inputs = {n for n, layer in iter_quant_layers(built) if layer.act_quant is None}
    assert name == "acts float: embedding branch" and off and off == float_inputs
