"""effnet.limits: the job-size check that refuses a size, batch size or worker count the machine cannot run."""

from __future__ import annotations

import pytest

from effnet.architectures import architecture
from effnet.errors import EffnetError
from effnet.limits import ACTIVATION_FACTOR, check_job_fits, job_bytes, widest_activation


def test_widest_activation_is_read_from_the_architecture_table():
    # Lite0 at 224: stage 2's first block expands 16 channels x 6 at 112 x 112 (the stem: 32 at 112 x 112)
    assert widest_activation(architecture("efficientnet_lite0"), 224) == 16 * 6 * 112 * 112
    # V2-S: stage 2's fused block expands 24 x 4 at 112 x 112
    assert widest_activation(architecture("efficientnetv2_s"), 224) == 24 * 4 * 112 * 112


def test_job_bytes_adds_activations_input_and_decoded_window():
    arch = architecture("efficientnet_lite0")
    expected = ACTIVATION_FACTOR * 16 * widest_activation(arch, 224) * 4 + 16 * 3 * 224 * 224 * 4 + 32 * 224 * 224 * 3
    assert job_bytes(arch, 224, 16, 2) == expected


def test_check_job_fits_names_a_batch_size_that_fits():
    arch = architecture("efficientnet_lite0")
    needed = job_bytes(arch, 1024, 64, 2)
    with pytest.raises(EffnetError, match=r"--size 1024 fits with --batch-size (\d+)") as caught:
        check_job_fits(arch, 1024, 64, 2, available=needed // 4)
    fits = int(caught.value.args[0].split("fits with --batch-size ")[1].split(";")[0].split(".")[0])
    assert job_bytes(arch, 1024, fits, 2) <= needed // 4 < job_bytes(arch, 1024, 2 * fits, 2)
    check_job_fits(arch, 224, 16, 2, available=needed)  # fits: no error
    with pytest.raises(EffnetError, match="--workers 100000 is more than 256"):
        check_job_fits(arch, 224, 16, 100000, available=needed)
