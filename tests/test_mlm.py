"""BERT MLM (chapter 17): masking statistics, closed forms, padding, tokenizer, save/load,
learning on WordNet, bad input."""

import math
import sys

import pytest
import torch

from ssl_course.data import (
    DATASETS,
    DataError,
    DatasetUnavailableError,
    load_dataset,
    sample_per_class,
)
from ssl_course.evaluate import fine_tune
from ssl_course.train import METHODS, fit
from ssl_course.mlm import (
    BertMLM,
    TinyBert,
    build_mlm,
    evaluate_mlm,
    fill_mask,
    load_bert,
    mask_tokens_for_mlm,
    mlm_loss,
    save_bert,
    trim_padding,
)
from ssl_course.text_data import (
    SPECIAL_TOKENS,
    TextDataset,
    encode_texts,
    find_wordnet,
    gloss_text,
    load_hf_text,
    read_wordnet,
    special_token_ids,
    train_wordpiece,
)


def wordnet_available() -> bool:
    try:
        find_wordnet()
        return True
    except DatasetUnavailableError:
        return False


needs_wordnet = pytest.mark.skipif(
    not wordnet_available(), reason="Debian package wordnet-base not installed"
)
SPECIAL = [0, 1, 2, 3, 4]
V = 500


def fake_batch(n=400, t=60, seed=0):
    "Rows of [CLS] tokens... [SEP] [PAD]...: random lengths, ids 5..V-1, some [UNK] inside."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (n, t), generator=g)
    ids[torch.rand(n, t, generator=g) < 0.02] = 1
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    pos = torch.arange(t)[None]
    ids[pos >= lengths[:, None]] = 0
    ids[:, 0] = 2
    ids[torch.arange(n), lengths - 1] = 3
    return ids


@pytest.fixture(scope="module")
def tok():
    if not wordnet_available():
        pytest.skip("Debian package wordnet-base not installed")
    rows, test = read_wordnet()
    texts = [gloss_text(r) for r, t in zip(rows, test) if not t][:30000]
    return train_wordpiece(texts, vocab_size=2000, cache=False)


# --- masking --------------------------------------------------------------------------------------


def test_masking_statistics():
    ids = fake_batch()
    masked, labels = mask_tokens_for_mlm(
        ids, V, 4, SPECIAL, generator=torch.Generator().manual_seed(1)
    )
    eligible = ~torch.isin(ids, torch.tensor(SPECIAL))
    sel = labels != -100
    frac = sel.sum().item() / eligible.sum().item()
    assert abs(frac - 0.15) < 0.006  # ~13k eligible tokens: sd ~ 0.003
    m = masked[sel]
    p_mask = (m == 4).float().mean().item()
    p_same = (m == ids[sel]).float().mean().item()
    p_rand = 1 - p_mask - p_same
    assert abs(p_mask - 0.8) < 0.025 and abs(p_same - 0.1) < 0.02 and abs(p_rand - 0.1) < 0.02
    assert not torch.isin(
        m[(m != 4) & (m != ids[sel])], torch.tensor(SPECIAL)
    ).any()  # random tokens are never special


def test_specials_and_padding_never_selected_labels_exact():
    ids = fake_batch(seed=3)
    for p in (0.15, 0.5, 1.0):
        masked, labels = mask_tokens_for_mlm(
            ids, V, 4, SPECIAL, p, generator=torch.Generator().manual_seed(0)
        )
        special = torch.isin(ids, torch.tensor(SPECIAL))
        assert (labels[special] == -100).all() and torch.equal(masked[special], ids[special])
        sel = labels != -100
        assert torch.equal(labels[sel], ids[sel])  # the original token where selected...
        assert torch.equal(masked[~sel], ids[~sel])  # ...and the input untouched elsewhere
        if p == 1.0:
            assert torch.equal(sel, ~special)
    masked, labels = mask_tokens_for_mlm(ids, V, 4, SPECIAL, 0.0)
    assert (labels == -100).all() and torch.equal(masked, ids)


def test_masking_seeded_and_ablation_fractions():
    ids = fake_batch()
    a = mask_tokens_for_mlm(ids, V, 4, SPECIAL, generator=torch.Generator().manual_seed(7))
    b = mask_tokens_for_mlm(ids, V, 4, SPECIAL, generator=torch.Generator().manual_seed(7))
    c = mask_tokens_for_mlm(ids, V, 4, SPECIAL, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    masked, labels = mask_tokens_for_mlm(ids, V, 4, SPECIAL, mask_fraction=1.0, random_fraction=0.0)
    assert (masked[labels != -100] == 4).all()


def test_masking_bad_input():
    ids = fake_batch(4, 10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_tokens_for_mlm(ids, V, 4, SPECIAL, 1.5)
    with pytest.raises(TypeError, match="integer"):
        mask_tokens_for_mlm(ids.float(), V, 4, SPECIAL)
    with pytest.raises(ValueError, match="must lie in"):
        mask_tokens_for_mlm(ids, 10, 4, SPECIAL)
    with pytest.raises(ValueError, match="split"):
        mask_tokens_for_mlm(ids, V, 4, SPECIAL, mask_fraction=0.8, random_fraction=0.3)


# --- loss and model -------------------------------------------------------------------------------


def test_uniform_prediction_costs_log_vocab():
    labels = torch.tensor([[5, -100, 9, 7], [-100, -100, 3, 100]])
    assert math.isclose(mlm_loss(torch.zeros(2, 4, V), labels).item(), math.log(V), rel_tol=1e-6)
    assert math.isclose(
        mlm_loss(torch.full((2, 4, V), 3.7), labels).item(), math.log(V), rel_tol=1e-6
    )


def test_mlm_loss_matches_slow_rederivation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 20, generator=g)
    labels = torch.randint(0, 20, (3, 6), generator=g)
    labels[torch.rand(3, 6, generator=g) < 0.5] = -100
    terms = [
        -(logits[i, j].exp() / logits[i, j].exp().sum())[labels[i, j]].log()
        for i in range(3)
        for j in range(6)
        if labels[i, j] != -100
    ]
    assert torch.allclose(mlm_loss(logits, labels), torch.stack(terms).mean(), atol=1e-5)


def test_padding_is_invisible_and_weights_tied():
    torch.manual_seed(0)
    model = BertMLM(
        TinyBert(vocab_size=V, max_len=24, dim=32, depth=2, heads=4, dropout=0.0)
    ).eval()
    assert model.decoder.weight is model.encoder.tok_embed.weight
    ids = fake_batch(3, 24)
    with torch.no_grad():
        h = model.encoder.forward_tokens(ids)
        for i in range(3):
            n = int((ids[i] != 0).sum())
            assert torch.allclose(
                h[i, :n], model.encoder.forward_tokens(ids[i : i + 1, :n])[0], atol=1e-5
            )
        assert torch.allclose(model.encoder(ids), model.encoder(trim_padding(ids)), atol=1e-5)
        mean = model.encoder(ids, pooling="mean")
        m = (ids != 0).float()[..., None]
        assert torch.allclose(mean, (h * m).sum(1) / m.sum(1), atol=1e-5)
        assert torch.allclose(model.encoder(ids, pooling="cls"), h[:, 0])


def test_model_refuses_bad_input():
    model = BertMLM(TinyBert(vocab_size=V, max_len=16, dim=32, depth=1, heads=4))
    with pytest.raises(ValueError, match="max_len=16"):
        model.encoder(torch.full((2, 17), 7))
    with pytest.raises(ValueError, match="max_len=16"):
        model.training_step(torch.full((2, 17), 7))
    with pytest.raises(ValueError, match="another tokenizer"):
        model.encoder(torch.full((1, 4), V))
    with pytest.raises(ValueError, match="PAD"):
        BertMLM(TinyBert(vocab_size=V, pad_id=0), special_token_ids=[1, 2])
    with pytest.raises(ValueError, match="pooling"):
        TinyBert(vocab_size=V, pooling="max")


# --- tokenizer, datasets, save/load ---------------------------------------------------------------


@needs_wordnet
def test_tokenizer_round_trip_and_specials(tok):
    assert special_token_ids(tok) == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    rows, test = read_wordnet()
    texts = [r["definition"] for r in rows[5000:5200] if r["definition"]]
    ids = encode_texts(tok, texts, max_len=128)
    assert (ids[:, 0] == 2).all()
    for t, row in zip(texts, ids):
        assert tok.decode(row.tolist()).replace(" ", "") == t.lower().replace(" ", "")
    assert (
        tok.decode(encode_texts(tok, "a dog that barks at night", 16)[0].tolist())
        == "a dog that barks at night"
    )


def test_tokenizer_cache_is_keyed_and_atomic(tmp_path):
    texts = ["the cat sat on the mat", "a dog barked at the cat", "the mat was red"] * 20
    t1 = train_wordpiece(texts, vocab_size=60, data_dir=tmp_path)
    files = sorted((tmp_path / "tokenizers").iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"  # no temporary files left behind
    t2 = train_wordpiece(texts, vocab_size=60, data_dir=tmp_path)
    assert t2.get_vocab() == t1.get_vocab()
    train_wordpiece(texts, vocab_size=70, data_dir=tmp_path)  # other parameters: another file
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2


@needs_wordnet
def test_encode_bad_input(tok):
    with pytest.raises(DataError, match="empty"):
        encode_texts(tok, "")
    with pytest.raises(DataError, match="empty"):
        encode_texts(tok, ["fine", "   "])
    long = "word " * 100
    with pytest.raises(ValueError, match="max_len"):
        encode_texts(tok, long, max_len=32, truncate=False)
    cut = encode_texts(tok, long, max_len=32)
    assert cut.shape == (1, 32) and cut[0, -1] == 3
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        fill_mask(BertMLM.from_tokenizer(tok, max_len=32, dim=32, depth=1), tok, "no blank here")


def test_missing_corpus_names_debian_package(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="wordnet-base"):
        find_wordnet(tmp_path, search_dirs=[tmp_path / "nowhere"])
    with pytest.raises(DatasetUnavailableError, match="wordnet-base"):
        DATASETS["wordnet_glosses"].loader("train", data_dir=tmp_path, search_dirs=[])


def test_hf_datasets_missing_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DatasetUnavailableError, match="pip install datasets"):
        load_hf_text("wikitext", "wikitext-2-raw-v1")


def test_registry_entries():
    for name in ("wordnet_glosses", "wordnet_categories", "wikitext", "ag_news"):
        assert DATASETS[name].kind == "text"
    assert METHODS["mlm"].modality == "text"


@needs_wordnet
def test_save_load_round_trip(tok, tmp_path):
    torch.manual_seed(0)
    model = BertMLM.from_tokenizer(tok, max_len=32, dim=32, depth=1, heads=4).eval()
    save_bert(model, tok, tmp_path / "bert")
    assert sorted(p.name for p in (tmp_path / "bert").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    loaded, tok2 = load_bert(tmp_path / "bert")
    assert loaded.decoder.weight is loaded.encoder.tok_embed.weight
    ids = encode_texts(tok2, ["a [MASK] that barks", "an edible fruit"], 32)
    with torch.no_grad():
        assert torch.allclose(model(ids), loaded(ids))
    assert tok2.get_vocab() == tok.get_vocab()
    with pytest.raises(FileNotFoundError, match="save_bert"):
        load_bert(tmp_path)


# --- learning on real data ------------------------------------------------------------------------


@needs_wordnet
def test_mlm_loss_falls_on_wordnet(tok):
    corpus = load_dataset("wordnet_glosses", "train", tokenizer=tok, max_len=24, max_items=3200)
    held = load_dataset("wordnet_glosses", "test", tokenizer=tok, max_len=24, max_items=500)
    torch.manual_seed(0)
    model = build_mlm(None, data=corpus, dim=48, depth=1, heads=4, dropout=0.0)
    before = evaluate_mlm(model, held)
    assert abs(before["loss"] - math.log(tok.get_vocab_size())) < 0.5
    hist = fit(
        model,
        corpus.without_labels(),
        steps=50,
        batch_size=48,
        lr=3e-3,
        progress=False,
        device="cpu",
    )
    after = evaluate_mlm(model, held)
    assert after["loss"] < before["loss"] - 0.8  # well below uniform guessing (log V)
    assert after["accuracy"] > 0.02  # uniform guessing: 1/V = 0.0005
    assert sum(hist["loss"][-10:]) / 10 < sum(hist["loss"][:10]) / 10 - 0.5
    assert math.isclose(after["perplexity"], math.exp(after["loss"]))


@needs_wordnet
def test_fine_tuned_classifier_beats_chance(tok):
    train = load_dataset("wordnet_categories", "train", tokenizer=tok, max_len=24)
    test = load_dataset("wordnet_categories", "test", tokenizer=tok, max_len=24)
    assert train.num_classes == 10 and isinstance(train, TextDataset)
    test = test.subset(sample_per_class(test.labels, 30, seed=0))
    sub = train.subset(sample_per_class(train.labels, 20, seed=0))
    torch.manual_seed(0)
    enc = TinyBert(
        vocab_size=tok.get_vocab_size(), max_len=24, dim=48, depth=1, heads=4, dropout=0.0
    )
    acc = fine_tune(
        enc,
        sub,
        test,
        steps=60,
        batch_size=32,
        lr=2e-3,
        backbone_lr_scale=1.0,
        augment=None,
        device="cpu",
    ).accuracy
    assert acc > 0.2  # chance is 0.1 on a balanced test set
