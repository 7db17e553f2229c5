"""The run configuration (no torch anywhere in this package: launchers check a config in a blink).

schema.py          the sections as typed dataclasses; each field's docstring is its --help text
load.py            YAML file + `key.sub=value` overrides + defaults, in that precedence, then validated
validate.py        the checks that span fields, section by section, and those that need the world size
deepspeed_json.py  a DeepSpeed JSON ("auto" values included) mapped onto the config, and the runtime
                   JSON the ZeRO backend hands DeepSpeed
accelerate.py      an `accelerate config` YAML mapped onto the config
merge.py           what both translators share: adopting values, refusing contradictions
slurm.py           the slurm: section harness submit renders into the job script
fp8.py             the fp8: section (precision=fp8)
lora.py            the lora: section (adapters on a frozen pretrained base)
layouts.py         what each sharding layout (fsdp2, zero1-3) can do, as plain data
"""

from harness.config.fp8 import FP8Config, compute_precision
from harness.config.load import dump_yaml, field_docs, help_text, load_config, load_config_for_world
from harness.config.lora import LoraConfig
from harness.config.schema import (
                                   CheckpointConfig,
                                   Config,
                                   DataConfig,
                                   DebugConfig,
                                   EvalConfig,
                                   FaultsConfig,
                                   LogConfig,
                                   ModelConfig,
                                   ParallelConfig,
                                   ResumeConfig,
                                   RunConfig,
                                   ScalerConfig,
                                   SourceConfig,
                                   SpikeConfig,
                                   TrainConfig,
)
from harness.config.slurm import SlurmConfig
from harness.config.validate import validate, validate_for_world

__all__ = [
    "CheckpointConfig", "Config", "FP8Config", "DataConfig", "DebugConfig", "EvalConfig", "FaultsConfig", "LogConfig", "LoraConfig",
    "ModelConfig", "ParallelConfig", "ResumeConfig", "RunConfig", "ScalerConfig", "SourceConfig", "SlurmConfig", "SpikeConfig",
    "TrainConfig", "compute_precision", "dump_yaml", "field_docs", "help_text", "load_config", "load_config_for_world",
    "validate", "validate_for_world",
]
