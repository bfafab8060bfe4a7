"""wav2vec 2.0: frame counts, span masks, negatives, quantiser, losses (closed forms), learning,
audio I/O and bad input."""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_course.data import DATASETS, DatasetUnavailableError, load_dataset
from ssl_course.wav2vec2 import (
    ConvFeatureEncoder,
    GumbelVectorQuantizer,
    Wav2Vec2,
    Wav2Vec2Encoder,
    codebook_diversity_loss,
    codebook_perplexity,
    compute_span_mask,
    contrastive_logits,
    contrastive_logits_by_index,
    conv_output_length,
    gumbel_temperature_decay,
    receptive_field,
    sample_negatives,
    wav2vec2_contrastive_loss,
    wav2vec2_small,
)
from ssl_course.speech_data import (
    AudioError,
    VoiceConfig,
    find_binary,
    load_audio,
    prepare_waveform,
    synthesize,
    synthesize_corpus,
    voice_configs,
)

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="Debian package espeak-ng not installed"
)
needs_asterisk = pytest.mark.skipif(
    not Path("/usr/share/asterisk/sounds/en_US_f_Allison/digits/0.wav").is_file()
    and not Path("/usr/share/asterisk/sounds/en/digits/0.wav").is_file(),
    reason="Debian package asterisk-core-sounds-en-wav not installed",
)


# ---------------------------------------------------------------- feature encoder
@pytest.mark.parametrize(
    "n, frames", [(16_000, 49), (8_000, 24), (400, 1), (719, 1), (720, 2), (32_000, 99)]
)
def test_frame_count_matches_formula_and_module(n, frames):
    assert conv_output_length(n) == frames
    assert ConvFeatureEncoder(conv_dim=8)(torch.randn(1, n)).shape == (1, frames, 8)


def test_receptive_field_and_hop():
    assert receptive_field() == (400, 320)
    # independent check: the first output frame depends on exactly the first 400 input samples
    fe = ConvFeatureEncoder(conv_dim=4, normalize=False).double()
    fe.layers[0][1] = torch.nn.Identity()  # group norm mixes time; drop it for this check
    x = torch.randn(1, 1200, dtype=torch.double, requires_grad=True)
    fe(x)[0, 0].sum().backward()
    nz = torch.nonzero(x.grad[0]).flatten()
    assert nz.min() == 0 and nz.max() == 399


def test_short_stereo_and_wrong_shapes_are_refused():
    fe = ConvFeatureEncoder(conv_dim=4)
    with pytest.raises(AudioError, match="receptive field"):
        fe(torch.randn(2, 399))
    with pytest.raises(AudioError, match="mono"):
        fe(torch.randn(2, 2, 16_000))
    with pytest.raises(AudioError, match="receptive field"):
        prepare_waveform(torch.randn(300), 16_000)
    with pytest.raises(
        AudioError, match="receptive field"
    ):  # 300 samples at 8 kHz are 600 at 16 kHz, 190 at 8 -> 380
        prepare_waveform(torch.randn(190), 8_000)


# ---------------------------------------------------------------- audio I/O
def test_stereo_and_other_rates_are_resampled_to_mono_16k(tmp_path):
    import soundfile as sf

    t = np.arange(44_100) / 44_100
    left, right = np.sin(2 * np.pi * 300 * t), 0.5 * np.sin(2 * np.pi * 300 * t)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], 1).astype(np.float32), 44_100)
    w = load_audio(path)
    assert w.shape == (16_000,) and w.dtype == torch.float32
    assert abs(w.abs().max().item() - 0.75) < 0.02  # the channel mean
    # the 300 Hz tone survives resampling: its spectral peak stays at 300 Hz
    spec = torch.fft.rfft(w).abs()
    assert abs(int(spec.argmax()) - 300) <= 1
    assert prepare_waveform(torch.zeros(8_000), 8_000).shape == (16_000,)


def test_corrupt_and_missing_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage that is not audio")
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(bad)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(AudioError, match="no such audio file"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="NaN"):
        prepare_waveform(torch.full((1000,), float("nan")), 16_000)


# ---------------------------------------------------------------- span masks
def _runs(row):
    "Lengths of the maximal runs of True in a 1-D bool tensor."
    out, n = [], 0
    for v in row.tolist() + [False]:
        if v:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


@pytest.mark.parametrize("t", [12, 24, 49, 200])
@pytest.mark.parametrize("p", [0.0, 0.65, 1.0])
def test_span_mask_respects_min_masks_and_span_length(t, p):
    g = torch.Generator().manual_seed(t)
    m = compute_span_mask((16, t), mask_prob=p, mask_length=10, min_masks=2, generator=g)
    assert m.shape == (16, t) and m.dtype == torch.bool
    for row in m:
        runs = _runs(row)
        assert runs and min(runs) >= 10  # every masked run is at least one whole span
        assert row.sum() >= min(t, 10)  # min_masks = 2 spans (possibly overlapping)
    if p == 0.0:  # exactly min_masks spans: at most 2 * 10 frames
        assert (m.sum(1) <= 20).all()


def test_span_mask_fraction_matches_paper_on_long_utterances():
    m = compute_span_mask((64, 1000), 0.65, 10, generator=torch.Generator().manual_seed(0))
    assert 0.44 < m.float().mean().item() < 0.54  # the paper: about 49% of frames masked


def test_span_mask_short_rows_and_bad_arguments():
    assert compute_span_mask((3, 4), 0.65, 10).all()
    with pytest.raises(ValueError, match="mask_prob"):
        compute_span_mask((2, 49), 1.5)


# ---------------------------------------------------------------- negatives
def test_negatives_never_the_positive_and_same_utterance():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = compute_span_mask((8, 49), generator=g)
        mask[0] = False
        mask[0, :2] = True  # an utterance with only 2 masked frames
        neg = sample_negatives(mask, 100, generator=g)
        n = int(mask.sum())
        assert neg.shape == (n, 100)
        assert (neg != torch.arange(n)[:, None]).all()
        row = torch.repeat_interleave(torch.arange(8), mask.sum(1))
        assert (row[neg] == row[:, None]).all()
    # with 2 masked frames the only distractor is the other one
    assert (neg[0] == 1).all() and (neg[1] == 0).all()


def test_negatives_are_uniform_over_the_others():
    mask = torch.ones(1, 5, dtype=torch.bool)
    neg = sample_negatives(mask, 20_000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(neg[2], minlength=5).float() / 20_000
    assert counts[2] == 0 and torch.allclose(
        counts[[0, 1, 3, 4]], torch.full((4,), 0.25), atol=0.02
    )


def test_negatives_need_two_masked_frames():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, 3] = True
    with pytest.raises(ValueError, match="at least 2 masked"):
        sample_negatives(mask, 10)


# ---------------------------------------------------------------- quantiser
def test_quantizer_forward_is_one_hot_per_group_and_differentiable():
    torch.manual_seed(0)
    vq = GumbelVectorQuantizer(dim=12, num_groups=2, num_vars=16, vq_dim=8).train()
    x = torch.randn(4, 7, 12, requires_grad=True)
    out = vq(x)
    oh = out["onehot"].detach()
    assert oh.shape == (4, 7, 2, 16) and torch.equal(oh.sum(-1), torch.ones(4, 7, 2))
    assert set(oh.unique().tolist()) <= {0.0, 1.0}
    # the output is exactly the concatenation of the chosen codewords
    cv = vq.codevectors.detach().view(2, 16, 4)
    chosen = oh.argmax(-1)
    expect = torch.cat([cv[0][chosen[..., 0]], cv[1][chosen[..., 1]]], -1)
    assert torch.allclose(out["x"].detach(), expect, atol=1e-6)
    (out["x"] * torch.randn_like(out["x"])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # straight-through reaches the input
    assert vq.weight_proj.weight.grad.abs().sum() > 0 and vq.codevectors.grad.abs().sum() > 0
    vq.eval()
    e = vq(x.detach())
    assert torch.equal(
        e["codes"], vq.weight_proj(x.detach()).view(4, 7, 2, 16).argmax(-1)
    )  # eval: argmax, no noise


def test_temperature_schedule():
    vq = GumbelVectorQuantizer(8, temp=(2.0, 0.5, 0.999995))
    vq.set_num_updates(0)
    assert vq.curr_temp == 2.0
    vq.set_num_updates(100_000)
    assert vq.curr_temp == pytest.approx(2.0 * 0.999995**100_000)
    vq.set_num_updates(400_000)
    assert vq.curr_temp == 0.5
    d = gumbel_temperature_decay(200)
    assert 2.0 * d**138 == pytest.approx(0.5, rel=1e-6)


def test_diversity_loss_closed_forms():
    g, v = 2, 320
    uniform = torch.full((50, g, v), 1 / v)
    assert codebook_diversity_loss(uniform).item() == pytest.approx(0.0, abs=1e-4)
    collapse = F.one_hot(torch.full((50, g), 7), v).float()
    assert codebook_diversity_loss(collapse).item() == pytest.approx(1 - 1 / v, abs=1e-4)
    assert codebook_diversity_loss(collapse).item() > 0.99
    # half the codewords used uniformly: perplexity V/2 per group
    half = torch.zeros(50, g, v)
    half[..., : v // 2] = 2 / v
    assert codebook_perplexity(half).item() == pytest.approx(g * v / 2, rel=1e-3)
    assert codebook_diversity_loss(half).item() == pytest.approx(0.5, abs=1e-3)


# ---------------------------------------------------------------- contrastive loss
def _slow_loss(c, t, n, temp=0.1):
    "Independent re-derivation: per row, a loop over candidates."
    total = 0.0
    for i in range(len(c)):
        cands = [t[i]] + [n[i, k] for k in range(n.shape[1]) if not torch.equal(n[i, k], t[i])]
        s = torch.stack([torch.dot(c[i], q) / (c[i].norm() * q.norm()) for q in cands]) / temp
        total += -(s[0] - torch.logsumexp(s, 0))
    return total / len(c)


def test_contrastive_loss_matches_slow_version_and_ignores_copies_of_the_positive():
    torch.manual_seed(0)
    c, t, n = torch.randn(6, 5), torch.randn(6, 5), torch.randn(6, 9, 5)
    n[0, 3] = t[0]
    n[2, :4] = t[2]
    assert wav2vec2_contrastive_loss(c, t, n).item() == pytest.approx(
        _slow_loss(c, t, n).item(), rel=1e-5
    )
    y = torch.randn(30, 5)
    idx = sample_negatives(torch.ones(2, 15, dtype=torch.bool), 11)
    assert torch.allclose(
        contrastive_logits_by_index(c.repeat(5, 1), y, idx),
        contrastive_logits(c.repeat(5, 1), y, y[idx]),
        atol=1e-5,
    )


def test_contrastive_loss_closed_forms():
    c = torch.zeros(4, 3)
    c[:, 0] = 1
    t = torch.zeros(4, 3)
    t[:, 1] = 1
    n = torch.zeros(4, 100, 3)
    n[..., 2] = 1  # all orthogonal to c: equal logits
    assert wav2vec2_contrastive_loss(c, t, n).item() == pytest.approx(math.log(101), abs=1e-5)
    # perfect prediction: logits 10 for the positive, 0 for 100 distractors
    assert wav2vec2_contrastive_loss(t, t, n).item() == pytest.approx(
        math.log(1 + 100 * math.exp(-10)), rel=1e-4
    )
    with pytest.raises(ValueError, match="shapes"):
        wav2vec2_contrastive_loss(c, t, n[:3])


# ---------------------------------------------------------------- the model
def _speech(n=48):
    """Real structured audio without synthesis: chirps with formant-like harmonics
    (for the fast tests)."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(16_000) / 16_000
    f0 = 100 + 150 * torch.rand(n, 1, generator=g)
    env = torch.exp(-((t - 0.5) ** 2) / 0.03)
    return sum(torch.sin(2 * math.pi * k * f0 * t * (1 + 0.3 * t)) / k for k in range(1, 6)) * env


def test_loss_at_init_is_near_log_k_plus_one():
    torch.manual_seed(0)
    m = wav2vec2_small(conv_dim=16, embed_dim=64, layers=1).train()
    with torch.no_grad():
        out = m(_speech(8), generator=torch.Generator().manual_seed(0))
    assert abs(out["contrastive"].item() - math.log(101)) < 0.4
    assert 0 <= out["diversity"].item() <= 1 and out["code_perplexity"] >= 1


def test_model_gradients_reach_encoder_quantizer_and_mask_embedding():
    torch.manual_seed(0)
    m = wav2vec2_small(conv_dim=16, embed_dim=64, layers=1).train()
    m(_speech(4))["loss"].backward()
    for name in (
        "mask_emb",
        "quantizer.weight_proj.weight",
        "quantizer.codevectors",
        "encoder.feature_extractor.layers.0.0.weight",
        "encoder.blocks.layers.0.self_attn.in_proj_weight",
        "final_proj.weight",
        "project_q.weight",
    ):
        p = dict(m.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@needs_espeak
def test_loss_falls_over_real_steps_on_synthetic_speech(tmp_path):
    """40 AdamW steps on one batch of real (synthesised) speech with a fixed span mask: the model
    learns the batch."""
    voices = voice_configs(4, seed=5)
    waves = synthesize_corpus(["zero", "one", "yes", "no"], voices, data_dir=tmp_path)[:8]
    torch.manual_seed(0)
    enc = Wav2Vec2Encoder(
        conv_dim=32, embed_dim=64, layers=1, pos_conv_kernel=16, pos_conv_groups=4, dropout=0.0
    )
    m = Wav2Vec2(enc, codevector_dim=64, final_dim=64).train()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    mask = compute_span_mask((8, 49), generator=torch.Generator().manual_seed(0))
    losses, accs = [], []
    for _ in range(40):
        out = m(waves, mask=mask)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["contrastive"].item())
        accs.append(out["accuracy"].item())
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.4, losses
    assert np.mean(accs[-3:]) > np.mean(accs[:3])


# ---------------------------------------------------------------- data
@needs_espeak
def test_synthesis_is_deterministic_atomic_and_cached(tmp_path):
    v = VoiceConfig("espeak-ng", "en-us+f2", 150, 60)
    a = synthesize("seven", v, tmp_path / "a.wav")
    b = synthesize("seven", v, tmp_path / "b.wav")
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob("*.part*"))
    assert voice_configs(12, seed=0) == voice_configs(12, seed=0) and voice_configs(
        12, 0
    ) != voice_configs(12, 1)
    w1 = synthesize_corpus(["one", "two"], [v], data_dir=tmp_path)
    wavs = list((tmp_path / "synthetic_speech" / "wav").rglob("*.wav"))
    assert len(wavs) == 2 and w1.shape == (2, 16_000)
    mtimes = {p: p.stat().st_mtime_ns for p in wavs}
    w2 = synthesize_corpus(["one", "two"], [v], data_dir=tmp_path)
    assert torch.allclose(w1, w2, atol=1 / 32767) and all(
        p.stat().st_mtime_ns == t for p, t in mtimes.items()
    )


def test_missing_binary_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DatasetUnavailableError, match="apt-get install espeak-ng"):
        find_binary("espeak-ng")
    with pytest.raises(DatasetUnavailableError, match="apt-get install flite"):
        synthesize("one", VoiceConfig("flite", "slt", 1.0, 100), tmp_path / "x.wav")


@needs_asterisk
def test_real_digits_load_as_mono_16k():
    real = load_dataset("asterisk_digits", "test")
    assert real.waves.shape == (10, 16_000) and real.labels.tolist() == list(range(10))
    assert (real.waves.abs().amax(1) > 0.5).all()


def test_audio_datasets_are_registered_and_online_ones_fail_clearly(tmp_path):
    for name in (
        "synth_digits",
        "synth_words",
        "asterisk_digits",
        "asterisk_prompts",
        "fsdd",
        "speech_commands_digits",
    ):
        assert DATASETS[name].kind == "audio"
    with pytest.raises(DatasetUnavailableError, match="git clone"):
        load_dataset("fsdd", "train", download=False, data_dir=tmp_path)
    with pytest.raises(DatasetUnavailableError, match="downloads are disabled"):
        load_dataset("speech_commands_digits", "train", download=False, data_dir=tmp_path)


def test_distractors_equal_to_the_positive_are_found_by_target_vector(monkeypatch):
    """fairseq's `compute_preds`: `neg_is_pos = (y == negatives).all(-1)` on the sampled
    (Gumbel, hence noisy) target vectors y. A distractor is masked to -inf exactly when its target
    vector equals the positive's - not when the noise-free argmax codes agree
    (in training mode the two differ)."""
    import ssl_course.wav2vec2 as w2v

    seen = {}
    real = w2v.contrastive_logits_by_index

    def spy(context, targets, negative_idx, temperature=0.1, same=None):
        out = real(context, targets, negative_idx, temperature, same)
        seen.update(targets=targets.detach(), idx=negative_idx, logits=out.detach())
        return out

    monkeypatch.setattr(w2v, "contrastive_logits_by_index", spy)
    codes_seen = {}
    torch.manual_seed(0)
    m = wav2vec2_small(
        conv_dim=16, embed_dim=64, layers=1, num_vars=4
    ).train()  # few codewords: many collisions
    q_forward = m.quantizer.forward

    def q_spy(x):
        out = q_forward(x)
        codes_seen["codes"] = out["codes"]
        return out

    monkeypatch.setattr(m.quantizer, "forward", q_spy)
    with torch.no_grad():
        m(_speech(8), generator=torch.Generator().manual_seed(0))
    y, idx, logits = seen["targets"], seen["idx"], seen["logits"]
    vec_same = (y[idx] == y[:, None]).all(-1)  # independent: equal target vectors
    code_same = (codes_seen["codes"][idx] == codes_seen["codes"][:, None]).all(-1)
    assert (vec_same != code_same).sum() > 100  # the two rules really disagree here
    assert torch.equal(
        torch.isinf(logits[:, 1:]), vec_same
    )  # -inf exactly at copies of the positive vector
    assert torch.isfinite(logits[:, 0]).all()


def _grads_with(**kw):
    torch.manual_seed(0)
    m = Wav2Vec2(
        conv_dim=16,
        embed_dim=64,
        layers=1,
        pos_conv_kernel=16,
        pos_conv_groups=4,
        codevector_dim=64,
        final_dim=64,
        **kw,
    ).train()
    mask = compute_span_mask((4, 49), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # same Gumbel noise and dropout
    m(_speech(4), mask=mask, generator=torch.Generator().manual_seed(3))["loss"].backward()
    return m, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_feature_encoder_gradient_is_scaled_by_0_1_by_default():
    """Baevski et al. 2020 (sec. 4.2) / fairseq `feature_grad_mult=0.1`: the conv encoder's
    gradient is scaled down 10x."""
    m, g_default = _grads_with()
    _, g_one = _grads_with(feature_grad_mult=1.0)
    fe = [n for n in g_one if n.startswith("encoder.feature_extractor.")]
    assert fe and all(g_one[n].abs().sum() > 0 for n in fe)
    for n in fe:  # 0.1 x, up to float rounding (relative to the tensor's scale: the order of the
        # float operations differs between CPUs; measured up to 4e-6 of the scale on AMD EPYC)
        scale = g_one[n].abs().max().item()
        assert torch.allclose(g_default[n], 0.1 * g_one[n], rtol=1e-4, atol=1e-5 * scale), n
    for n in ("final_proj.weight", "quantizer.codevectors", "encoder.post_extract_proj.weight"):
        assert torch.equal(g_default[n], g_one[n]), n  # the rest of the model is untouched
    assert m.encoder.feature_grad_mult == 0.1
    assert (
        wav2vec2_small(
            conv_dim=16, embed_dim=64, layers=1, feature_grad_mult=1.0
        ).encoder.feature_grad_mult
        == 1.0
    )
