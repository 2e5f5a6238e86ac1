"""A pipeline's parts besides the denoiser — VAE, text encoder, tokenizer — and tiny random-init pipelines.

``load_component`` builds a part from a pipeline folder's ``model_index.json`` entry
``[library, ClassName]`` (never from names). ``pipeline_archs`` are the tiny stand-ins of real
pipelines, built offline from a seed (``model=tiny_sd``: text-to-image latent diffusion with a CLIP
text encoder and a tokenizer whose vocabulary dq writes itself; ``model=tiny_ldm``: a latent UNet
with a VQ autoencoder). They are for tests and presets' smoke runs, never for numbers.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Callable

import torch

from dq.errors import DQError
from dq.models.diffusion_model import DiffusionModel
from dq.models.families import archs

# role → (model_index.json keys, library, supported classes)
ROLES: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "vae": (("vae", "vqvae"), "diffusers", ("AutoencoderKL", "VQModel")),
    "text_encoder": (("text_encoder",), "transformers", ("CLIPTextModel", "CLIPTextModelWithProjection",
                                                          "T5EncoderModel")),
    "tokenizer": (("tokenizer",), "transformers", ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer",
                                                    "T5TokenizerFast")),
}


def load_component(path: Path, index: dict[str, Any], role: str) -> Any:
    """The pipeline's ``role`` part (vae | text_encoder | tokenizer), or None when the pipeline has none."""
    keys, library, classes = ROLES[role]
    key = next((k for k in keys if isinstance(index.get(k), list) and index[k][1]), None)
    if key is None:
        return None
    lib, name = index[key][0], index[key][1]
    if lib != library or name not in classes:
        raise DQError(f"{str(path / 'model_index.json')!r}: {key} is [{lib!r}, {name!r}], which dq cannot load; "
                      f"supported: {', '.join(f'[{library!r}, {c!r}]' for c in classes)}")
    module = __import__(library)
    if library == "transformers":  # its per-load progress bars would flood the console
        module.utils.logging.disable_progress_bar()
    cls = getattr(module, name)
    part = cls.from_pretrained(path / key)
    return part.eval() if isinstance(part, torch.nn.Module) else part


# ---------------------------------------------------------------------------------- tiny pipelines
TOKENS = 16  # model_max_length of the tiny tokenizer


def tiny_tokenizer() -> Any:
    """A CLIP byte-level BPE tokenizer over lowercase letters, digits and punctuation (no merges):
    written here, so nothing is downloaded."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(chars)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TOKENS)


def _tiny_sd(seed: int) -> Any:
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel


    cls, kwargs = archs()["unet2d_cond"]
    torch.manual_seed(seed)
    unet = cls(**kwargs)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=kwargs["in_channels"],
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                        sample_size=2 * kwargs["sample_size"])
    tok = tiny_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=kwargs["cross_attention_dim"],
                                        intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1))
    sched = DDPMScheduler.from_config(dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                           beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1))
    return DiffusionModel(unet.eval(), sched, "tiny_sd", vae=vae.eval(), text_encoder=text.eval(), tokenizer=tok)


def _tiny_ldm(seed: int) -> Any:
    from diffusers import DDPMScheduler, VQModel


    cls, kwargs = archs()["unet2d_latent"]
    torch.manual_seed(seed)
    unet = cls(**kwargs)
    vq = VQModel(in_channels=3, out_channels=3, latent_channels=kwargs["in_channels"],
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, num_vq_embeddings=32,
                 vq_embed_dim=kwargs["in_channels"], sample_size=2 * kwargs["sample_size"])
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015,
                          beta_end=0.0195, clip_sample=False)
    return DiffusionModel(unet.eval(), sched, "tiny_ldm", vae=vq.eval())


# ---------------------------------------------------------------------------------- real-size stand-ins
# The published architectures at their real sizes, random-init (no weights needed): what a user's real
# pipeline costs in time and memory, offline. Never for quality numbers (random weights draw noise).
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215)  # SD-1.x's and DiT's sd-vae-ft-ema


def _real_sd15(seed: int) -> Any:
    """Stable Diffusion 1.5: the UNet family's ``sd15_unet`` (859.5M) at 64×64×4
    latents, AutoencoderKL (83.7M) to 512 px, CLIP ViT-L/14's text tower (123.1M, 77 tokens) and a
    tokenizer dq writes (the real vocabulary's size in the embedding table; single-character tokens)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


    cls, kwargs = archs()["sd15_unet"]
    torch.manual_seed(seed)
    unet = cls(**kwargs)
    vae = AutoencoderKL(**SD_VAE, sample_size=512)
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab = {"<|startoftext|>": 49406, "<|endoftext|>": 49407}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) - 2 + i for i, c in enumerate(chars)})
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))
    sched = DDPMScheduler.from_config(dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                           beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1))
    return DiffusionModel(unet.eval(), sched, "standin_sd15 (random init)", vae=vae.eval(), text_encoder=text.eval(),
                          tokenizer=tok)


def _real_ldm_bedroom(seed: int) -> Any:
    """LDM-4 LSUN-Bedroom: the UNet family's ``ldm_bedroom_unet`` (274M: 224 channels × (1, 2, 3, 4), attention
    at 32/16/8, 32-channel heads) in a VQ-f4 autoencoder's 64×64×3 latent space (VQModel, 8192 codes), 256 px."""
    from diffusers import DDPMScheduler, VQModel


    cls, kwargs = archs()["ldm_bedroom_unet"]
    torch.manual_seed(seed)
    unet = cls(**kwargs)
    vq = VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(128, 256, 512),
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 layers_per_block=2, norm_num_groups=32, num_vq_embeddings=8192, vq_embed_dim=3, sample_size=256)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015,
                          beta_end=0.0195, clip_sample=False)
    return DiffusionModel(unet.eval(), sched, "standin_ldm_bedroom (random init)", vae=vq.eval())


def _real_dit_xl2(seed: int) -> Any:
    """DiT-XL/2 at 256 px: the DiT family's ``dit_xl2`` (1,000 classes, learned variance; 749.8M parameters in
    diffusers, which keeps an embedder per block) on 32×32×4 latents with the sd-vae-ft-ema AutoencoderKL (83.7M)."""
    from diffusers import AutoencoderKL, DDPMScheduler


    cls, kwargs = archs()["dit_xl2"]
    torch.manual_seed(seed)
    dit = cls(**kwargs)
    vae = AutoencoderKL(**SD_VAE, sample_size=256)
    return DiffusionModel(dit.eval(), DDPMScheduler(num_train_timesteps=1000), "standin_dit_xl2 (random init)",
                          vae=vae.eval())


def pipeline_archs() -> dict[str, Callable[[int], Any]]:
    """Named random-init pipelines: arch → (seed → DiffusionModel). ``sd``, ``ldm``: tiny (tests);
    ``sd15``, ``ldm_bedroom``, ``dit_xl2_256``: the real architectures at their real sizes."""
    return {"sd": _tiny_sd, "ldm": _tiny_ldm, "sd15": _real_sd15, "ldm_bedroom": _real_ldm_bedroom,
            "dit_xl2_256": _real_dit_xl2}


def save_pipeline(model: Any, folder: Path) -> Path:
    """Write a DiffusionModel as a diffusers pipeline folder (components + model_index.json)."""
    folder = Path(folder)
    index: dict[str, Any] = {"_class_name": "DiffusionPipeline"}
    parts = {"unet": model.denoiser, "scheduler": model.scheduler, "vae": model.vae,
             "text_encoder": model.text_encoder, "tokenizer": model.tokenizer}
    for key, part in parts.items():
        if part is None:
            continue
        part.save_pretrained(folder / key)
        index[key] = ["transformers" if key in ("text_encoder", "tokenizer") else "diffusers", type(part).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
