"""TF "SAME" padding and input normalization, checked against TensorFlow itself."""

import numpy as np
import pytest
import torch

from effnet.tf_compat import NORMALIZATIONS, Conv2dSame, InputNormalization, same_padding


@pytest.mark.parametrize("size", [7, 8, 13, 224, 225, 260, 33])
@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (3, 2), (5, 2), (5, 1), (1, 2)])
def test_same_padding_matches_tensorflow_conv(size, kernel_size, stride):
    import tensorflow as tf
    generator = np.random.default_rng(size * 10 + kernel_size + stride)
    height, width = size, size + 3  # non-square, mixed parity
    x = generator.standard_normal((1, height, width, 4)).astype(np.float32)
    kernel = generator.standard_normal((kernel_size, kernel_size, 4, 5)).astype(np.float32)
    reference = tf.nn.conv2d(x, kernel, strides=stride, padding="SAME").numpy()
    conv = Conv2dSame(4, 5, kernel_size, stride)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1)))
        ours = conv(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_same_padding_puts_the_extra_pixel_after():
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(225, 3, 2) == (1, 1)
    assert same_padding(224, 5, 2) == (1, 2)
    assert same_padding(10, 1, 2) == (0, 0)


def test_only_strided_convs_pad_per_call():
    assert not Conv2dSame(3, 3, 3, 1).dynamic_padding
    assert Conv2dSame(3, 3, 3, 2).dynamic_padding


@pytest.mark.parametrize("kind,pixel_255,expected", [
    ("imagenet_mean_std", (255 * 0.485, 255 * 0.456, 255 * 0.406), (0.0, 0.0, 0.0)),
    ("minus_one_to_one_128", (128, 0, 255), (0.0, -1.0, 127 / 128)),
    ("lite_127_128", (127, 255, 0), (0.0, 1.0, -127 / 128)),
])
def test_normalizations_as_the_originals_write_them(kind, pixel_255, expected):
    assert kind in NORMALIZATIONS
    x = torch.tensor(pixel_255, dtype=torch.float32).view(1, 3, 1, 1) / 255.0
    np.testing.assert_allclose(InputNormalization(kind)(x).flatten().numpy(), expected, atol=1e-6)
