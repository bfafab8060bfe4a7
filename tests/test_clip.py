"""CLIP: loss closed forms and symmetry, logit-scale clamp, tokenizer and text encoder, Recall@K,
data, a quick real run."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_course.clip import (
    CLIP,
    TextEncoder,
    build_clip,
    clip_loss,
    recall_at_k,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from ssl_course.caption_data import (
    FASHION_CLASSNAMES,
    FASHION_PROMPTS,
    HELDOUT_PAIRS,
    SHAPE_PAIRS,
    ImageTextDataset,
    WordTokenizer,
    render_shapes,
)
from ssl_course.data import DATASETS, DatasetUnavailableError, load_dataset
from ssl_course.train import METHODS, Callback, fit


def slow_clip_loss(img, txt, s):
    "The loss written straight from the formula, one row and one column at a time."
    img, txt = F.normalize(img.double(), dim=1), F.normalize(txt.double(), dim=1)
    n = len(img)
    rows = [
        -math.log(
            math.exp(s * (img[i] @ txt[i]).item())
            / sum(math.exp(s * (img[i] @ txt[j]).item()) for j in range(n))
        )
        for i in range(n)
    ]
    cols = [
        -math.log(
            math.exp(s * (img[j] @ txt[j]).item())
            / sum(math.exp(s * (img[i] @ txt[j]).item()) for i in range(n))
        )
        for j in range(n)
    ]
    return (sum(rows) / n + sum(cols) / n) / 2


@pytest.mark.parametrize("n, d, s", [(2, 3, 1.0), (5, 8, 14.3), (9, 4, 50.0)])
def test_loss_matches_slow_formula(n, d, s):
    torch.manual_seed(n)
    a, b = torch.randn(n, d), torch.randn(n, d)
    assert clip_loss(a, b, s).item() == pytest.approx(slow_clip_loss(a, b, s), rel=1e-5)


def test_loss_symmetric_under_swapping_modalities_and_transposed_logits():
    torch.manual_seed(0)
    a, b = torch.randn(7, 16), torch.randn(7, 16)
    assert clip_loss(a, b, 14.3).item() == pytest.approx(clip_loss(b, a, 14.3).item(), rel=1e-6)
    # the same loss from the transposed logit matrix: CE over rows of L and of L^T, in either order
    logits = 14.3 * F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    t = torch.arange(7)
    by_hand = (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)) / 2
    by_hand_t = (F.cross_entropy(logits.T, t) + F.cross_entropy(logits, t)) / 2
    assert (
        clip_loss(a, b, 14.3).item()
        == pytest.approx(by_hand.item(), rel=1e-6)
        == pytest.approx(by_hand_t.item(), rel=1e-6)
    )
    # a non-symmetric variant (image -> text only) would differ: the symmetry is not a trivial
    # identity
    assert abs(F.cross_entropy(logits, t).item() - F.cross_entropy(logits.T, t).item()) > 1e-4


def test_aligned_orthogonal_pairs_loss_goes_to_zero():
    eye = torch.eye(10)
    losses = [clip_loss(eye, eye, s).item() for s in (1.0, 5.0, 10.0, 100.0)]
    assert losses[0] > losses[1] > losses[2] >= losses[3] and losses[-1] < 1e-6
    for s in (1.0, 5.0, 10.0):
        assert clip_loss(eye, eye, s).item() == pytest.approx(
            math.log(1 + 9 * math.exp(-s)), rel=1e-3, abs=1e-7
        )


def test_random_features_at_init_give_about_log_n():
    torch.manual_seed(0)
    for n in (16, 64, 256):
        loss = clip_loss(torch.randn(n, 512), torch.randn(n, 512), 1.0).item()
        assert loss == pytest.approx(math.log(n), abs=0.05)
    # and through an untrained model at its init scale 1/0.07, still near log N
    # (features are not yet aligned)
    tok = WordTokenizer(["a", "photo", "bag", "shoe"], 8)
    torch.manual_seed(0)
    m = build_clip(tokenizer=tok, image_size=28, channels=1, image_tower="small_cnn").eval()
    ids = tok.encode(["a photo bag", "a shoe"] * 16)
    with torch.no_grad():
        out = m.training_step((torch.rand(32, 1, 28, 28), ids))
    assert out["loss"].item() == pytest.approx(math.log(32), abs=1.0)


def test_loss_is_invariant_to_feature_norms():
    torch.manual_seed(1)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    assert clip_loss(a, b, 10.0).item() == pytest.approx(
        clip_loss(3 * a, 0.5 * b, 10.0).item(), rel=1e-5
    )


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        clip_loss(torch.randn(4, 8), torch.randn(5, 8), 10.0)
    with pytest.raises(ValueError, match="different spaces"):
        clip_loss(torch.randn(4, 8), torch.randn(4, 6), 10.0)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        clip_loss(torch.randn(1, 8), torch.randn(1, 8), 10.0)
    tok = WordTokenizer(["a", "bag"], 8)
    with pytest.raises(ValueError, match="empty"):
        tok.encode(["a bag", ""])
    with pytest.raises(ValueError, match="empty"):
        tok.encode(["a bag", " .,!? "])
    m = build_clip(tokenizer=tok, image_size=28, channels=1, image_tower="small_cnn")
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        m.training_step((torch.rand(3, 1, 28, 28), tok.encode(["a bag"] * 2)))
    with pytest.raises(ValueError, match="empty"):
        m.text_encoder(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(Exception, match="empty"):
        ImageTextDataset(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), [["a bag"], [""]], [0, 1], tok)
    with pytest.raises(Exception, match="caption set is empty"):
        ImageTextDataset(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), [["a bag"], []], [0, 1], tok)


def test_logit_scale_init_and_clamp_inside_fit():
    tok = WordTokenizer(["a", "bag"], 6)
    m = build_clip(tokenizer=tok, image_size=28, channels=1, image_tower="small_cnn")
    assert m.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        m.logit_scale.fill_(math.log(1e4))
    m.on_step_end(0, 1)
    assert m.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)

    # within fit(): a loss that always wants a larger scale, a big learning rate; fit() must call
    # the clamp every step
    class Greedy(CLIP):
        def training_step(self, batch):
            return -self.logit_scale * 1.0

    class NoClamp(Greedy):
        def on_step_end(self, step, total):
            pass

    data = torch.utils.data.TensorDataset(torch.rand(16, 1, 28, 28), tok.encode(["a bag"] * 16))
    for cls, expect_clamped in ((Greedy, True), (NoClamp, False)):
        base = build_clip(tokenizer=tok, image_size=28, channels=1, image_tower="small_cnn")
        m = cls(base.encoder, base.text_encoder, tokenizer=tok)
        seen = []

        class Record(Callback):
            def on_step_end(self, trainer, logs):
                seen.append(m.logit_scale.exp().item())

        fit(
            m,
            data,
            steps=6,
            batch_size=8,
            lr=1.0,
            warmup=0,
            schedule="constant",
            progress=False,
            callbacks=[Record()],
        )
        assert (max(seen) <= 100.0 + 1e-3) == expect_clamped, (cls.__name__, seen)


def test_tokenizer_round_trip_and_padding_mask():
    tok = WordTokenizer.from_texts(
        ["a photo of a t-shirt", "a black and white picture of a bag"], context_length=10
    )
    ids = tok.encode("a photo of a t-shirt")
    assert (
        tok.decode(ids[0]) == "a photo of a t-shirt"
        and ids[0, 0] == tok.sos_id
        and ids[0, 6] == tok.eos_id
    )
    assert tok.encode("A PHOTO, of a T-Shirt!").equal(ids)
    te = TextEncoder(len(tok), 10).eval()
    te2 = TextEncoder(len(tok), 14).eval()
    te2.load_state_dict(
        {**te.state_dict(), "pos_embed": torch.cat([te.pos_embed, torch.randn(1, 4, 64)], 1)}
    )
    longer = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        assert torch.allclose(
            te(ids), te2(longer), atol=1e-5
        )  # padding (and its positions) does not leak


def test_recall_at_k_hand_built():
    sim = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.5, 0.4, 0.1, 0.0], [0.8, 0.7, 0.1, 0.6]])
    r = recall_at_k(sim, ks=(1, 2, 3, 4))  # ranks of the matches: 1st, 2nd, 4th
    assert [r[k] for k in (1, 2, 3, 4)] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1.0])
    r = recall_at_k(
        sim, ks=(1, 2, 3), gallery_ids=torch.tensor([0, 1, 2, 2])
    )  # query 2 also matches item 3 (3rd)
    assert [r[k] for k in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    r = recall_at_k(
        sim.T, ks=(1, 2), query_ids=torch.tensor([0, 1, 2, 0])
    )  # text -> image direction, ids on queries
    assert r[1] == pytest.approx(0.25) and r[2] == pytest.approx(0.75)  # ranks 0, 1, 2 (a tie), 1
    assert recall_at_k(torch.ones(3, 3), ks=(1, 3)) == {
        1: 0.0,
        3: 1.0,
    }  # ties count against the query
    with pytest.raises(ValueError, match="no correct item"):
        recall_at_k(sim, gallery_ids=torch.tensor([5, 6, 7, 8]))


def test_shapes_are_deterministic_and_hold_out_pairs():
    a, b = render_shapes(20, seed=7), render_shapes(20, seed=7)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, render_shapes(20, seed=8).images)
    tr = load_dataset("shapes_captions", "train", n=400)
    ho = load_dataset("shapes_captions", "heldout", n=100)
    held = {SHAPE_PAIRS.index(f"{c} {s}") for c, s in HELDOUT_PAIRS}
    assert held.isdisjoint(tr.labels.tolist()) and set(ho.labels.tolist()) == held
    assert tr.images.shape[1:] == (3, 28, 28) and tr.tokenizer.itos == ho.tokenizer.itos
    # the caption of every image names its own colour and shape
    for i in range(0, 400, 37):
        c, s = SHAPE_PAIRS[int(tr.labels[i])].split()
        assert all(c in cap and s in cap for cap in tr.captions_of(i))


def test_datasets_registered_as_image_text_and_online_needs_datasets_package():
    for name in ("fashion_captions", "shapes_captions", "flickr8k_captions"):
        assert DATASETS[name].kind == "image-text"
    assert METHODS["clip"].modality == "image-text"
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DatasetUnavailableError, match="pip install datasets"):
            load_dataset("flickr8k_captions", "train")
    with pytest.raises(DatasetUnavailableError):
        load_dataset("flickr8k_captions", "train", download=False)


@pytest.fixture(scope="module")
def quick_run():
    tr = load_dataset("fashion_captions", "train", max_items=4000)
    te = load_dataset("fashion_captions", "test", max_items=1000)
    torch.manual_seed(0)
    m = build_clip(data=tr, image_tower="small_cnn")
    h = fit(m, tr, steps=60, batch_size=128, lr=0.002, weight_decay=0.1, warmup=0.1, progress=False)
    return m, h, tr, te


def test_quick_run_loss_falls_and_zero_shot_beats_chance(quick_run):
    m, h, tr, te = quick_run
    assert h["loss"][-1] < h["loss"][0] - 0.5
    assert max(h["logit_scale"]) <= 100.0 + 1e-3
    acc = zero_shot_accuracy(m, te, FASHION_CLASSNAMES, FASHION_PROMPTS)
    assert acc > 0.3, acc  # chance: 0.1
    proto = zero_shot_classifier(m, FASHION_CLASSNAMES, FASHION_PROMPTS)
    assert proto.shape == (10, 64) and torch.allclose(proto.norm(dim=1), torch.ones(10), atol=1e-5)


def test_prompt_ensemble_is_mean_of_normalised_features(quick_run):
    m = quick_run[0]
    templates = ["a photo of a {}.", "a {}."]
    proto = zero_shot_classifier(m, ["bag", "coat"], templates)
    with torch.no_grad():
        f = torch.stack(
            [m.encode_text([t.format(c) for t in templates]).mean(0) for c in ("bag", "coat")]
        )
    assert torch.allclose(proto, F.normalize(f, dim=1), atol=1e-5)
