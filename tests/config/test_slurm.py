"""The slurm: section: what Slurm would refuse is refused at load, in one line naming the key."""

from __future__ import annotations

import pytest

from harness.config import SlurmConfig, load_config
from harness.config.slurm import mem_gib, validate_slurm
from harness.errors import ConfigError


def test_a_config_carries_its_site_resources():
    cfg = load_config("configs/tiny.yaml", ["slurm.mem=480G", "slurm.setup=[module load cuda/12.8, source env/bin/activate]",
                                           "slurm.cpus_per_task=12", "slurm.time=1-00:00:00"])
    assert cfg.slurm.setup == ["module load cuda/12.8", "source env/bin/activate"]
    assert (cfg.slurm.mem, cfg.slurm.cpus_per_task, cfg.slurm.time) == ("480G", 12, "1-00:00:00")


def test_container_mounts_take_pyxis_comma_separated_form_too():
    image = "slurm.container_image=img.sqsh"
    for given in ("slurm.container_mounts=/lustre:/lustre,/scratch:/scratch:ro",
                  "slurm.container_mounts=[/lustre:/lustre, /scratch:/scratch:ro]"):
        cfg = load_config("configs/tiny.yaml", [image, given])
        assert cfg.slurm.container_mounts == ["/lustre:/lustre", "/scratch:/scratch:ro"]


@pytest.mark.parametrize("fields, message", [
    ({"time": "soon"}, "slurm.time 'soon' is not a Slurm time"),
    ({"mem": "1.5T"}, "slurm.mem '1.5T' is not a Slurm memory size"),
    ({"cpus_per_task": -1}, "slurm.cpus_per_task must be >= 0"),
    ({"signal_seconds": 0}, "slurm.signal_seconds must be >= 1"),
    ({"setup": ["module load a\nmodule load b"]}, "slurm.setup[0] must be one shell line"),
    ({"container_image": "img.sqsh", "container_mounts": ["/a:/a,/b:/b"]}, "slurm.container_mounts[0] must be one"),
    ({"container_mounts": ["/a:/a"]}, "slurm.container_mounts needs slurm.container_image"),
])
def test_what_slurm_would_refuse_is_named(fields, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        validate_slurm(SlurmConfig(**fields))


@pytest.mark.parametrize("mem, gib", [("", None), ("0", None), ("480G", 480.0), ("2T", 2048.0), ("65536", 64.0),
                                      ("512M", 0.5)])
def test_mem_in_gib(mem, gib):
    assert mem_gib(mem) == gib
