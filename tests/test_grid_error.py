"""scripts/grid_error.py: the grids' relative errors on inputs whose answer is known."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from grid_error import grid_errors  # noqa: E402

from dq.errors import DQError  # noqa: E402


def test_split_helps_exactly_when_the_two_parts_differ_in_scale():
    torch.manual_seed(0)
    x = torch.randn(8, 16, 4, 4)
    x[:, 15:] *= 5  # one channel 5× wider: a shared grid spends its steps on it
    err = grid_errors([x], [x.clone()], split=15)
    assert err["learned"] == 0.0  # a "learned" quantizer that returns its input has no error
    assert err["8-bit"] < err["mse"] / 100  # 16× finer step: ~256× less error
    y = torch.randn(8, 16, 4, 4)  # both parts of one scale: splitting gains little
    same = grid_errors([y], [y], split=8)
    assert err["split"] < 0.3 * err["mse"] and same["split"] > 0.8 * same["mse"]
    assert err["rotated"] < 0.5 * err["mse"]  # a rotation spreads the wide channel over all of them
    with pytest.raises(DQError, match=r"split 16 must lie inside the layer's 16 input channels \(1..15\)"):
        grid_errors([x], [x], split=16)


@pytest.mark.parametrize("argv,message", [
    (["--student", "nowhere/student.safetensors", "--layers", "a=1"], "--student 'nowhere/student.safetensors' does not exist"),
    (["--student", __file__, "--layers", "conv_in"], "--layers 'conv_in' is not LAYER=SPLIT"),
])
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
    from grid_error import main
    from dq.errors import run_script
    with pytest.raises(SystemExit) as exit_:
        run_script(lambda: main(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
