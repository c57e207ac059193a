"""Checkpoints: plain dicts that load safely, rebuild the exact model, fail clearly, write atomically."""

from __future__ import annotations

import collections
import os
import pathlib

import pytest
import torch

import fastvae
from fastvae.checkpoint import FORMAT, load_model_state, read_checkpoint, save_checkpoint
from fastvae.run_folder import atomic_write
from fastvae.errors import FastVAEError
from fastvae.trainer import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 2-epoch run, and the very module object the trainer optimized."""
    import fastvae.models as models
    from testkit import tiny_config

    captured = []
    original = models.build_model

    def capture(spec):
        model = original(spec)
        if not next(model.parameters()).is_meta:  # not train's check of the settings
            captured.append(model)
        return model

    import fastvae.trainer as train_module

    patched = [m for m in (models, train_module) if hasattr(m, "build_model")]
    for module in patched:
        module.build_model = capture
    try:
        config = tiny_config(tmp_path_factory.mktemp("ckpt") / "run", epochs=2)
        train(config)
    finally:
        for module in patched:
            module.build_model = original
    # the trainer builds one model; pictures are off, so nothing else calls build_model
    assert len(captured) == 1
    return config, captured[0]


def ckpt_file(config):
    return os.path.join(config.out, "checkpoints", "last.ckpt")


def test_checkpoint_is_a_plain_dict_loadable_with_weights_only(trained_run):
    config, _ = trained_run
    state = torch.load(ckpt_file(config), map_location="cpu", weights_only=True)
    assert isinstance(state, dict)
    assert state["format"] == FORMAT
    assert state["epoch"] == 2 and state["step"] == 48
    assert state["config"] == config.to_dict()
    assert state["spec"]["hidden_dim"] == 32 and state["spec"]["data_shape"] == [1, 8, 8]
    assert all(isinstance(v, torch.Tensor) for v in state["model"].values())
    assert set(state["optimizer"]) >= {"state", "param_groups"}
    assert isinstance(state["rng"]["torch"], torch.Tensor)


def test_load_rebuilds_the_trained_model(trained_run, digits):
    config, trained = trained_run
    for source in (config.out, ckpt_file(config)):  # a run folder or the file itself
        loaded = fastvae.load(source)
        assert not loaded.training and type(loaded) is type(trained)
        for name, tensor in trained.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        x = digits.test[:40]
        trained.eval()
        with torch.no_grad():
            for a, b in zip(loaded.encode(x), trained.encode(x)):
                assert torch.equal(a, b)
            z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
            assert torch.equal(loaded.decode(z), trained.decode(z))
            assert torch.equal(loaded.reconstruct(x), trained.reconstruct(x))
            g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
            assert torch.equal(loaded.sample(6, g1), trained.sample(6, g2))


def _expect(path, *needles):
    for reader in (read_checkpoint, fastvae.load):
        with pytest.raises(FastVAEError) as info:
            reader(path)
        message = str(info.value)
        for needle in needles:
            assert str(needle) in message, f"{needle!r} not in {message!r}"


def test_truncated_checkpoint(trained_run, tmp_path):
    raw = open(ckpt_file(trained_run[0]), "rb").read()
    for cut in (len(raw) // 2, len(raw) - 100, 10):
        path = tmp_path / f"cut{cut}.ckpt"
        path.write_bytes(raw[:cut])
        _expect(path, str(path), "not a readable fastvae checkpoint")


def test_random_bytes_and_empty_file(tmp_path):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(os.urandom(5000))
    _expect(path, str(path))
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    _expect(empty, str(empty))
    # a run's other files, or a pickle of objects: one short reason, not torch's weights_only paragraph
    config = tmp_path / "config.json"
    config.write_text('{"model": "mlp"}')
    _expect(config, str(config), "not a torch checkpoint file")
    pickled = tmp_path / "objects.ckpt"
    torch.save({"format": "x", "obj": collections.OrderedDict(a=pathlib.PurePosixPath("p"))}, pickled)
    _expect(pickled, str(pickled), "Python objects beyond tensors and plain data")
    for reader in (read_checkpoint, fastvae.load):
        with pytest.raises(FastVAEError) as info:
            reader(pickled)
        assert "weights_only" not in str(info.value) and len(str(info.value)) < 250


def test_a_checkpoint_that_cannot_be_read_says_why(tmp_path, monkeypatch):
    """A permission or disk error was reported as "not a torch checkpoint file" (zipfile's
    check swallows it); it says what the system said (root cannot be denied: simulated)."""
    import errno

    path = tmp_path / "last.ckpt"
    path.write_bytes(b"PK")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    import fastvae.checkpoint

    monkeypatch.setattr(torch, "load", denied)
    monkeypatch.setattr(fastvae.checkpoint, "open", denied, raising=False)  # the module's own reads
    _expect(path, f"could not read {path} (Permission denied)")


@pytest.mark.parametrize("obj", [{"a": 1}, [1, 2, 3], torch.zeros(3), {"format": "other-v9"}])
def test_foreign_torch_files(tmp_path, obj):
    path = tmp_path / "foreign.pt"
    torch.save(obj, path)
    _expect(path, str(path), "not a fastvae checkpoint")


def test_pickled_classes_are_refused(tmp_path):
    # weights_only loading: a checkpoint that needs arbitrary classes never runs their code
    import argparse

    path = tmp_path / "pickle.ckpt"
    torch.save({"format": FORMAT, "x": argparse.Namespace(a=1)}, path)
    _expect(path, str(path))


def test_missing_checkpoint(tmp_path):
    _expect(tmp_path / "nowhere", "does not exist")
    (tmp_path / "empty_run").mkdir()
    _expect(tmp_path / "empty_run", "checkpoints/last.ckpt")


def test_checkpoint_for_another_model_shape(trained_run, tmp_path):
    from fastvae.models import build_model

    config, _ = trained_run
    state = torch.load(ckpt_file(config), weights_only=True)
    bigger = build_model({**state["spec"], "hidden_dim": 64})
    with pytest.raises(FastVAEError) as info:
        load_model_state(bigger, state["model"], "some.ckpt")
    assert "some.ckpt" in str(info.value) and "hidden-dim" in str(info.value)
    # a file whose spec says 64 but whose weights are 32 wide
    state["spec"] = {**state["spec"], "hidden_dim": 64}
    path = tmp_path / "mismatch.ckpt"
    torch.save(state, path)
    with pytest.raises(FastVAEError) as info:
        fastvae.load(path)
    assert str(path) in str(info.value) and "does not fit" in str(info.value)


@pytest.mark.parametrize("missing", ["spec", "model"])
def test_checkpoint_missing_entries_is_a_clear_error(trained_run, tmp_path, missing):
    state = torch.load(ckpt_file(trained_run[0]), weights_only=True)
    del state[missing]
    path = tmp_path / "partial.ckpt"
    torch.save(state, path)
    with pytest.raises(FastVAEError) as info:
        fastvae.load(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- atomic writes


def _failing_save(real_save, fraction=0.5):
    """A torch.save that writes part of the real bytes to its target, then fails like a full disk."""

    def save(obj, f, *args, **kwargs):
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer)
        partial = buffer.getvalue()[: int(len(buffer.getvalue()) * fraction)]
        if hasattr(f, "write"):
            f.write(partial)
        else:
            with open(f, "wb") as out:
                out.write(partial)
        raise OSError(28, "No space left on device")

    return save


def test_save_checkpoint_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    save_checkpoint(path, {"epoch": 1, "config": {}, "spec": {}, "model": {"w": torch.arange(1000.0)}})
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _failing_save(torch.save))
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2, "config": {}, "spec": {}, "model": {"w": torch.zeros(1000)}})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary file left
    assert read_checkpoint(path)["epoch"] == 1


def test_atomic_write_leaves_target_untouched_on_error(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["metrics.csv"]
    with atomic_write(target) as tmp:
        tmp.write_text("new\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["metrics.csv"]


def test_trainer_checkpoint_failure_keeps_the_previous_checkpoint(make_config, monkeypatch):
    config = make_config(epochs=1)
    train(config)
    ckpt = os.path.join(config.out, "checkpoints", "last.ckpt")
    before = open(ckpt, "rb").read()
    monkeypatch.setattr(torch, "save", _failing_save(torch.save))
    with pytest.raises(OSError):
        train(make_config(epochs=2), resume=True)
    monkeypatch.undo()
    assert open(ckpt, "rb").read() == before
    assert os.listdir(os.path.dirname(ckpt)) == ["last.ckpt"]
    assert read_checkpoint(config.out)["epoch"] == 1
    # and the run resumes from there as if nothing had happened
    result = train(make_config(epochs=2), resume=True)
    assert result.epochs == 2 and read_checkpoint(config.out)["epoch"] == 2


def test_optimizer_state_converts_between_index_and_name_keys():
    """Checkpoints move between layouts: plain optimizers key their state by index, FSDP2's full
    state by parameter name; the implementation flags stay those of the loading optimizer."""
    from fastvae.models import build_model
    from fastvae.sharding import keep_implementation, optimizer_state_by_index, optimizer_state_by_name

    torch.manual_seed(0)
    model = build_model({"data_shape": [1, 8, 8], "hidden_dim": 16})
    plain = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    model(torch.rand(4, 1, 8, 8)).loss.backward()
    plain.step()
    by_index = plain.state_dict()
    by_name = optimizer_state_by_name(by_index, model)
    names = [n for n, _ in model.named_parameters()]
    assert list(by_name["state"]) == names and by_name["param_groups"][0]["params"] == names
    assert optimizer_state_by_name(by_name, model) is by_name  # already by name
    back = optimizer_state_by_index(by_name, model)
    assert back["param_groups"] == by_index["param_groups"]
    for i, moments in by_index["state"].items():
        assert all(torch.equal(moments[k], back["state"][i][k]) for k in moments)

    fused = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    fused.load_state_dict(keep_implementation(back, fused))
    assert fused.param_groups[0]["fused"] and not fused.param_groups[0]["foreach"]
    torch.testing.assert_close(fused.state_dict()["state"][0]["exp_avg"], by_index["state"][0]["exp_avg"])
