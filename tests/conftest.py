"""Session fixtures: the tiny model, its checkpoint and its bundle (exported once)."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY, TINY_SIZE, randomise_norms, register_tiny


@pytest.fixture(scope="session")
def tiny_variant():
    """A small CloFormer (all branch kinds, 4 blocks) registered for the session: fast exports."""
    from cloformer_deploy.models.registry import VARIANTS

    yield register_tiny()
    VARIANTS.pop(TINY, None)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_variant, tmp_path_factory):
    torch.manual_seed(0)
    model = randomise_norms(__import__("cloformer_deploy").create_model(tiny_variant, num_classes=10), seed=5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model": model.state_dict(), "epoch": 1}, path)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tiny_variant, tiny_checkpoint, tmp_path_factory):
    """The tiny model exported once to every format (fp32/fp16 defaults), validated and zipped."""
    from cloformer_deploy.pipeline import export

    return export(
        tiny_variant,
        weights=tiny_checkpoint,
        format="all",
        img_size=TINY_SIZE,
        out=tmp_path_factory.mktemp("export"),
        zip=True,
    )


@pytest.fixture(scope="session")
def native_runners():
    """This machine's native runners, built once by ``cloformer-device setup local`` into the user's cache (kept
    there, as a user's would be). Skipped without a C++ compiler; a failure under CI, which installs one."""
    import os
    import shutil

    from cloformer_deploy.targets.native import host_platform
    from cloformer_deploy.targets.setup import setup_target

    if shutil.which("g++") is None or shutil.which("readelf") is None:
        msg = "the native runners need g++ and readelf (apt-get install g++ binutils)"
        if os.environ.get("CI"):
            pytest.fail(msg + "; .ci/run installs them")
        pytest.skip(msg)
    record = setup_target("local")
    assert record["platform"] == host_platform()
    return record
