"""Every private DeepSpeed name harness reads or replaces, in one list, checked before use.

harness drives DeepSpeed's ZeRO optimizers from outside: it reads their gradient partitions and
fp32 flats, and answers their own overflow and norm checks with its global decision. None of
that is public API, so a DeepSpeed release may rename any of it. Three guards:

1. `import_deepspeed` accepts only the releases the suite ran on (`TESTED_DEEPSPEED`, exact).
2. `check_internals` runs when the backend is built: every name below that the layout in use
   touches must exist, else one line names what is missing and the tested releases.
3. `ReplacedChecks` counts the calls of the checks harness replaced; after the first applied
   step `assert_called` fails if DeepSpeed's step() no longer calls one (a silent bypass of
   harness's decision would otherwise go unnoticed).

Attributes of partitioned ZeRO-3 parameters (`ds_numel`, `ds_shape`) are read by this backend
only (DeepSpeedBackend.full_shape answers the rest of harness); they are listed here too.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from harness.errors import HarnessError

TESTED_DEEPSPEED = ("0.19.8",)
"""The DeepSpeed releases the whole suite ran on. Nothing else is admitted: the names below are
private and change between releases."""


@dataclass(frozen=True)
class Private:
    """One private name: where it lives, what harness does with it, and why."""

    owner: str
    """The class (or module) that has it; "param" for a ZeRO-3 partitioned parameter."""
    name: str
    use: str
    """read | replaced | called"""
    why: str


ZERO_1_2 = (
    Private("DeepSpeedZeroOptimizer", "bit16_groups", "read", "the parameters of each flat group"),
    Private("DeepSpeedZeroOptimizer", "single_partition_of_fp32_groups", "read", "this rank's fp32 master flats"),
    Private("DeepSpeedZeroOptimizer", "params_in_partition", "read", "parameters this rank (partly) owns"),
    Private("DeepSpeedZeroOptimizer", "averaged_gradients", "read", "this rank's reduced gradient slices"),
    Private("DeepSpeedZeroOptimizer", "override_loss_scale", "called", "harness's loss scale and clip"),
    Private("DeepSpeedZeroOptimizer", "update_lp_params", "called", "refresh bf16/fp16 copies after a load"),
    Private("DeepSpeedZeroOptimizer", "loss_scale", "read", "to express harness's norm in DeepSpeed's scale"),
    Private("DeepSpeedZeroOptimizer", "cpu_offload", "read", "which layout holds the gradients"),
    Private("DeepSpeedZeroOptimizer", "has_overflow", "replaced", "answered with harness's skip decision"),
    Private("DeepSpeedZeroOptimizer", "scaled_global_norm", "replaced", "answered with harness's global norm"),
    Private("DeepSpeedZeroOptimizer", "optimizer", "read", "the torch AdamW holding the moments"),
)
ZERO_3 = (
    Private("DeepSpeedZeroOptimizer_Stage3", "fp16_groups", "read", "the parameters of each sub-group"),
    Private("DeepSpeedZeroOptimizer_Stage3", "fp32_partitioned_groups_flat", "read", "this rank's fp32 master flats"),
    Private("DeepSpeedZeroOptimizer_Stage3", "averaged_gradients", "read", "this rank's reduced gradient partitions"),
    Private("DeepSpeedZeroOptimizer_Stage3", "grad_position", "read", "where a partition sits in its flat"),
    Private("DeepSpeedZeroOptimizer_Stage3", "get_param_id", "called", "key of grad_position"),
    Private("DeepSpeedZeroOptimizer_Stage3", "_get_param_partition_rank", "called", "which rank holds a partition"),
    Private("DeepSpeedZeroOptimizer_Stage3", "_reassign_or_swap_out_partitioned_parameters", "called",
            "refresh the compute-dtype partitions after a load"),
    Private("DeepSpeedZeroOptimizer_Stage3", "invalidate_secondary_tensor", "called", "hpZ copies after a load"),
    Private("DeepSpeedZeroOptimizer_Stage3", "override_loss_scale", "called", "harness's loss scale and clip"),
    Private("DeepSpeedZeroOptimizer_Stage3", "loss_scale", "read", "to express harness's norm in DeepSpeed's scale"),
    Private("DeepSpeedZeroOptimizer_Stage3", "offload_optimizer", "read", "which layout holds the gradients"),
    Private("DeepSpeedZeroOptimizer_Stage3", "has_overflow", "replaced", "answered with harness's skip decision"),
    Private("DeepSpeedZeroOptimizer_Stage3", "_get_norm_groups", "replaced", "answered with harness's global norm"),
    Private("DeepSpeedZeroOptimizer_Stage3", "optimizer", "read", "the torch AdamW holding the moments"),
    Private("param", "ds_numel", "read", "a partitioned parameter's full size"),
    Private("param", "ds_shape", "read", "a partitioned parameter's full shape"),
    Private("param", "ds_tensor", "written", "a frozen parameter's partition: LoRA's base is written there"),
    Private("param", "partition_numel", "called", "a frozen parameter's partition size"),
    Private("param", "ds_process_group", "read", "the group a frozen parameter is partitioned over"),
    Private("param", "ds_secondary_tensor", "written", "a frozen parameter's hpZ copy, dropped after a write"),
)
BF16_ZERO_1 = (
    Private("BF16_Optimizer", "bf16_groups", "read", "the parameters of each flat group"),
    Private("BF16_Optimizer", "fp32_groups_flat_partition", "read", "this rank's fp32 master flats"),
    Private("BF16_Optimizer", "fp32_groups_gradient_flat_partition", "read", "this rank's fp32 gradient slices"),
    Private("BF16_Optimizer", "update_lp_params", "called", "refresh bf16 copies after a load"),
    Private("BF16_Optimizer", "optimizer", "read", "the torch AdamW holding the moments"),
)
OFFLOADED = (
    Private("offloading optimizer", "norm_for_param_grads", "replaced",
            "entries set to inf so DeepSpeed's own check skips a step harness skipped"),
)
FRAGMENT_MAPPING = (
    Private("param", "_hp_mapping", "read", "where a ZeRO-1/2 parameter's fragment sits in the fp32 flat "
            "(hp_fragment_address.start/numel, lp_fragment_address.start, param_group_index)"),
)
MODULE_LEVEL = (
    Private("deepspeed.runtime.bf16_optimizer", "see_memory_usage", "replaced",
            "BF16_Optimizer prints a memory report per group at initialize whatever the log level"),
    Private("deepspeed.ops", "__compatible_ops__", "replaced", "CPU: skip JIT-building the shm comm op"),
    Private("CPU accelerator", "is_fp16_supported", "replaced", "CPU: fp16 math works, DeepSpeed says it does not"),
)
EVERY_PRIVATE_NAME = ZERO_1_2 + ZERO_3 + BF16_ZERO_1 + OFFLOADED + FRAGMENT_MAPPING + MODULE_LEVEL


def tested_pin() -> str:
    return " or ".join(f"deepspeed=={v}" for v in TESTED_DEEPSPEED)


def check_deepspeed_version(found: str) -> None:
    if found not in TESTED_DEEPSPEED:
        raise HarnessError(
            f"DeepSpeed {found} is installed, but harness's ZeRO backend reads DeepSpeed internals and was tested "
            f"with {tested_pin()} only; pip install 'deepspeed=={TESTED_DEEPSPEED[-1]}'"
        )


def import_deepspeed(on_cpu: bool):
    """DeepSpeed, checked and quietened; on a CPU run, also taught that CPU fp16 works."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        check_deepspeed_version(version("deepspeed"))
    except PackageNotFoundError:
        raise HarnessError(f"parallel.backend=deepspeed needs DeepSpeed; pip install '{tested_pin()}'") from None
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a CPU run on a GPU node stays on the CPU
    # DeepSpeed still calls collectives torch has renamed; the warning is about its code, not ours.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import deepspeed
    import deepspeed.runtime.bf16_optimizer as bf16_optimizer
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger

    _require_module_level(bf16_optimizer, get_accelerator(), deepspeed.ops)
    # harness reports skipped steps itself; DeepSpeed would repeat each one as a warning.
    logger.setLevel(logging.ERROR)
    bf16_optimizer.see_memory_usage = lambda *args, **kwargs: None
    if on_cpu:
        # DeepSpeed's CPU accelerator reports fp16 unsupported although CPU fp16 math works,
        # and initialize() then refuses fp16 ("Type fp16 is not supported on your device").
        get_accelerator().is_fp16_supported = lambda: True
        # The shared-memory comm op is JIT-compiled on first init (~35 s on 2 cores) and only
        # speeds up intra-node CPU collectives; gloo needs nothing from it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _require_module_level(bf16_module: Any, accelerator: Any, ops: Any) -> None:
    owners = {"deepspeed.runtime.bf16_optimizer": bf16_module, "CPU accelerator": accelerator, "deepspeed.ops": ops}
    for private in MODULE_LEVEL:
        _require(owners[private.owner], [private])


def check_internals(optimizer: Any, names: tuple[Private, ...], params: list[Any]) -> None:
    """Every private name `names` lists exists on DeepSpeed's optimizer (and, for "param" entries,
    on its first parameter), else one line naming the missing ones."""
    _require(optimizer, (p for p in names if p.owner != "param"))
    if params:
        _require(params[0], (p for p in names if p.owner == "param"))


def _require(obj: Any, names) -> None:
    missing = [f"{p.owner}.{p.name}" for p in names if not hasattr(obj, p.name)]
    if missing:
        from importlib.metadata import version

        raise HarnessError(
            f"DeepSpeed {version('deepspeed')} lacks {', '.join(missing)}, which harness's ZeRO backend reads or "
            f"replaces (harness.parallel.deepspeed.compat); harness was tested with {tested_pin()}"
        )


class ReplacedChecks:
    """DeepSpeed's own gradient checks, replaced on its optimizer by harness's answers and counted."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.calls: dict[str, int] = {}
        self.confirmed = False

    def replace(self, name: str, answer: Callable) -> None:
        self.calls[name] = 0

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return answer(*args, **kwargs)

        setattr(self.optimizer, name, counted)

    def assert_called(self, expected: tuple[str, ...]) -> None:
        """After the first applied step: each of `expected` was called by DeepSpeed's step(). If
        not, a newer DeepSpeed bypasses the replacement and would decide on its own."""
        if self.confirmed:
            return
        silent = [name for name in expected if not self.calls.get(name)]
        if silent:
            from importlib.metadata import version

            raise HarnessError(
                f"DeepSpeed {version('deepspeed')}'s step() did not call {', '.join(silent)}, which harness replaces "
                f"with its global decision (harness.parallel.deepspeed.compat); harness was tested with {tested_pin()}"
            )
        self.confirmed = True


def check_zero_section(ds_config: dict, source: str) -> None:
    """DeepSpeed's own validation of the zero_optimization section harness will pass it (its
    pydantic model, which deepspeed.initialize would apply on every rank), as one line naming the
    key: e.g. transformers' ds_config_zero3.json sets reduce_bucket_size to 0, which DeepSpeed 0.19
    rejects."""
    from importlib.metadata import version

    import_deepspeed(on_cpu=True)  # only to validate: nothing is placed on a device
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))
    except Exception as exc:  # pydantic's ValidationError (DeepSpeed does not re-export its type)
        errors = exc.errors() if callable(getattr(exc, "errors", None)) else []
        if not errors:
            raise HarnessError(f"{source}: DeepSpeed {version('deepspeed')} rejects zero_optimization "
                               f"({str(exc).splitlines()[0]}); fix it in the JSON") from None
        first = errors[0]
        key = ".".join(str(part) for part in first.get("loc", ()))
        raise HarnessError(f"{source}: zero_optimization.{key}={first.get('input')!r} is rejected by DeepSpeed "
                           f"{version('deepspeed')} ({first.get('msg')}); fix it in the JSON") from None


def op_report(load: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """DeepSpeed's C++/CUDA ops for this machine's accelerator, as ds_report lists them: prebuilt
    into the install, or JIT-compilable on first use (the toolkit and compiler are there); the
    ops named in `load` are loaded (JIT-building them if needed: minutes) to prove they work."""
    import deepspeed.git_version_info as installed
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    report = {}
    for name, builder in sorted(ALL_OPS.items()):
        if name == "deepspeed_not_implemented":
            continue
        entry: dict[str, Any] = {"prebuilt": bool(installed.installed_ops.get(name)),
                                 "compatible": bool(builder.is_compatible(verbose=False))}
        if name in load:
            try:
                builder.load(verbose=False)
                entry["loads"] = True
            except Exception as exc:  # a failed build says why in its last line
                entry["loads"] = False
                entry["error"] = " ".join(str(exc).split())[-200:]
        report[name] = entry
    return report

