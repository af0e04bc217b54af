"""A pretrained backbone from a local file: name/shape matching, 2D→3D inflation, RGB→phases, head skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks import nets

from fedrad.client.cnn_task import build_network
from fedrad.client.cnn_weights import load_pretrained
from fedrad.common.errors import FedradError


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """An "ImageNet-format" file: MONAI's 2D ResNet-18 uses torchvision's key names (conv1, bn1, layer1.0.conv1,
    ..., fc), so with 3 input channels and 1000 classes its state dict is laid out as torchvision's."""
    torch.manual_seed(7)
    source = nets.resnet18(spatial_dims=2, n_input_channels=3, num_classes=1000)
    path = tmp_path_factory.mktemp("weights") / "resnet18_imagenet.pth"
    torch.save(source.state_dict(), path)
    return source.eval(), path


def test_2d_kernels_inflated_into_a_3d_network_give_the_2d_response_on_a_depth_constant_input(tmp_path):
    torch.manual_seed(0)
    source = build_network("resnet18", spatial_dims=2, in_channels=1)
    torch.save(source.state_dict(), tmp_path / "r18_2d.pt")
    net = build_network("resnet18", spatial_dims=3, in_channels=1)
    report = load_pretrained(net, tmp_path / "r18_2d.pt")
    convs = [k for k, v in net.state_dict().items() if v.ndim == 5]
    assert report["loaded"] == len(net.state_dict()) and sorted(report["inflated"]) == sorted(convs)
    assert report["skipped"] == {} and report["channels_adapted"] == []
    image = torch.rand(2, 1, 24, 24)
    expected = source.conv1(image)
    got = net.conv1(image[..., None].expand(-1, -1, -1, -1, 13))
    half = net.conv1.kernel_size[-1] // 2  # away from the zero padding along z the 3D kernel sees a constant
    for z in range(half, 13 - half):
        torch.testing.assert_close(got[..., z], expected, atol=1e-5, rtol=0)
    # the same holds for a 3x3 kernel deeper in the network
    features = torch.rand(1, 64, 10, 10)
    torch.testing.assert_close(net.layer1[0].conv1(features[..., None].expand(-1, -1, -1, -1, 5))[..., 2],
                               source.layer1[0].conv1(features), atol=1e-5, rtol=0)


@pytest.mark.parametrize("phases", [1, 2])
def test_rgb_input_kernels_give_the_rgb_response_to_a_grey_image_over_the_phases(imagenet, phases):
    source, path = imagenet
    net = build_network("resnet18", spatial_dims=2, in_channels=phases)
    report = load_pretrained(net, path)
    assert report["channels_adapted"] == ["conv1.weight"] and report["inflated"] == []
    grey = torch.rand(2, 1, 32, 32)
    expected = F.conv2d(grey.repeat(1, 3, 1, 1), source.conv1.weight, stride=source.conv1.stride,
                        padding=source.conv1.padding)
    torch.testing.assert_close(net.conv1(grey.repeat(1, phases, 1, 1)), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(net.layer4[1].conv2.weight, source.layer4[1].conv2.weight)  # loaded as is


def test_imagenet_rgb_2d_file_into_a_3d_network_on_one_phase(imagenet):
    source, path = imagenet
    net = build_network("resnet18", spatial_dims=3, in_channels=1)
    report = load_pretrained(net, path)
    assert "conv1.weight" in report["inflated"] and report["channels_adapted"] == ["conv1.weight"]
    grey = torch.rand(1, 1, 20, 20)
    expected = F.conv2d(grey.repeat(1, 3, 1, 1), source.conv1.weight, stride=1, padding=3)
    torch.testing.assert_close(net.conv1(grey[..., None].expand(-1, -1, -1, -1, 9))[..., 4], expected,
                               atol=1e-5, rtol=0)


def test_the_head_is_skipped_reported_and_left_as_initialised(imagenet):
    _, path = imagenet
    net = build_network("resnet18", spatial_dims=2, in_channels=1)
    head = net.fc.weight.detach().clone(), net.fc.bias.detach().clone()
    report = load_pretrained(net, path)
    assert set(report["skipped"]) == {"fc.weight", "fc.bias"}
    assert "(1000, 512)" in report["skipped"]["fc.weight"] and "head" in report["skipped"]["fc.weight"]
    assert report["kept_initialised"] == ["fc.weight", "fc.bias"]
    assert report["loaded"] == len(net.state_dict()) - 2
    torch.testing.assert_close(net.fc.weight, head[0], rtol=0, atol=0)
    torch.testing.assert_close(net.fc.bias, head[1], rtol=0, atol=0)


@pytest.mark.parametrize("prefix, wrapper", [("module.", "state_dict"), ("_module.", "model"), ("", None)])
def test_prefixed_and_wrapped_state_dicts_load(tmp_path, prefix, wrapper):
    torch.manual_seed(1)
    source = build_network("resnet18", spatial_dims=2, in_channels=2)
    state = {prefix + k: v for k, v in source.state_dict().items()}
    torch.save({wrapper: state, "epoch": 3} if wrapper else state, tmp_path / "checkpoint.pth")
    net = build_network("resnet18", spatial_dims=2, in_channels=2)
    report = load_pretrained(net, tmp_path / "checkpoint.pth")
    assert report["loaded"] == len(state) and report["unmatched"] == [] and report["kept_initialised"] == []
    for k, v in source.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0)


def test_an_npz_of_float64_arrays_loads(tmp_path):
    """E.g. a previous run's RUN_DIR/cnn/weights.npz (float64, as the coordinator keeps weights)."""
    torch.manual_seed(2)
    source = build_network("resnet18", spatial_dims=2, in_channels=1)
    np.savez(tmp_path / "weights.npz", **{k: v.numpy().astype(np.float64) for k, v in source.state_dict().items()})
    net = build_network("resnet18", spatial_dims=2, in_channels=1)
    report = load_pretrained(net, tmp_path / "weights.npz")
    assert report["loaded"] == len(source.state_dict())
    for k, v in source.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0)


def test_torchvision_densenet_names_map_to_monai(tmp_path):
    source = build_network("densenet121", spatial_dims=2, in_channels=1)
    renamed = {k.replace(".layers.", ".").replace("class_layers.out.", "classifier."): v
               for k, v in source.state_dict().items()}
    assert "features.denseblock1.denselayer1.conv1.weight" in renamed and "classifier.weight" in renamed
    torch.save(renamed, tmp_path / "densenet.pt")
    net = build_network("densenet121", spatial_dims=2, in_channels=1)
    report = load_pretrained(net, tmp_path / "densenet.pt")
    assert report["loaded"] == len(renamed) and report["unmatched"] == []


def test_garbage_missing_and_unrelated_files_are_refused_clearly(tmp_path, imagenet):
    net = build_network("resnet18", spatial_dims=2, in_channels=1)
    (tmp_path / "garbage.pth").write_bytes(b"this is not a state dict" * 10)
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 nor an npz")
    for name in ("garbage.pth", "garbage.npz"):
        with pytest.raises(FedradError, match=f"cannot read .*{name}"):
            load_pretrained(net, tmp_path / name)
    with pytest.raises(FedradError, match="no file"):
        load_pretrained(net, tmp_path / "absent.pt")
    torch.save({"encoder.weight": torch.ones(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(FedradError, match="nothing in .* matches"):
        load_pretrained(net, tmp_path / "other.pt")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    with pytest.raises(FedradError, match="not a state dict"):
        load_pretrained(net, tmp_path / "tensor.pt")


def test_the_coordinator_starts_from_the_pretrained_file(imagenet):
    from fedrad.common.study import parse_study
    from fedrad.server.train_cnn import initial_weights

    source, path = imagenet
    study = parse_study({"cnn": {"phases": ["venous"], "dims": 2, "pretrained": str(path)}})
    weights = initial_weights(study)
    np.testing.assert_array_equal(weights["layer2.0.conv1.weight"], source.layer2[0].conv1.weight.detach().numpy())
    np.testing.assert_allclose(weights["conv1.weight"], source.conv1.weight.detach().numpy().sum(1, keepdims=True),
                               atol=1e-6)
    plain = initial_weights(parse_study({"cnn": {"phases": ["venous"], "dims": 2}}))
    np.testing.assert_array_equal(weights["fc.weight"], plain["fc.weight"])  # same seed, head not loaded
