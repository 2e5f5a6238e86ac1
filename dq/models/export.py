"""A deployable student: a folder in the diffusers ``save_pretrained`` spirit, nothing pickled.

    config.json                  the denoiser's diffusers config (``_class_name`` included)
    scheduler_config.json        the noise schedule it was trained with
    quantization_config.json     format version, method and bits, per-layer bits and shapes, the raw
                                 timesteps of the per-step tables, provenance (teacher, command)
    model.safetensors            integer weights packed at their bit-width (two 4-bit values per byte),
                                 per-channel Δ_w / z_w, per-step Δ_x / z_x tables, Weight-Dilation input
                                 scales that were not folded, and every float tensor that stays float

``load_export(dir, runtime)`` rebuilds it without teacher or calibration: ``reference`` computes
exactly the fake-quant student (bitwise: the weights are the dequantized integers the fake quantizer
produced), ``int8`` runs every quantized conv / linear on oneDNN's u8 × s8 kernels (dq.quant.int8).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dq.errors import DQError, choice_error
from dq.models.families import model_class
from dq.models.load import DiffusionModel
from dq.models.student import prepare
from dq.quant.config import QuantConfig
from dq.quant.fake_quant import DELTA_MIN, qmax_of
from dq.quant.layers import iter_quant_layers

FORMAT = "dq-export-v1"
RUNTIMES = ("reference", "int8")
WEIGHTS = "model.safetensors"


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers in [0, 2^bits) → uint8 bytes: two values per byte when bits ≤ 4 (low nibble first)."""
    flat = q.reshape(-1).to(torch.uint8)
    if bits > 4:
        return flat.clone()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack(packed: torch.Tensor, bits: int, shape: list[int]) -> torch.Tensor:
    n = math.prod(shape)
    if bits > 4:
        return packed[:n].reshape(shape)
    out = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)
    return out[:n].reshape(shape)


def _int_weight(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_q as uint8, Δ_w clamped, z_w rounded): the integers of the layer's fake weight quantizer."""
    wq = layer.weight_quant
    qmax = qmax_of(wq.bits)
    shape = [-1] + [1] * (layer.weight.dim() - 1)
    delta = wq.delta.detach().clamp_min(DELTA_MIN)
    z = torch.round(wq.zero_point.detach()).clamp(0, qmax)
    q = torch.clamp(torch.round(layer.weight.detach() * delta.view(shape).reciprocal()) + z.view(shape), 0, qmax)
    return q.to(torch.uint8), delta, z


def export_student(student: DiffusionModel, meta: dict[str, Any], out: str | Path) -> Path:
    """Write ``student`` (a prepared, trained denoiser) as an export folder; ``meta`` is its checkpoint
    metadata (quant, method, sampler, teacher, run_config). Written to a temporary folder, then renamed."""
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = student.denoiser
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    layers = {}
    for name, layer in iter_quant_layers(model):
        q, delta, z = _int_weight(layer)
        bits = layer.weight_quant.bits
        del tensors[f"{name}.weight"]
        tensors[f"{name}.weight_packed"] = pack(q, bits)
        tensors[f"{name}.weight_quant.delta"], tensors[f"{name}.weight_quant.zero_point"] = delta.clone(), z.clone()
        layers[name] = {"kind": type(layer).__name__, "w_bits": bits, "shape": list(layer.weight.shape),
                        "a_bits": None if layer.act_quant is None else layer.act_quant.bits}
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp / WEIGHTS))
    config = {"_class_name": type(model).__name__, **{k: v for k, v in dict(model.config).items()
                                                      if not k.startswith("_")}}
    (tmp / "config.json").write_text(json.dumps(config, indent=1, default=list))
    (tmp / "scheduler_config.json").write_text(json.dumps(dict(student.scheduler.config), indent=1, default=list))
    qc = {"format": FORMAT, "quant": meta["quant"], "method": meta.get("method"), "sampler": meta.get("sampler"),
          "timesteps": meta["quant"]["timesteps"], "layers": layers,
          "provenance": {"teacher": meta.get("teacher"), "command": meta.get("command"),
                         "run_config": meta.get("run_config")}}
    (tmp / "quantization_config.json").write_text(json.dumps(qc, indent=1, default=list))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def is_export(path: str | Path) -> bool:
    return (Path(path) / "quantization_config.json").is_file()


def load_export(path: str | Path, runtime: str = "reference") -> tuple[DiffusionModel, dict[str, Any]]:
    """(the exported student as a DiffusionModel on ``runtime``, its quantization_config)."""
    if runtime not in RUNTIMES:
        raise choice_error("runtime", runtime, RUNTIMES)
    path = Path(path)
    try:
        qc = json.loads((path / "quantization_config.json").read_text())
        config = json.loads((path / "config.json").read_text())
        tensors = load_file(str(path / WEIGHTS))
        scheduler = DDPMScheduler.from_config(json.loads((path / "scheduler_config.json").read_text()))
    except (OSError, ValueError, SafetensorError) as e:
        raise DQError(f"{str(path)!r} is not a readable dq export ({str(e).splitlines()[0]}); re-run export.py") from None
    if qc.get("format") != FORMAT:
        raise DQError(f"{str(path)!r} is not a dq export (expected format {FORMAT!r}, found {qc.get('format')!r})")
    quant = {**qc["quant"], "timesteps": tuple(qc["quant"]["timesteps"]), "skip": tuple(qc["quant"]["skip"]), "a8_layers": tuple(qc["quant"].get("a8_layers", ()))}
    model = prepare(model_class(config.pop("_class_name")).from_config(config), QuantConfig(**quant))
    for name, info in qc["layers"].items():
        q = unpack(tensors.pop(f"{name}.weight_packed"), info["w_bits"], info["shape"]).float()
        shape = [-1] + [1] * (len(info["shape"]) - 1)
        delta, z = tensors[f"{name}.weight_quant.delta"], tensors[f"{name}.weight_quant.zero_point"]
        tensors[f"{name}.weight"] = (q - z.view(shape)) * delta.view(shape)  # the fake quantizer's own output
    model.load_state_dict(tensors, strict=True)
    model.eval().requires_grad_(False)
    for _, layer in iter_quant_layers(model):
        layer.weight_quant.enabled = False  # weights are already on their grid (re-quantizing is the identity)
    if runtime == "int8":
        from dq.quant.int8 import available, to_int8

        if not available():
            raise DQError("runtime=int8 needs torch's oneDNN int8 ops (an x86 CPU build of torch); use runtime=reference")
        for _, layer in iter_quant_layers(model):
            layer.weight_quant.enabled = True
        to_int8(model)
    return DiffusionModel(model, scheduler, f"export:{path}:{runtime}"), qc


def export_from_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """The export folder of a student.safetensors a quantize run wrote."""
    from dq.models.checkpoint import load_student

    student, meta = load_student(ckpt)
    return export_student(student, meta, out)


__all__ = ["export_student", "load_export", "export_from_checkpoint", "is_export", "pack", "unpack", "RUNTIMES"]
