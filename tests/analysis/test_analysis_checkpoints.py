"""Checkpoint discovery, ordering, and every format the analyzer reads."""

from __future__ import annotations

import collections
import pickle
import sys
import types
import warnings

import pytest
import torch
from analysis_helpers import small_mlp
from torch import nn

from stepguard.analysis import (
    CheckpointError,
    NoCheckpointsError,
    discover,
    load_state,
    natural_key,
    step_from_name,
)
from stepguard.analysis.checkpoints import AnalysisError, from_list, match_state_dict, read_file


def _touch(directory, *names):
    for name in names:
        (directory / name).write_bytes(b"")


def test_natural_sort_orders_numbers_by_value() -> None:
    names = ["step_10.pt", "step_9.pt", "step_100.pt", "step_1.pt"]
    assert sorted(names, key=natural_key) == ["step_1.pt", "step_9.pt", "step_10.pt", "step_100.pt"]
    assert sorted(["B2", "a10", "a2"], key=natural_key) == ["a2", "a10", "B2"]


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("step_120.pt", 120),
        ("ckpt_000120.pth", 120),
        ("epoch=3-step=1200.ckpt", 1200),
        ("model-global_step42.safetensors", 42),
        ("run2_iter_7.pt", 7),
        ("last.ckpt", None),
    ],
)
def test_step_from_name(name: str, step: int | None) -> None:
    assert step_from_name(name) == step


def test_discover_orders_by_step_and_leaves_out_unnumbered(tmp_path) -> None:
    _touch(
        tmp_path, "step_10.pt", "step_9.pt", "step_100.ckpt", "step_2.safetensors", "last.ckpt", "notes.txt"
    )
    found = discover(tmp_path)
    assert [c.name for c in found] == ["step_2.safetensors", "step_9.pt", "step_10.pt", "step_100.ckpt"]
    assert [c.step for c in found] == [2, 9, 10, 100]


def test_discover_without_numbers_takes_natural_order(tmp_path) -> None:
    _touch(tmp_path, "b.pt", "a.pt", "c.pth")
    assert [(c.name, c.step) for c in discover(tmp_path)] == [("a.pt", 0), ("b.pt", 1), ("c.pth", 2)]


def test_discover_errors(tmp_path) -> None:
    with pytest.raises(NoCheckpointsError, match="no checkpoints in"):
        discover(tmp_path)
    with pytest.raises(NoCheckpointsError, match="does not exist"):
        discover(tmp_path / "absent")
    _touch(tmp_path, "model_5.pt", "model_5.safetensors")
    with pytest.raises(AnalysisError, match="two checkpoints have step 5"):
        discover(tmp_path)


def test_explicit_list_keeps_its_order(tmp_path) -> None:
    listed = from_list([tmp_path / "step_3.pt", tmp_path / "step_1.pt"])
    assert [(c.name, c.step) for c in listed] == [("step_3.pt", 3), ("step_1.pt", 1)]
    unnumbered = from_list([tmp_path / "final.pt", tmp_path / "best.pt"])
    assert [c.step for c in unnumbered] == [0, 1]


# ---------------------------------------------------------------- formats


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(1)
    return small_mlp()


def _same(state, model) -> None:
    ref = model.state_dict()
    assert list(state) == list(ref)
    for k in ref:
        assert torch.equal(state[k], ref[k])


@pytest.mark.parametrize("container", [None, "state_dict", "model_state_dict", "model", "module"])
def test_pt_state_dict_and_common_containers(tmp_path, net, container) -> None:
    sd = net.state_dict()
    obj = sd if container is None else {container: sd, "epoch": 3, "optimizer": {"lr": 0.1}}
    path = tmp_path / "step_1.pth"
    torch.save(obj, path)
    loaded = load_state(path, small_mlp())
    _same(loaded.state, net)
    assert loaded.prefix == ""


def test_lightning_ckpt_prefix_detected_and_other_modules_ignored(tmp_path, net) -> None:
    state = collections.OrderedDict((f"model.{k}", v) for k, v in net.state_dict().items())
    state["criterion.weight"] = torch.ones(10)  # another submodule of the LightningModule
    torch.save(
        {
            "state_dict": state,
            "epoch": 0,
            "global_step": 7,
            "pytorch-lightning_version": "2.4.0",
            "loops": {},
        },
        tmp_path / "epoch=0-step=7.ckpt",
    )
    loaded = load_state(tmp_path / "epoch=0-step=7.ckpt", small_mlp())
    _same(loaded.state, net)
    assert loaded.prefix == "model."
    assert "Lightning" in loaded.source


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_ddp_and_compile_prefixes(tmp_path, net, prefix) -> None:
    torch.save({f"{prefix}{k}": v for k, v in net.state_dict().items()}, tmp_path / "s.pt")
    loaded = load_state(tmp_path / "s.pt", small_mlp())
    _same(loaded.state, net)
    assert loaded.prefix == prefix


def test_safetensors(tmp_path, net) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file(net.state_dict(), str(tmp_path / "step_4.safetensors"))
    _same(load_state(tmp_path / "step_4.safetensors", small_mlp()).state, net)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.embed(x))


def test_safetensors_with_tied_weights_saved_once(tmp_path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model = Tied()
    safetensors_torch.save_model(model, str(tmp_path / "tied.safetensors"))
    loaded = load_state(tmp_path / "tied.safetensors", Tied())
    assert torch.equal(loaded.state["head.weight"], model.embed.weight.detach())
    assert torch.equal(loaded.state["embed.weight"], model.embed.weight.detach())


def test_named_key_and_pickled_module(tmp_path, net) -> None:
    torch.save({"ema": net.state_dict(), "weights": net.state_dict(), "step": 1}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"holds no state dict.*'ema'"):
        load_state(tmp_path / "a.pt", small_mlp())
    _same(load_state(tmp_path / "a.pt", small_mlp(), key="ema").state, net)
    with pytest.raises(CheckpointError, match="has no key 'nope'"):
        load_state(tmp_path / "a.pt", small_mlp(), key="nope")

    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="--unsafe-load") as info:
        load_state(tmp_path / "whole.pt", small_mlp())
    assert str(tmp_path / "whole.pt") in str(info.value)
    _same(load_state(tmp_path / "whole.pt", small_mlp(), unsafe=True).state, net)


def test_a_weights_only_refusal_names_the_blocked_global_in_full(tmp_path, net, monkeypatch) -> None:
    config = types.ModuleType("train-run-3")  # a module name the pickle keeps verbatim

    class Settings:
        pass

    Settings.__module__, Settings.__qualname__ = config.__name__, "Settings"
    config.Settings = Settings
    monkeypatch.setitem(sys.modules, config.__name__, config)
    torch.save({"state_dict": net.state_dict(), "settings": Settings()}, tmp_path / "run.pt")
    with pytest.raises(CheckpointError) as info:
        load_state(tmp_path / "run.pt", small_mlp())
    message = str(info.value)
    assert "the global train-run-3.Settings is not allowed" in message
    assert "pass --unsafe-load" in message and "corrupt" not in message
    _same(load_state(tmp_path / "run.pt", small_mlp(), unsafe=True).state, net)


@pytest.mark.parametrize(
    ("error", "name"),
    [  # the wording of older torch releases, and of torch's other refusals
        (
            "WeightsUnpickler error: Unsupported class numpy.core.multiarray._reconstruct",
            "numpy.core.multiarray._reconstruct",
        ),
        (
            "WeightsUnpickler error: Can only build Tensor, Parameter, OrderedDict or types allowlisted via "
            "`add_safe_globals`, but got <class 'my-train.Config'>",
            "my-train.Config",
        ),
        (
            "WeightsUnpickler error: Trying to load unsupported GLOBAL os.system whose module os is blocked.",
            "os.system",
        ),
    ],
)
def test_every_weights_only_refusal_names_its_global(tmp_path, net, monkeypatch, error, name) -> None:
    torch.save(net.state_dict(), tmp_path / "a.pt")

    def refuse(*args: object, weights_only: bool, **kwargs: object) -> object:
        raise pickle.UnpicklingError(
            "Weights only load failed. Re-running `torch.load` with `weights_only` "
            f"set to `False` will likely succeed. {error}"
        )

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(CheckpointError, match="pass --unsafe-load") as info:
        load_state(tmp_path / "a.pt", small_mlp())
    assert f"the global {name} is not allowed" in str(info.value) and "corrupt" not in str(info.value)


def test_missing_and_corrupt_files_name_the_file(tmp_path, net) -> None:
    with pytest.raises(CheckpointError, match=r"absent\.pt: no such file"):
        load_state(tmp_path / "absent.pt", small_mlp())
    torch.save(net.state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: corrupt or not a PyTorch checkpoint"):
        load_state(tmp_path / "cut.pt", small_mlp())
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01not safetensors")
    pytest.importorskip("safetensors")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors: not a readable safetensors file"):
        load_state(tmp_path / "junk.safetensors", small_mlp())


def test_state_dict_that_does_not_match_the_model(tmp_path) -> None:
    wide = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(
        CheckpointError,
        match=r"wide\.pt: does not match the model: shapes differ \(0\.weight: checkpoint \(32, 64\), model \(16, 64\)",
    ):
        load_state(tmp_path / "wide.pt", small_mlp())
    other = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10), nn.Linear(10, 10))
    torch.save(other.state_dict(), tmp_path / "deeper.pt")
    with pytest.raises(CheckpointError, match=r"2 keys are not in the model \('3\.weight', '3\.bias'\)"):
        load_state(tmp_path / "deeper.pt", small_mlp())
    partial = {k: v for k, v in small_mlp().state_dict().items() if k != "2.bias"}
    with pytest.raises(CheckpointError, match=r"1 of the model's 4 keys are missing \('2\.bias'\)"):
        match_state_dict(partial, small_mlp(), "p.pt")


def test_buffers_are_part_of_the_state(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))
    model[1].running_mean.fill_(3.0)
    torch.save(model.state_dict(), tmp_path / "bn.pt")
    loaded = load_state(
        tmp_path / "bn.pt", nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))
    )
    assert torch.equal(loaded.state["1.running_mean"], torch.full((8,), 3.0))
    assert "1.num_batches_tracked" in loaded.state


# ---------------------------------------------------------------- torch.distributed.checkpoint


def _dcp_save(state: dict, directory) -> None:
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(directory))


def test_dcp_directories_are_discovered_by_step_and_read_whole(tmp_path, net) -> None:
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(3, 64)).sum().backward()
    opt.step()
    for step in (20, 3):
        _dcp_save({"model": net.state_dict(), "optim": opt.state_dict(), "step": step}, tmp_path / f"step_{step}")
    (tmp_path / "not_a_checkpoint").mkdir()  # a directory without .metadata is not one
    found = discover(tmp_path)
    assert [(c.name, c.step, c.is_dcp) for c in found] == [("step_3", 3, True), ("step_20", 20, True)]
    loaded = load_state(found[0].path, small_mlp())
    _same(loaded.state, net)
    assert loaded.source == "'model'"
    with pytest.raises(CheckpointError, match=r"not_a_checkpoint: a directory, but not a torch\.distributed\.checkpoint"):
        load_state(tmp_path / "not_a_checkpoint", small_mlp())
    with pytest.raises(NoCheckpointsError, match=r"step_3 is one torch\.distributed\.checkpoint"):
        discover(tmp_path / "step_3")


def test_dcp_reads_only_tensors_unless_unsafe(tmp_path, net) -> None:
    _dcp_save({"model": net.state_dict(), "note": {"epoch": 4}}, tmp_path / "ckpt")
    assert set(read_file(tmp_path / "ckpt")) == {"model"}
    assert read_file(tmp_path / "ckpt", unsafe=True)["note"] == {"epoch": 4}


class _Payload:
    def __reduce__(self):
        return (print, ("ran",))


def test_dcp_metadata_with_foreign_objects_is_refused_without_unsafe(tmp_path, net) -> None:
    _dcp_save({"model": net.state_dict()}, tmp_path / "ckpt")
    meta = tmp_path / "ckpt" / ".metadata"
    index = pickle.loads(meta.read_bytes())
    index.storage_meta = _Payload()
    meta.write_bytes(pickle.dumps(index))
    with pytest.raises(CheckpointError, match=r"global builtins\.print is not allowed\); .*pass --unsafe-load"):
        load_state(tmp_path / "ckpt", small_mlp())
    meta.write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match=r"ckpt: corrupt \.metadata"):
        load_state(tmp_path / "ckpt", small_mlp())
