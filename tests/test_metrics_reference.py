"""Metrics on real data: a reference image folder or its .npz statistics (metrics.reference), the student
against the FP teacher (fid_to_fp, psnr_to_fp, ssim_to_fp) and CLIP score with a local CLIP folder."""
import copy
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from dq.data.digits import DataConfig, DigitsDataModule
from dq.errors import DQError
from dq.evaluation import Protocol, evaluate_models
from dq.metrics.features import build_backend, extract
from dq.metrics.image_metrics import MetricsConfig, score
from dq.metrics.pairwise import PSNR_CAP, ClipScorer, psnr_ssim
from dq.metrics.real_data import folder_batches, folder_features, folder_key, read_stats
from dq.metrics.reference import cached_metrics, reference_path
from dq.metrics.scoring import Scorer
from dq.models.load import build_arch
from dq.models.sampling import SamplerConfig


def reference_stats(argv):
    """scripts/reference_stats.py's main, run in this process."""
    spec = importlib.util.spec_from_file_location("reference_stats", ROOT / "scripts" / "reference_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def to_u8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def write_folder(folder, images):
    """Digits as files of mixed kinds: 16×16 grayscale PNGs, 24×24 RGB PNGs (upscaled), a few JPEGs in a subfolder."""
    (folder / "sub").mkdir(parents=True)
    for i, x in enumerate(images):
        a = to_u8(x[0])
        if i % 3 == 0:
            Image.fromarray(a, "L").convert("RGB").resize((24, 24), Image.BILINEAR).save(folder / f"{i:03d}.png")
        elif i % 7 == 0:
            Image.fromarray(a, "L").save(folder / "sub" / f"{i:03d}.jpg", quality=95)
        else:
            Image.fromarray(a, "L").save(folder / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule()
    dm.setup()
    return dm


def test_folder_and_npz_references_give_the_same_fid(tmp_path, digits, caplog, capsys):
    folder, cache = tmp_path / "real", tmp_path / "cache"
    write_folder(folder, digits.heldout_images[:60])
    npz = tmp_path / "stats.npz"
    assert reference_stats([str(folder), str(npz), "--backend", "digits", "--cache-dir", str(cache)]) == 0
    assert "mu [64]" in capsys.readouterr().out

    fake = digits.train_images[:50]
    by_dir = score(cached_metrics(MetricsConfig(reference=str(folder)), DataConfig(), cache, channels=1), fake)
    by_npz = score(cached_metrics(MetricsConfig(reference=str(npz)), DataConfig(), cache, channels=1), fake)
    assert by_dir["fid"] > 1.0  # other digits than the reference: a real distance, not a trivial 0
    assert by_npz["fid"] == pytest.approx(by_dir["fid"], rel=1e-7, abs=1e-9)
    assert by_dir["n_real"] == by_npz["n_real"] == 60
    assert by_dir["kid"] is not None and by_npz["kid"] is None and by_npz["kid_std"] is None
    assert by_npz["is"] == pytest.approx(by_dir["is"], rel=1e-6)  # IS needs no reference
    plain = tmp_path / "plain.npz"  # pytorch-fid's layout: mu and sigma only
    with np.load(npz) as z:
        np.savez(plain, mu=z["mu"], sigma=z["sigma"])
    by_plain = score(cached_metrics(MetricsConfig(reference=str(plain)), DataConfig(), cache), fake)
    assert by_plain["fid"] == pytest.approx(by_dir["fid"], rel=1e-6) and by_plain["n_real"] is None

    # the reference is the folder's images as read (the 24×24 RGB ones included): scored as "generated", FID ≈ 0
    backend = build_backend("digits")
    ref = cached_metrics(MetricsConfig(reference=str(folder)), DataConfig(), cache, channels=1)
    ref.reset_fake()
    sizes = set()
    for batch in folder_batches(folder_key(backend, folder, 1)[1], 1, 16):
        sizes.add(tuple(batch.shape[1:]))
        ref.add_fake_features(*extract(backend, batch))
    assert sizes == {(1, 16, 16), (1, 24, 24)} and abs(ref.compute()["fid"]) < 1e-4

    # the features are cached (the tool's run already wrote them) and a corrupt cache is rebuilt
    calls = []
    backend.register_forward_hook(lambda *_: calls.append(1))
    first = folder_features(backend, folder, 1, cache)
    assert calls == []
    path = reference_path(cache, folder_key(backend, folder, 1)[0])
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="dq"):
        again = folder_features(backend, folder, 1, cache)
    assert calls and any("unreadable" in r.message for r in caplog.records)
    assert torch.allclose(again.features, first.features, rtol=1e-5, atol=1e-6)  # same images, other batching
    key = folder_key(backend, folder, 1)[0]
    (folder / "000.png").write_bytes((folder / "003.png").read_bytes())  # a file changed: another key
    assert folder_key(backend, folder, 1)[0]["files"] != key["files"]
    assert folder_key(backend, folder, 3)[0] != key  # read as RGB: another key


def test_reference_through_eval_matches_for_folder_and_npz(tmp_path, cfg_factory, digits):
    from dq.tasks.evaluate import run

    folder = tmp_path / "real"
    write_folder(folder, digits.heldout_images[:40])
    npz = tmp_path / "stats.npz"
    assert reference_stats([str(folder), str(npz), "--backend", "digits", "--cache-dir", str(tmp_path / "cache")]) == 0
    common = ("model=tiny_unet", "sampler.steps=2", "task.num_samples=6")
    results = {}
    for ref in (folder, npz):
        run(cfg_factory(*common, f"metrics.reference={ref}", config_name="eval"))
        results[ref.suffix] = json.loads((tmp_path / "results.json").read_text())
    by_dir, by_npz = results[""], results[".npz"]
    assert [r["name"] for r in by_dir["rows"]] == ["fp"]  # no digits floor against a user's reference
    assert any("floor row not computed" in n for n in by_dir["notes"])
    assert by_npz["rows"][0]["fid"] == pytest.approx(by_dir["rows"][0]["fid"], rel=1e-7)
    assert str(folder) in by_dir["metrics"]["fid"] and str(npz) in by_npz["metrics"]["fid"]
    assert "kid" in by_dir["metrics"] and "kid" not in by_npz["metrics"]
    assert any(n.startswith("kid not computed") and str(npz) in n for n in by_npz["notes"])


def test_npz_with_other_feature_dims_is_a_one_line_error(tmp_path):
    npz = tmp_path / "inception.npz"
    np.savez(npz, mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32)[:, :2048])
    with pytest.raises(DQError) as e:
        read_stats(npz, build_backend("digits"))
    msg = str(e.value)
    assert "\n" not in msg and "2048-dim" in msg and "metrics.backend=digits gives 64-dim" in msg and str(npz) in msg
    other = tmp_path / "other.npz"
    np.savez(other, mu=np.zeros(64), sigma=np.eye(64), backend=np.str_("tf_inception"))
    with pytest.raises(DQError, match="computed with backend 'tf_inception', but metrics.backend=digits"):
        read_stats(other, build_backend("digits"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(64))
    with pytest.raises(DQError, match="not mu and sigma"):
        read_stats(bad, build_backend("digits"))


def test_a_missing_reference_or_clip_folder_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DQError) as e:
        MetricsConfig(reference=str(missing))
    assert "\n" not in str(e.value) and f"metrics.reference={missing} does not exist" in str(e.value)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(DQError, match="neither a folder of images nor a .npz"):
        MetricsConfig(reference=str(tmp_path / "x.txt"))
    with pytest.raises(DQError, match="metrics.clip_model=.* is not a local CLIP model folder"):
        MetricsConfig(clip_model=str(missing))
    with pytest.raises(DQError, match="metrics.pairwise_images=0 must be a positive integer"):
        MetricsConfig(pairwise_images=0)


@pytest.mark.e2e
def test_cli_errors_for_a_missing_reference_are_one_line_exit_2(tmp_path):
    missing = tmp_path / "nowhere"
    for cmd in (["eval.py", f"metrics.reference={missing}", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
                ["scripts/reference_stats.py", str(missing), str(tmp_path / "out.npz"), "--backend", "digits"]):
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and str(missing) in lines[0], (cmd, proc.stderr[-2000:])
    assert not (tmp_path / "out.npz").exists()


def test_pairwise_metrics_of_identical_and_perturbed_images(digits):
    imgs = digits.heldout_images[:64]
    assert psnr_ssim(imgs, imgs.clone()) == (PSNR_CAP, pytest.approx(1.0, abs=1e-9))
    noisy = (imgs + 0.2 * torch.randn(imgs.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    psnr, ssim = psnr_ssim(noisy, imgs)
    mse = (((noisy + 1) / 2 - (imgs + 1) / 2) ** 2).mean().double()
    assert psnr == pytest.approx(float(-10 * torch.log10(mse)), rel=1e-6) and psnr < 30
    assert 0 < ssim < 0.95

    backend = build_backend("digits")
    scorer = Scorer(MetricsConfig(pairwise_images=40), DataConfig(), backend, None, ["fp", "student"], (1, 16, 16))
    teacher = scorer.score("fp", 0, imgs)
    assert not any(k in teacher for k in ("fid_to_fp", "psnr_to_fp", "ssim_to_fp"))  # the teacher row gets none
    same = scorer.score("student", 0, imgs.clone())
    assert same["psnr_to_fp"] == PSNR_CAP and same["ssim_to_fp"] == pytest.approx(1.0, abs=1e-9)
    assert abs(same["fid_to_fp"]) < 1e-3 and same["pairs"] == 40
    other = scorer.score("student", 0, noisy)
    assert other["fid_to_fp"] > 0.1 and other["psnr_to_fp"] == pytest.approx(psnr_ssim(noisy[:40], imgs[:40])[0])
    assert 0 < other["ssim_to_fp"] < 0.95
    with pytest.raises(RuntimeError, match="seed 1"):
        scorer.score("student", 1, imgs)

    # RGB images (a text-to-image pipeline's): the digits backend scores their luma, and says so; gray RGB = gray
    rgb = Scorer(MetricsConfig(pairwise_images=40), DataConfig(), backend, None, ["fp", "student"], (3, 16, 16))
    assert not rgb.notes and "luma" in rgb.described["fid_to_fp"]
    rgb.score("fp", 0, imgs.expand(-1, 3, -1, -1))
    row = rgb.score("student", 0, noisy.expand(-1, 3, -1, -1))
    assert row["fid_to_fp"] == pytest.approx(other["fid_to_fp"], rel=1e-4)
    assert row["psnr_to_fp"] == pytest.approx(other["psnr_to_fp"], rel=1e-6)
    latent = Scorer(MetricsConfig(), DataConfig(), backend, None, ["fp", "student"], (4, 8, 8))
    assert latent.pair is None and any("(4, 8, 8) are not 1- or 3-channel" in n for n in latent.notes)


def test_evaluation_rows_carry_the_pairwise_fields(tmp_path):
    teacher = build_arch("unet2d")
    perturbed = copy.deepcopy(teacher.denoiser)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    models = {"student": perturbed, "copy": copy.deepcopy(teacher.denoiser), "fp": teacher.denoiser}
    p = Protocol(sampler=SamplerConfig(name="ddim", steps=2), metrics=MetricsConfig(pairwise_images=4),
                 cache_dir=str(tmp_path / "cache"), num_samples=6, batch_size=6, floor=False, seeds=2)
    result = evaluate_models(p, teacher, models, tmp_path)
    rows = {r["name"]: r for r in result["rows"]}
    assert [r["name"] for r in result["rows"]] == ["fp", "student", "copy"]  # the teacher is sampled first
    assert not any(k in rows["fp"] for k in ("fid_to_fp", "psnr_to_fp", "ssim_to_fp"))
    assert rows["copy"]["psnr_to_fp"] == PSNR_CAP and rows["copy"]["ssim_to_fp"] == pytest.approx(1.0, abs=1e-9)
    assert abs(rows["copy"]["fid_to_fp"]) < 1e-3
    st = rows["student"]
    assert 0 < st["psnr_to_fp"] < PSNR_CAP and 0 < st["ssim_to_fp"] < 1 and st["fid_to_fp"] > 1e-3
    assert [s["pairs"] for s in st["per_seed"]] == [4, 4] and st["psnr_to_fp_seed_std"] > 0
    assert st["fid"] == pytest.approx(sum(s["fid"] for s in st["per_seed"]) / 2)
    assert result["summary"]["student/ssim_to_fp"] == st["ssim_to_fp"]
    assert "same seeds" in result["metrics"]["fid_to_fp"] and "first 4 image pairs" in result["metrics"]["psnr_to_fp"]
    assert "held-out digits" in result["metrics"]["fid"]


def clip_cosines(model, proc, images, prompts):
    u8 = ((images + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    with torch.no_grad():
        out = model(**proc(text=prompts, images=list(u8), return_tensors="pt", padding=True))
    return torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)


def tiny_clip(folder, images, prompts):
    """A random-init CLIP model + processor (a tokenizer over the letters a–z) saved as a local folder; its
    text projection's sign is chosen so that ``images`` and ``prompts`` have a positive mean cosine (CLIPScore
    floors the mean at 0, which would hide a wrong value)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=8)).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                            crop_size={"height": 16, "width": 16}),
                         tokenizer=CLIPTokenizer(vocab=vocab, merges=[]))
    if clip_cosines(model, proc, images, prompts).mean() < 0:
        with torch.no_grad():
            model.text_projection.weight.neg_()
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return model, proc


def test_clip_score_with_a_local_model_folder_and_its_notes(tmp_path, digits):
    pytest.importorskip("transformers")
    imgs = digits.heldout_images[:6]
    prompts = ["a one", "a two", "seven", "zero", "nine", "eight"]
    model, proc = tiny_clip(tmp_path / "clip", imgs, prompts)
    got = ClipScorer(str(tmp_path / "clip"))(imgs, prompts)
    want = float(100 * clip_cosines(model, proc, imgs, prompts).mean())
    assert want > 0.1 and got == pytest.approx(want, rel=1e-4)
    shuffled = ClipScorer(str(tmp_path / "clip"))(imgs, prompts[::-1])  # the prompts follow their images
    assert shuffled == pytest.approx(max(float(100 * clip_cosines(model, proc, imgs, prompts[::-1]).mean()), 0),
                                     rel=1e-4, abs=1e-6)
    assert shuffled != pytest.approx(got, rel=1e-3)

    backend = build_backend("digits")
    cfg = MetricsConfig(clip_model=str(tmp_path / "clip"))
    with_prompts = Scorer(cfg, DataConfig(), backend, None, ["fp"], (1, 16, 16), prompts=prompts)
    assert with_prompts.score("fp", 0, imgs)["clip_score"] == pytest.approx(got)
    assert "clip_score" in with_prompts.described and not with_prompts.notes
    without = Scorer(cfg, DataConfig(), backend, None, ["fp"], (1, 16, 16), prompts=None, conditional=True)
    assert "clip_score" not in without.score("fp", 0, imgs)
    assert any(n.startswith("CLIP score not computed") and "no text prompts" in n for n in without.notes)
    (tmp_path / "notclip").mkdir()
    (tmp_path / "notclip" / "config.json").write_text("{}")
    with pytest.raises(DQError, match="is not a loadable CLIP model"):
        ClipScorer(str(tmp_path / "notclip"))
    unset = Scorer(MetricsConfig(), DataConfig(), backend, None, ["fp"], (1, 16, 16), prompts=prompts)
    assert any("metrics.clip_model" in n and "not set" in n for n in unset.notes)
