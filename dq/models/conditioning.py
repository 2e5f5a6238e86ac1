"""What each generated image is conditioned on: ``cond_fn_for(teacher, seed) -> (indices -> (cond, uncond))``.

Generic over the family's ``Conditioning.kind``, never over model classes. Image i of a run gets:

- text: ``prompts[i % len(prompts)]`` (``data.prompts``, default ``dq/assets/prompts.txt``), encoded by
  the pipeline's own tokenizer and text encoder as diffusers' StableDiffusionPipeline.encode_prompt
  does (padding to ``model_max_length``, truncation, last hidden state); unconditional = the empty
  prompt's encoding. Without a text encoder (tiny test UNets) a stand-in: a fixed Gaussian embedding
  drawn from (seed, i), zeros unconditional — ``conditioning_notes`` says so in results.json.
- class: a label drawn from a generator seeded with (seed, i) alone (so batch size and sharding do
  not matter); unconditional = the model's null class, None when it defines none (no guidance).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional

import torch

from dq.errors import DQError
from dq.models.load import ASSETS, DiffusionModel

PROMPTS_FILE = ASSETS / "prompts.txt"
PROMPT_TOKENS = 8  # tokens of the stand-in embedding
CondFn = Callable[[torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor]]]


def read_prompts(path: Optional[str]) -> tuple[str, ...]:
    """The prompts of ``data.prompts`` (one per line, blank lines skipped); None: the shipped list."""
    p = Path(path).expanduser() if path else PROMPTS_FILE
    if not p.is_file():
        raise DQError(f"data.prompts={path!r} does not exist; give a text file with one prompt per line "
                      f"(or drop it for the shipped list {PROMPTS_FILE})")
    prompts = tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    if not prompts:
        raise DQError(f"data.prompts={path!r} holds no prompts; write one prompt per line")
    return prompts


def with_prompts(teacher: DiffusionModel, path: Optional[str]) -> DiffusionModel:
    """``teacher`` with the prompts of ``data.prompts`` attached when it encodes text (unchanged otherwise)."""
    spec = teacher.conditioning
    if spec is not None and spec.kind == "text" and teacher.text_encoder is not None:
        teacher.prompts = read_prompts(path)
    return teacher


def prompt_of(teacher: DiffusionModel, indices: torch.Tensor) -> list[str] | None:
    """The prompt text of each image index (CLIP score), None when the model is not prompt-driven."""
    if teacher.prompts is None:
        return None
    return [teacher.prompts[int(i) % len(teacher.prompts)] for i in indices]


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: torch.nn.Module, prompts: list[str]) -> torch.Tensor:
    """[len(prompts), L, D] encoder hidden states, as StableDiffusionPipeline.encode_prompt computes them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    device = next(text_encoder.parameters()).device
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    mask = ids.attention_mask.to(device) if use_mask else None
    return text_encoder(ids.input_ids.to(device), attention_mask=mask)[0]


def standin(teacher: DiffusionModel) -> bool:
    """Whether a text-conditional teacher runs on stand-in embeddings (it has no text encoder)."""
    spec = teacher.conditioning
    return spec is not None and spec.kind == "text" and (teacher.text_encoder is None or teacher.tokenizer is None)


def conditioning_notes(teacher: DiffusionModel) -> list[str]:
    """What the run was conditioned on, for results.json (empty for an unconditional teacher)."""
    spec = teacher.conditioning
    if spec is None:
        return []
    if standin(teacher):
        return ["conditioning: stand-in Gaussian prompt embeddings (dq.models.conditioning): this model has no "
                "text encoder and tokenizer, so calibration, distillation and sampling use random embeddings"]
    if spec.kind == "text":
        return [f"conditioning: {len(teacher.prompts or read_prompts(None))} prompts (image i: prompt i mod n), "
                f"encoded by the pipeline's {type(teacher.text_encoder).__name__}; unconditional = empty prompt"]
    null = "no null class: unguided" if spec.null_class is None else f"null class {spec.null_class} for guidance"
    return [f"conditioning: class labels 0..{spec.num_classes - 1} drawn per image from (seed, index); {null}"]


def conditioning_key(teacher: DiffusionModel) -> dict[str, str]:
    """What determines the conditioning beyond the denoiser and seed (calibration cache key); {} if none."""
    spec = teacher.conditioning
    if spec is None:
        return {}
    if spec.kind == "class":
        return {"cond": f"class:{spec.num_classes}:{spec.null_class}"}
    if standin(teacher):
        return {"cond": "text:standin"}
    h = hashlib.sha256("\n".join(teacher.prompts or read_prompts(None)).encode())
    for name, p in teacher.text_encoder.state_dict().items():
        flat = p.detach().flatten().float().cpu()
        h.update(name.encode() + flat[:: max(1, flat.numel() // 64)].numpy().tobytes())
    h.update(str(tokenizer_ids(teacher.tokenizer)).encode())
    return {"cond": f"text:{h.hexdigest()[:16]}"}


def tokenizer_ids(tokenizer) -> list[int]:
    return tokenizer(["a photograph"], padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True).input_ids[0]


def check_guidance(teacher: DiffusionModel, guidance_scale: float, field: str) -> None:
    """Classifier-free guidance needs an unconditional input: refuse it for a model without one."""
    spec = teacher.conditioning
    if guidance_scale != 1.0 and spec is not None and spec.kind == "class" and spec.null_class is None:
        raise DQError(f"{field}={guidance_scale} asks for classifier-free guidance, but {teacher.name} defines no "
                      f"null class to guide against; use {field}=1.0")


def cond_fn_for(teacher: DiffusionModel, seed: int) -> CondFn | None:
    """``indices -> (cond, uncond)`` for a conditional teacher, None for an unconditional one."""
    spec = teacher.conditioning
    if spec is None:
        return None
    if spec.kind == "class":
        def labels(indices: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
            cond = torch.cat([torch.randint(spec.num_classes, (1,), generator=torch.Generator().manual_seed(
                seed * 1_000_003 + int(i) + 17)) for i in indices])
            return cond, None if spec.null_class is None else torch.full_like(cond, spec.null_class)
        return labels
    if standin(teacher):
        dim = spec.dim

        def fn(indices: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
            cond = torch.stack([torch.randn(PROMPT_TOKENS, dim, generator=torch.Generator().manual_seed(
                seed * 1_000_003 + int(i) + 17)) for i in indices])
            return cond, torch.zeros_like(cond)
        return fn
    width = teacher.text_encoder.config.hidden_size
    if spec.dim is not None and width != spec.dim:
        raise DQError(f"{teacher.name}: the text encoder's hidden size {width} does not match the denoiser's "
                      f"cross-attention width {spec.dim}; the pipeline's components do not belong together")
    prompts = teacher.prompts or read_prompts(None)
    empty: list[torch.Tensor] = []

    def text(indices: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not empty:  # the empty prompt, encoded once
            empty.append(encode_prompts(teacher.tokenizer, teacher.text_encoder, [""]))
        cond = encode_prompts(teacher.tokenizer, teacher.text_encoder, [prompts[int(i) % len(prompts)] for i in indices])
        return cond, empty[0].expand(len(indices), -1, -1)
    return text
