"""A deployable student: a folder in the diffusers ``save_pretrained`` spirit, nothing pickled.

    config.json                  the denoiser's diffusers config (``_class_name`` included)
    scheduler_config.json        the noise schedule it was trained with
    quantization_config.json     format version, method and bits, per-layer bits and shapes, the raw
                                 timesteps of the per-step tables, provenance (teacher, command)
    model.safetensors            integer weights packed at their bit-width (two 4-bit values per byte),
                                 per-channel Δ_w / z_w, per-step Δ_x / z_x tables, Weight-Dilation input
                                 scales that were not folded, and every float tensor that stays float
    vae/, text_encoder/, tokenizer/  the rest of the pipeline where the model has one (save_pretrained
                                 folders), listed under ``pipeline`` in quantization_config.json

``load_export(dir, runtime)`` rebuilds it without teacher or calibration: ``reference`` computes
exactly the fake-quant student (bitwise: the weights are the dequantized integers the fake quantizer
produced), ``int8`` runs every quantized conv / linear on oneDNN's u8 × s8 kernels (dq.quant.int8),
``compiled`` runs those layers inside one inductor graph per batch shape (dq.quant.compiled), and
``auto`` (the default) picks the fastest of them this machine supports and logs which. Everything a
file declares is checked against the rest before use: a tampered or mismatched export is one error line.
``load_pipeline(dir)`` returns a ready diffusers pipeline around the quantized denoiser.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.activations import GELU
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dq.errors import DQError, choice_error
from dq.models.attention import QuantAttnProcessor
from dq.models.components import load_component
from dq.models.families import model_class
from dq.models.load import DiffusionModel
from dq.models.checkpoint import PARTS
from dq.models.student import prepare
from dq.quant.config import QuantConfig
from dq.quant.compiled import compile_int8
from dq.quant.fake_quant import DELTA_MIN, qmax_of
from dq.quant.int8 import Int8Linear, available as int8_available, to_int8
from dq.quant.layers import iter_quant_layers
from dq.quant.qattention import tiles_expected

FORMAT = "dq-export-v1"
RUNTIMES = ("auto", "reference", "int8", "compiled")
WEIGHTS = "model.safetensors"
log = logging.getLogger("dq")


def can_compile() -> bool:
    """Whether torch.compile can build CPU kernels here: inductor needs a C++ compiler."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def compiled_dtype() -> torch.dtype:
    """The float dtype between the integer kernels of runtime=compiled: bfloat16 where the CPU has bf16
    instructions (AVX512-BF16 or AMX), else float32. ``DQ_COMPILED_DTYPE=float32`` overrides."""
    want = os.environ.get("DQ_COMPILED_DTYPE")
    if want is not None:
        if want not in ("float32", "bfloat16"):
            raise choice_error("DQ_COMPILED_DTYPE", want, ("float32", "bfloat16"))
        return getattr(torch, want)
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if bf16 else torch.float32


def best_runtime() -> tuple[str, str]:
    """(the fastest runtime this machine supports, why): compiled > int8 > reference (docs/runtime.md)."""
    if not int8_available():
        return "reference", "this torch build has no oneDNN int8 ops (not an x86 CPU build)"
    if not can_compile():
        return "int8", "no C++ compiler for torch.compile (install g++ for runtime=compiled)"
    return "compiled", "oneDNN int8 ops and a C++ compiler for torch.compile are present"


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
    metadata (quant, method, sampler, teacher, run_config). The student's VAE, text encoder and tokenizer,
    where it has them, are written beside it (``vae/``, ``text_encoder/``, ``tokenizer/``, listed under
    ``pipeline`` in quantization_config.json), so the export alone samples images. Written to a temporary
    folder, then renamed."""
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
    for role in PARTS:  # the rest of the pipeline, as diffusers / transformers folders (safetensors + JSON)
        part = getattr(student, role)
        if part is not None:
            part.save_pretrained(tmp / role)
            library = "transformers" if role in ("text_encoder", "tokenizer") else "diffusers"
            qc.setdefault("pipeline", {})[role] = [library, type(part).__name__]
    (tmp / "quantization_config.json").write_text(json.dumps(qc, indent=1, default=list))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def is_export(path: str | Path) -> bool:
    return (Path(path) / "quantization_config.json").is_file()


def resolve_runtime(runtime: str) -> str:
    """``runtime`` checked against this machine; ``auto`` → :func:`best_runtime`, logged once per call."""
    if runtime not in RUNTIMES:
        raise choice_error("runtime", runtime, RUNTIMES)
    if runtime == "auto":
        runtime, why = best_runtime()
        log.info("runtime=auto: %s (%s)", runtime, why)
    elif runtime != "reference" and not int8_available():
        raise DQError(f"runtime={runtime} needs torch's oneDNN int8 ops (an x86 CPU build of torch); "
                      "use runtime=reference")
    return runtime


def use_runtime(model: torch.nn.Module, runtime: str) -> None:
    """Put a prepared student (in eval mode, on the CPU) on a resolved runtime, in place: ``int8`` swaps its
    quantized layers for integer kernels, ``compiled`` also runs them in one compiled graph."""
    if runtime == "reference":
        return
    for _, layer in iter_quant_layers(model):
        layer.weight_quant.enabled = True  # the int8 layers read the integers from the fake quantizer
    to_int8(model)
    fuse_gelu(model)
    if runtime == "compiled":
        wide = tiles_expected()  # attention through one fused kernel (same C++ toolchain): narrow heads, any on the tiles
        for m in model.modules():
            if isinstance(m, QuantAttnProcessor):
                m.fused, m.wide = True, wide
        compile_int8(model, compiled_dtype())


def _applied(x: torch.Tensor) -> torch.Tensor:
    return x


def fuse_gelu(model: torch.nn.Module) -> int:
    """diffusers' GELU modules (a projection, then GELU: DiT's and PixArt's MLPs) whose projection runs as a plain
    int8 linear: the GELU becomes that matmul's oneDNN post-op, applied to its float result (torch's own int8 flow
    fuses it the same way), and the module only projects. A projection with halved weights, or a split or low-rank
    one, keeps the separate GELU. Returns how many were fused."""
    fused = 0
    for m in model.modules():
        if isinstance(m, GELU) and isinstance(m.proj, Int8Linear) and not m.proj.halved:
            m.proj.fuse_post_op("gelu_tanh" if m.approximate == "tanh" else "gelu")
            m.gelu = _applied  # shadows GELU.gelu on this instance: the projection applied it already
            fused += 1
    return fused


def _check_tensors(path: Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor],
                   qc: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor and layer entry the export declares agrees with the model its configs build: one line
    naming the first disagreement otherwise (a hand-edited or mixed-up export must not sample silently).
    Returns each layer's unpacked integer weight."""
    want = model.state_dict()
    layers = qc["layers"]
    built = dict(iter_quant_layers(model))
    if set(layers) != set(built):
        odd = sorted(set(layers) ^ set(built))[0]
        raise DQError(f"{path}: quantized layer {odd!r} is {'not built' if odd in layers else 'not listed'} by "
                      f"quantization_config.json + config.json; the export's files do not belong together")
    t = len(qc["timesteps"])
    unpacked = {}
    for name, info in layers.items():
        layer, where = built[name], f"{path}: layer {name!r}"
        a_bits = None if layer.act_quant is None else layer.act_quant.bits
        if (info["w_bits"], info["a_bits"]) != (layer.weight_quant.bits, a_bits):
            raise DQError(f"{where} is declared W{info['w_bits']}A{info['a_bits']} but quant "
                          f"{qc['quant']['w_bits']}/{qc['quant']['a_bits']} builds it W{layer.weight_quant.bits}A{a_bits}")
        if list(info["shape"]) != list(layer.weight.shape):
            raise DQError(f"{where} has weight shape {info['shape']} but config.json builds {list(layer.weight.shape)}")
        packed = tensors.get(f"{name}.weight_packed")
        n = math.prod(info["shape"])
        if packed is None or packed.numel() != (-(-n // 2) if info["w_bits"] <= 4 else n):
            raise DQError(f"{where}: packed weight missing or of the wrong length for shape {info['shape']}")
        qmax = qmax_of(info["w_bits"])
        codes = unpack(packed, info["w_bits"], info["shape"])
        z = tensors.get(f"{name}.weight_quant.zero_point")
        if int(codes.max()) > qmax or z is None or bool(((z < 0) | (z > qmax) | (z != z.round())).any()):
            raise DQError(f"{where}: integer weights or zero points outside the {info['w_bits']}-bit range 0..{qmax}")
        unpacked[name] = codes
    for key, value in tensors.items():
        if key.endswith(".weight_packed"):
            continue
        if key not in want:
            raise DQError(f"{path}: tensor {key!r} has no place in the model config.json builds")
        if tuple(value.shape) != tuple(want[key].shape):
            table = key.endswith((".delta", ".zero_point", ".log_scale", ".zp_offset")) and ".weight_quant." not in key
            hint = (f" (tables hold one row per timestep or per knot; quantization_config.json lists {t} timesteps)"
                    if table else "")
            raise DQError(f"{path}: tensor {key!r} has shape {list(value.shape)}, the model expects "
                          f"{list(want[key].shape)}{hint}")
    return unpacked


def load_export(path: str | Path, runtime: str = "auto") -> tuple[DiffusionModel, dict[str, Any]]:
    """(the exported student as a DiffusionModel on ``runtime``, its quantization_config, with the runtime
    used under ``"runtime"``). ``auto`` picks :func:`best_runtime` and logs which."""
    runtime = resolve_runtime(runtime)
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
    if list(qc["quant"].get("timesteps", [])) != list(qc.get("timesteps", [])):
        raise DQError(f"{path}: quantization_config.json lists {len(qc.get('timesteps', []))} timesteps but its quant "
                      f"section {len(qc['quant'].get('timesteps', []))}; the two must be the same schedule")
    quant = {**qc["quant"], "timesteps": tuple(qc["quant"]["timesteps"]), "skip": tuple(qc["quant"]["skip"]), "a8_layers": tuple(qc["quant"].get("a8_layers", ())),
             "lowrank_layers": tuple(qc["quant"].get("lowrank_layers", ()))}
    try:
        model = prepare(model_class(config.pop("_class_name")).from_config(config), QuantConfig(**quant))
    except (TypeError, ValueError) as e:
        raise DQError(f"{path}: config.json and quantization_config.json do not build a model "
                      f"({str(e).splitlines()[0]})") from None
    codes = _check_tensors(path, model, tensors, qc)
    for name, info in qc["layers"].items():
        del tensors[f"{name}.weight_packed"]
        q = codes[name].float()
        shape = [-1] + [1] * (len(info["shape"]) - 1)
        delta, z = tensors[f"{name}.weight_quant.delta"], tensors[f"{name}.weight_quant.zero_point"]
        tensors[f"{name}.weight"] = (q - z.view(shape)) * delta.view(shape)  # the fake quantizer's own output
    model.load_state_dict(tensors, strict=True)
    model.eval().requires_grad_(False)
    for _, layer in iter_quant_layers(model):
        layer.weight_quant.enabled = False  # weights are already on their grid (re-quantizing is the identity)
    use_runtime(model, runtime)
    parts = {role: load_component(path, qc["pipeline"], role) for role in qc.get("pipeline", {})}
    return DiffusionModel(model, scheduler, f"export:{path}:{runtime}", **parts), {**qc, "runtime": runtime}


def load_pipeline(path: str | Path, runtime: str = "auto") -> Any:
    """A ready diffusers pipeline (DDIM / LDM / StableDiffusion / DiT / PixArt-α, by the model's family)
    around the exported quantized denoiser, with a DDIM scheduler on the model's noise schedule. Call it
    with the step count the student was trained for (``quantization_config.json`` → ``sampler.steps``):
    its per-step tables hold those timesteps, and another count fails naming them."""
    model, qc = load_export(path, runtime)
    steps = (qc.get("sampler") or {}).get("steps")
    log.info("pipeline around %s; sample with num_inference_steps=%s", path, steps)
    return model.family.pipeline(model, DDIMScheduler.from_config(model.scheduler.config))


def export_from_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """The export folder of a student.safetensors a quantize run wrote."""
    from dq.models.checkpoint import load_student

    student, meta = load_student(ckpt)
    return export_student(student, meta, out)


__all__ = ["export_student", "load_export", "load_pipeline", "export_from_checkpoint", "is_export", "pack", "unpack", "RUNTIMES",
           "best_runtime", "resolve_runtime", "use_runtime"]
