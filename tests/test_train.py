"fit(), checkpoints, resume, safety of loading, DDP (ssl_course.train)."

import math
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from _toy_methods import make_data, make_method
from _torchrun import torchrun
from ssl_course.train import (
    CheckpointError,
    Callback,
    NonFiniteLossError,
    build_method,
    fit,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    lr_at,
    make_optimizer,
    save_checkpoint,
)

HERE = Path(__file__).parent


def test_lr_schedule_closed_form():
    assert lr_at(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, warmup_steps=10) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_at(100, 100, 1.0, warmup_steps=10, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(50, 100, 0.3, schedule="constant") == 0.3


def test_fit_lowers_the_loss_and_checks_arguments():
    torch.manual_seed(0)
    m = make_method("regression")
    hist = fit(m, make_data("regression"), steps=60, batch_size=16, lr=0.05, progress=False)
    assert hist["loss"][-1] < 0.7 * hist["loss"][0]
    assert hist.rows[-1]["step"] == 60
    with pytest.raises(ValueError, match="exactly one of steps= or epochs="):
        fit(m, make_data("regression"), batch_size=16)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        fit(m, make_data("regression"), steps=2, resume=True, progress=False)


def test_non_finite_loss_stops_with_advice():
    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(6, 3)

        def training_step(self, batch):
            return self.encoder(batch[0]).sum() * float("nan")

    with pytest.raises(NonFiniteLossError, match="lower lr"):
        fit(Exploding(), make_data("regression"), steps=3, batch_size=8, progress=False)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = make_method("regression")
    opt = make_optimizer(m, "adamw", 1e-2)
    m.training_step(make_data("regression")[:8]).backward()
    opt.step()
    path = save_checkpoint(tmp_path, 7, m, opt, {"note": "hi"})
    assert path.name == "step-00000007" and latest_checkpoint(tmp_path) == path
    assert {p.name for p in path.iterdir()} == {
        "model.safetensors",
        "state.safetensors",
        "state.json",
    }
    m2 = make_method("regression")
    opt2 = make_optimizer(m2, "adamw", 1e-2)
    meta = load_checkpoint(path, m2, opt2)
    assert meta["step"] == 7 and meta["note"] == "hi"
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    # older checkpoints are pruned, the newest kept
    for step in (8, 9, 10):
        save_checkpoint(tmp_path, step, m, opt, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000009", "step-00000010"]


def test_corrupt_checkpoint_is_detected(tmp_path):
    m = make_method("regression")
    path = save_checkpoint(tmp_path, 1, m)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path, make_method("regression"))


class Stop(Callback):
    "Simulate a crash after `at` steps."

    def __init__(self, at):
        self.at = at

    def on_step_end(self, trainer, logs):
        if trainer.step == self.at:
            raise RuntimeError("simulated crash")


def test_resume_equals_an_uninterrupted_run(tmp_path):
    kw = dict(steps=20, batch_size=16, lr=0.05, seed=3, progress=False, device="cpu")
    torch.manual_seed(0)
    ref = make_method("noisy")
    ref_hist = fit(ref, make_data("regression"), **kw)

    torch.manual_seed(0)
    run = make_method("noisy")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(
            run,
            make_data("regression"),
            checkpoint_dir=tmp_path,
            checkpoint_every=5,
            callbacks=[Stop(13)],
            **kw,
        )
    assert latest_checkpoint(tmp_path).name == "step-00000010"
    torch.manual_seed(123)
    resumed = make_method("noisy")  # a fresh process: other init, other RNG state
    hist = fit(
        resumed,
        make_data("regression"),
        checkpoint_dir=tmp_path,
        checkpoint_every=5,
        resume=True,
        **kw,
    )
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert hist["loss"] == ref_hist["loss"]
    # resuming with another length is refused instead of silently mixing schedules
    with pytest.raises(CheckpointError, match="20-step run"):
        fit(
            make_method("noisy"),
            make_data("regression"),
            checkpoint_dir=tmp_path,
            resume=True,
            **{**kw, "steps": 30},
        )


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_pickles_are_never_loaded(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    payload = pickle.dumps({"weight": _Evil()})
    (tmp_path / "model.pt").write_bytes(payload)
    (tmp_path / "model.bin").write_bytes(payload)
    (tmp_path / "fake.safetensors").write_bytes(payload)
    ck = tmp_path / "ckpt" / "step-00000001"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(payload)
    (ck / "state.json").write_text('{"step": 1}')
    m = make_method("regression")
    for target, msg in (
        (tmp_path / "model.pt", "never unpickles"),
        (tmp_path / "model.bin", "never unpickles"),
        (tmp_path / "fake.safetensors", "corrupt or not a safetensors"),
        (ck, "corrupt or not a safetensors"),
        (tmp_path / "ckpt", "corrupt or not a safetensors"),
    ):
        with pytest.raises(CheckpointError, match=msg):
            load_checkpoint(target, m) if target.is_dir() else load_weights(m, target)
    assert not marker.exists()


def test_build_method_names_the_registry():
    with pytest.raises(KeyError, match="registered: "):
        build_method("no_such_method", nn.Linear(2, 2))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_ddp_two_processes_match_one_process(tmp_path):
    """2 CPU processes (gloo, torchrun) end at the same weights as one process with the same global
    batch."""
    path = str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = torchrun(HERE / "_ddp_worker.py", str(tmp_path), env={"PYTHONPATH": path})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for kind in ("regression", "ntxent"):
        torch.manual_seed(0)
        single = make_method(kind)
        fit(
            single,
            make_data(kind),
            steps=6,
            batch_size=8,
            lr=0.1,
            optimizer="sgd",
            warmup=0,
            device="cpu",
            seed=0,
            progress=False,
        )
        ddp = load_file(str(tmp_path / f"{kind}.safetensors"))
        for k, v in single.state_dict().items():
            torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6)
        ddp_loss = [
            float(v) for v in (tmp_path / f"{kind}.loss").read_text().strip("[]\n").split(",")
        ]
        # rank 0 logs the mean over its half of the batch; the first step's loss is still close to
        # the global one
        assert len(ddp_loss) == 6 and all(math.isfinite(x) for x in ddp_loss)
    # DINO's center is all-reduced and MoCo's queue enqueues the gathered global batch
    from ssl_course.dino import update_center
    from ssl_course.moco import FeatureQueue

    g = torch.Generator().manual_seed(5)
    teacher = [torch.randn(8, 6, generator=g) for _ in range(2)]
    keys = torch.randn(8, 4, generator=g)
    st = load_file(str(tmp_path / "state.safetensors"))
    torch.testing.assert_close(st["center"], update_center(torch.zeros(1, 6), teacher, 0.9))
    q = FeatureQueue(10, 4)
    q.queue.zero_()
    q.enqueue(keys)
    q.enqueue(keys)
    torch.testing.assert_close(st["queue"], q.queue)
    assert int(st["ptr"][0]) == int(q.ptr) == 6


# --- synchronised batch norm under DDP ------------------------------------------------------------
class _BNMethod(nn.Module):
    sync_batchnorm = True

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 36, 8),
            nn.BatchNorm1d(8),
        )
        self.target = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8, affine=False))

    def training_step(self, batch):
        return self.target(self.encoder(batch[0])).pow(2).mean()


def _bn_types(m):
    return [type(x) for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]


def test_sync_batchnorm_is_used_on_cuda_ddp_for_methods_that_ask(monkeypatch):
    """SimCLR's global BN (Chen et al. 2020), BYOL (Grill et al. 2020) and DINO (Caron et al. 2021);
    MoCo uses shuffle BN."""
    import warnings
    import ssl_course.byol
    import ssl_course.dino
    import ssl_course.moco
    import ssl_course.simclr  # noqa: F401 (register the methods)
    import ssl_course.train as T
    from ssl_course.backbones import SmallConvNet

    cuda = torch.device("cuda")
    torch.manual_seed(0)
    m = _BNMethod()
    m.encoder[1].running_mean.uniform_()
    m.encoder[1].weight.data.uniform_()
    params, state = list(m.parameters()), {k: v.clone() for k, v in m.state_dict().items()}
    out = T.maybe_sync_batchnorm(m, cuda, world=2)
    assert _bn_types(out) == [nn.SyncBatchNorm] * 3  # every BN, online and target
    assert all(
        a is b for a, b in zip(out.parameters(), params)
    )  # same Parameters: an optimiser stays valid
    assert {k: v for k, v in out.state_dict().items()}.keys() == state.keys()
    assert all(torch.equal(out.state_dict()[k], v) for k, v in state.items())
    # one process, or a method that does not ask (MoCo's shuffle BN): unchanged
    assert _bn_types(T.maybe_sync_batchnorm(_BNMethod(), cuda, world=1)) == [
        nn.BatchNorm2d,
        nn.BatchNorm1d,
        nn.BatchNorm1d,
    ]
    moco = build_method("moco", encoder=SmallConvNet(1, width=8), queue_size=32)
    assert not getattr(type(moco), "sync_batchnorm", False)
    assert nn.SyncBatchNorm not in _bn_types(T.maybe_sync_batchnorm(moco, cuda, world=2))
    for name in ("simclr", "byol", "dino"):
        meth = build_method(name, encoder=SmallConvNet(1, width=8))
        assert type(meth).sync_batchnorm is True, name
        assert set(_bn_types(T.maybe_sync_batchnorm(meth, cuda, world=4))) == {nn.SyncBatchNorm}, (
            name
        )
    # CPU (gloo): SyncBatchNorm cannot run there; warn once that the statistics stay per process
    monkeypatch.setattr(T, "_SYNC_BN_WARNED", False)
    with pytest.warns(UserWarning, match="per process"):
        cpu = T.maybe_sync_batchnorm(_BNMethod(), torch.device("cpu"), world=2)
    assert nn.SyncBatchNorm not in _bn_types(cpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.maybe_sync_batchnorm(_BNMethod(), torch.device("cpu"), world=2)  # the second time: silent


def test_fit_passes_the_method_through_maybe_sync_batchnorm(monkeypatch):
    import ssl_course.train as T

    seen = []
    real = T.maybe_sync_batchnorm
    monkeypatch.setattr(
        T,
        "maybe_sync_batchnorm",
        lambda method, device, world: (
            seen.append((method, device.type, world)) or real(method, device, world)
        ),
    )
    method = make_method("regression")
    fit(method, make_data("regression"), steps=1, batch_size=8, device="cpu", progress=False)
    assert seen == [(method, "cpu", 1)]
