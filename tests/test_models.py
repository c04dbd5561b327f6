"""Backbones, layer lookup, the fx split, inserted convs and checkpoints."""


import pytest
import torch

from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.errors import CnnexplainError, UsageError
from cnnexplain.models import zoo
from cnnexplain.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cnnexplain.models.layers import get_module, record, split_at
from cnnexplain.models.loading import load_model
from cnnexplain.models.network import build_network


def _input(name, n=2):
    size = max(32, zoo.get_spec(name).min_size + 1)
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g)


@pytest.mark.parametrize("name", list(zoo.BACKBONES))
def test_split_reproduces_forward_and_layer_output(name):
    torch.manual_seed(0)
    model = zoo.build(name, num_classes=5).eval()
    x = _input(name)
    spec = zoo.get_spec(name)
    with torch.no_grad(), record(model, [spec.default_layer]) as acts:
        ref = model(x)
    split = split_at(model, spec.default_layer)
    with torch.no_grad():
        a, *extras = split.body(x)
        out = split.tail(a, *extras)
    assert torch.allclose(a, acts[spec.default_layer])
    assert torch.allclose(out, ref, atol=1e-5)
    # parameters are shared, not copied
    p = next(model.parameters())
    assert any(q is p for q in split.parameters())


def test_split_inside_a_residual_block_carries_the_skip():
    torch.manual_seed(0)
    model = zoo.build("resnet18", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    split = split_at(model, "layer4.1.conv2")
    assert split.n_extras >= 1  # the skip input of layer4.1
    with torch.no_grad():
        a, *extras = split.body(x)
        assert torch.allclose(split.tail(a, *extras), model(x), atol=1e-5)
        # an intervention at the layer changes only what comes after it
        changed = split.tail(torch.zeros_like(a), *extras)
    assert not torch.allclose(changed, model(x))


def test_reused_module_is_refused_and_bad_names_suggest():
    model = zoo.build("resnet18", num_classes=4)
    with pytest.raises(UsageError, match="runs 2 times"):
        split_at(model, "layer4.1.relu")
    with pytest.raises(UsageError, match="did you mean 'layer4'"):
        get_module(model, "layer44")


@pytest.mark.parametrize("name", ["smallcnn", "resnet18", "vgg11_bn", "mobilenet_v2", "densenet121"])
def test_insert_conv_resizes_head(name):
    torch.manual_seed(0)
    model, layer = build_network(name, 6, insert=12)
    x = _input(name)
    with torch.no_grad(), record(model, [layer]) as acts:
        y = model.eval()(x)
    assert acts[layer].shape[1] == 12
    assert y.shape == (2, 6)


def test_insert_conv_refused_before_more_convs():
    with pytest.raises(UsageError, match="convolutions follow"):
        build_network("resnet18", 6, layer="layer3", insert=8)


@pytest.mark.parametrize("name", list(zoo.BACKBONES))
def test_checkpoint_round_trip_every_backbone(name, tmp_path):
    torch.manual_seed(1)
    model, layer = build_network(name, 3)
    model.eval()
    gate = {"W": torch.rand(8, 3)}
    prep = Preprocessing(resize=40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    meta = {"backbone": name, "num_classes": 3, "class_names": ["a", "b", "c"], "layer": layer,
            "method": "cdcnn-r1p2", "preprocessing": prep.to_dict()}
    path = tmp_path / "ck.pt"
    save_checkpoint(path, Checkpoint(meta=meta, state_dict=model.state_dict(), gate=gate))
    loaded = load_model(checkpoint=path)
    x = _input(name)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert loaded.preprocessing == prep
    assert loaded.class_names == ["a", "b", "c"]
    assert torch.equal(loaded.gate["W"], gate["W"])
    assert loaded.method == "cdcnn-r1p2" and loaded.layer == layer


def test_checkpoint_with_inserted_conv_round_trips(tmp_path):
    torch.manual_seed(2)
    model, layer = build_network("resnet18", 4, insert=16)
    meta = {"backbone": "resnet18", "num_classes": 4, "layer": layer, "insert_conv": 16}
    save_checkpoint(tmp_path / "c.pt", Checkpoint(meta=meta, state_dict=model.state_dict()))
    loaded = load_model(checkpoint=tmp_path / "c.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model.eval()(x))


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/cnnexplain-pwned",))


def test_pickled_code_checkpoint_is_refused_never_executed(tmp_path):
    import os

    marker = "/tmp/cnnexplain-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    torch.save({"format": "cnnexplain-checkpoint", "payload": _Evil()}, path)
    with pytest.raises(CnnexplainError, match="refused"):
        load_checkpoint(path)
    assert not os.path.exists(marker)
    with pytest.raises(CnnexplainError, match="refused"):
        zoo.safe_load_state_dict(path)
    assert not os.path.exists(marker)


def test_broken_checkpoints_give_one_line_errors(tmp_path):
    model = zoo.build("smallcnn", num_classes=3)
    good = tmp_path / "good.pt"
    save_checkpoint(good, Checkpoint(meta={"backbone": "smallcnn", "num_classes": 3},
                                     state_dict=model.state_dict()))
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "rand.pt").write_bytes(bytes(range(256)) * 10)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    cases = {"missing.pt": "does not exist", "trunc.pt": "corrupt", "rand.pt": "corrupt",
             "plain.pt": "plain state_dict"}
    for name, words in cases.items():
        with pytest.raises(CnnexplainError, match=words) as info:
            load_checkpoint(tmp_path / name)
        assert "\n" not in info.value.line()


def test_weights_file_loading_and_mismatches(tmp_path):
    torch.manual_seed(3)
    src = zoo.build("resnet18", num_classes=7)
    torch.save(src.state_dict(), tmp_path / "r18.pt")
    loaded = load_model(backbone="resnet18", weights=str(tmp_path / "r18.pt"))
    assert loaded.num_classes == 7
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), src.eval()(x))
    with pytest.raises(UsageError, match="does not match the weights"):
        load_model(backbone="resnet18", weights=str(tmp_path / "r18.pt"), num_classes=3)
    with pytest.raises(CnnexplainError, match="not a resnet34|does not match backbone"):
        load_model(backbone="resnet34", weights=str(tmp_path / "r18.pt"))
    with pytest.raises(CnnexplainError, match="vgg11"):
        load_model(backbone="vgg11", weights=str(tmp_path / "r18.pt"))


def test_imagenet_weights_offline_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CnnexplainError) as info:
        load_model(backbone="resnet18", weights="imagenet")
    assert str(tmp_path) in info.value.line() and "resnet18-" in info.value.line()


def test_fingerprint_tracks_weights():
    torch.manual_seed(0)
    a = load_model(backbone="smallcnn", num_classes=3)
    torch.manual_seed(0)
    b = load_model(backbone="smallcnn", num_classes=3)
    torch.manual_seed(1)
    c = load_model(backbone="smallcnn", num_classes=3)
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_record_is_not_changed_by_a_following_inplace_op():
    from cnnexplain.models.smallcnn import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    bn = model.features[1]  # followed by ReLU(inplace=True)
    with torch.no_grad():
        expected = bn(model.features[0](x))
        with record(model, ["features.1"]) as acts:
            model(x)
    assert expected.min() < 0
    assert torch.equal(acts["features.1"], expected)
