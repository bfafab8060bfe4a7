"""Library inputs that used to give a wrong answer quietly now give one clear error."""

import math

import pytest
import torch

from ssl_course.data import DataError, ImageDataset
from ssl_course.evaluate import embed, knn_accuracy, linear_probe


def feats(n=20, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.arange(n) % 2


def test_knn_refuses_nan_features_instead_of_reporting_chance():
    x, y = feats()
    bad = x.clone()
    bad[3, 1] = math.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        knn_accuracy(bad, y, x, y)
    with pytest.raises(DataError, match="the test features"):
        knn_accuracy(x, y, bad, y)
    assert knn_accuracy(x, y, x, y, k=1) == 1.0  # finite features still work


@pytest.mark.parametrize("t", [0, -0.1, math.nan, math.inf])
def test_knn_temperature_must_be_positive(t):
    x, y = feats()
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        knn_accuracy(x, y, x, y, temperature=t)


def test_linear_probe_refuses_nan_features():
    x, y = feats()
    bad = x.clone()
    bad[0, 0] = math.inf
    with pytest.raises(DataError, match="NaN or infinite"):
        linear_probe(bad, y, x, y)


def test_embed_refuses_an_empty_dataset():
    empty = ImageDataset(
        torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    )
    with pytest.raises(DataError, match="empty dataset"):
        embed(torch.nn.Flatten(), empty)


def test_small_convnet_names_the_minimum_image_size():
    from ssl_course.backbones import SmallConvNet

    with pytest.raises(ValueError, match="at least 4x4 pixels; got \\(3, 3\\)"):
        SmallConvNet(1)(torch.zeros(2, 1, 3, 3))
    assert SmallConvNet(1)(torch.zeros(2, 1, 4, 4)).shape == (2, 128)


def test_load_backbone_reads_an_encoder_saved_under_any_name(tmp_path):
    from safetensors.torch import save_model

    from ssl_course.backbones import SmallConvNet
    from ssl_course.transfer import load_backbone

    torch.manual_seed(0)
    enc = SmallConvNet(1).eval()
    save_model(enc, str(tmp_path / "my_simclr_run.safetensors"))
    loaded = load_backbone(tmp_path / "my_simclr_run.safetensors", method="simclr")
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), enc(x))


@pytest.mark.parametrize("t", [0, 0.0, -0.5, math.nan, math.inf, True, "0.1"])
def test_contrastive_losses_refuse_a_temperature_that_is_not_positive(t):
    from ssl_course.moco import moco_loss
    from ssl_course.simclr import nt_xent_loss

    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="NT-Xent temperature must be a positive number"):
        nt_xent_loss(z, z.flip(0), temperature=t)
    with pytest.raises(ValueError, match="MoCo temperature must be a positive number"):
        moco_loss(z, z.flip(0), torch.randn(16, 8), temperature=t)
    assert torch.isfinite(nt_xent_loss(z, z.flip(0), temperature=0.5))


@pytest.mark.parametrize("t", [0, -1.0, math.nan])
def test_every_other_loss_checks_its_temperature_or_scale(t):
    from ssl_course.clip import clip_loss
    from ssl_course.dino import dino_loss
    from ssl_course.wav2vec2 import wav2vec2_contrastive_loss

    views = [torch.randn(4, 16) for _ in range(4)]
    with pytest.raises(ValueError, match="DINO student_temp must be a positive number"):
        dino_loss(views, views[:2], torch.zeros(1, 16), student_temp=t)
    with pytest.raises(ValueError, match="DINO teacher_temp must be a positive number"):
        dino_loss(views, views[:2], torch.zeros(1, 16), teacher_temp=t)
    c = torch.randn(5, 8)
    with pytest.raises(ValueError, match="wav2vec 2.0 temperature must be a positive number"):
        wav2vec2_contrastive_loss(c, c, torch.randn(5, 3, 8), temperature=t)
    with pytest.raises(ValueError, match="CLIP logit_scale must be a positive number"):
        clip_loss(c, c, t)
    assert torch.isfinite(clip_loss(c, c, 10.0))


def test_a_truncated_wav_warns_with_the_file_and_both_lengths(tmp_path):
    import soundfile as sf

    from ssl_course.speech_data import load_audio

    good = tmp_path / "one_second.wav"
    sf.write(
        str(good), (torch.sin(torch.arange(16_000) / 5.0) * 0.5).numpy(), 16_000, subtype="PCM_16"
    )
    cut = tmp_path / "cut.wav"
    cut.write_bytes(good.read_bytes()[: 44 + 2 * 478])  # the header, then 478 of 16,000 samples
    with pytest.warns(UserWarning, match=r"cut\.wav: truncated WAV file: .* 16000 samples, .* 478"):
        w = load_audio(cut)
    assert len(w) > 0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole file loads without a word
        assert len(load_audio(good)) == 16_000


def test_tokenizers_refuse_an_empty_vocabulary(tmp_path):
    from ssl_course.caption_data import WordTokenizer
    from ssl_course.text_data import train_wordpiece

    with pytest.raises(DataError, match="only blank texts"):
        train_wordpiece(["", "   ", "\n"], vocab_size=50, cache=False, data_dir=tmp_path)
    with pytest.raises(ValueError, match="at least one word"):
        WordTokenizer([])
    with pytest.raises(ValueError, match="at least one word"):
        WordTokenizer.from_texts(["", "  "])
    assert len(WordTokenizer.from_texts(["a red shirt"])) == 4 + 3
