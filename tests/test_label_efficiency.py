"""Label efficiency with the zoo's encoders (chapter 22's full profile): the same labelled images as
the zoo's baselines file, the network from scratch trained with the zoo's protocol, and multipliers
that follow from the curves."""

import json

import pytest

from conftest import needs_fashion
from ssl_course import label_efficiency as le
from ssl_course import zoo
from ssl_course.data import sample_per_class


def test_zoo_models_and_methods_do_not_mix():
    with pytest.raises(ValueError, match="either zoo recipe names"):
        le.run_label_efficiency("quick", methods=["simclr-fmnist-cnn", "byol"])


def test_full_profile_names_zoo_models():
    from ssl_course.core import load_settings

    b = load_settings(profile="full").budget
    methods = le._as_list(b.le_methods)
    assert methods and all(m in zoo.RECIPES for m in methods)
    assert 60 in [int(k) for k in le._as_list(b.le_labels)]  # 1% of Fashion-MNIST's 60,000


@needs_fashion
def test_supervised_evaluator_reads_the_baselines_file_for_the_same_draw(monkeypatch):
    pool, test = zoo._eval_data("fashion_mnist", None, None)
    trained = []
    monkeypatch.setattr(zoo, "_sup_run", lambda *a, **k: trained.append(a) or 0.123)
    ev = le.zoo_supervised_evaluator("simclr-fmnist-cnn", pool, test)
    base = zoo.load_baselines(zoo.get_recipe("simclr-fmnist-cnn"))["supervised"]
    for seed in (0, 2):
        idx = sample_per_class(pool.labels, 10, seed=seed)
        assert ev(idx, seed) == base["accuracy"]["10"]["values"][seed]
    assert not trained and ev.reused == {10}
    assert ev(sample_per_class(pool.labels, 3, seed=0), 0) == 0.123  # not in the file: trained
    steps = trained[0][3]
    assert steps == zoo.supervised_steps(30, base["hparams"]["min_steps"]) == ev.steps[3]


@needs_fashion
def test_a_different_pool_is_refused_before_the_long_part(monkeypatch, tmp_path):
    real = zoo._eval_data
    monkeypatch.setattr(zoo, "_eval_data", lambda ds, p, t, d=None: real(ds, 2000, 500, d))
    monkeypatch.setattr(zoo, "_sup_run", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(RuntimeError, match="does not reproduce the zoo's baselines file"):
        le.run_zoo_label_efficiency(["simclr-fmnist-cnn"], labels=(1,), seeds=1, out_dir=tmp_path)


@needs_fashion
def test_report_holds_every_contender_and_consistent_multipliers(monkeypatch, tmp_path):
    real = zoo._eval_data
    monkeypatch.setattr(zoo, "_eval_data", lambda ds, p, t, d=None: real(ds, 2000, 500, d))
    # a from-scratch network whose accuracy grows with its labelled set:
    # 0.3 + 0.05 per label per class
    monkeypatch.setattr(zoo, "_sup_run", lambda make, tr, te, *a: 0.3 + 0.05 * len(tr) / 10)
    rep = le.run_zoo_label_efficiency(
        ["simclr-fmnist-cnn", "byol-fmnist-cnn"],
        labels=(2, 4, 8),
        seeds=2,
        out_dir=tmp_path,
        verbose=False,
        profile="test",
    )
    saved = json.loads((tmp_path / "label_efficiency_test.json").read_text())
    assert (tmp_path / "label_efficiency_test.png").is_file()
    assert saved["labels_per_class"] == [2, 4, 8] and saved["reference_labels_per_class"] == 2
    contenders = {r["method"] for r in saved["summary"]}
    assert contenders == {
        "simclr-fmnist-cnn + linear probe",
        "byol-fmnist-cnn + linear probe",
        "random encoder + linear probe",
        "raw pixels + linear probe",
        "supervised from scratch",
    }
    assert len(saved["rows"]) == len(contenders) * 3 * 2  # every contender, count and draw
    assert saved["supervised_from_baselines_file"] == []  # 2, 4 and 8 per class are not in the file
    sup = {
        r["labels_per_class"]: r["mean"]
        for r in saved["summary"]
        if r["method"] == "supervised from scratch"
    }
    assert sup == pytest.approx({2: 0.4, 4: 0.5, 8: 0.7})
    for m in rep["label_multipliers"]:  # recomputed independently from the straight line in log k
        target = m["target_accuracy"]
        if target <= 0.4:
            assert m["relation"] == "<="
        elif target >= 0.7:
            assert m["relation"] == ">="
        else:
            (k0, a0), (k1, a1) = ((2, 0.4), (4, 0.5)) if target <= 0.5 else ((4, 0.5), (8, 0.7))
            expected = k0 * (k1 / k0) ** ((target - a0) / (a1 - a0))
            assert m["relation"] == "="
            assert m["labels_needed"] == pytest.approx(expected, rel=1e-9)
            assert m["multiplier"] == pytest.approx(expected / m["at_labels_per_class"], rel=1e-9)
