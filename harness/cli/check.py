"""`harness check CONFIG [overrides] --world-size N [--nodes M] [--gpu h100|h200|a100] [--device-gb G]
[--host-gb H] [--signal-seconds S]`: the preflight of a job, before it waits in a queue.

Everything that would otherwise fail hours later inside the allocation, each as one line: the
config for N ranks; model.pretrained, data.tokenizer, data.path and the resume folder resolve;
the tokenizer is the model's; train.seq_len fits the model's positions; the data holds at least
one global batch; the DeepSpeed JSON passes DeepSpeed's own validation; the estimate fits the
GPUs' memory and (with --host-gb) each node's host memory; and the stop signal Slurm sends before
the time limit (--signal-seconds, harness submit's) leaves time for a logging interval and a save
at the estimated step time. Exit 0 with a summary, or 2 with every finding.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from harness.config import load_config_for_world
from harness.errors import HarnessError

SAVE_GBYTES_S_PER_NODE = 2.0
"""Assumed write bandwidth of one node to the checkpoint filesystem (a parallel filesystem gives a
node a few GB/s); a save is the node's ranks' fp32 masters and AdamW moments."""


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    from harness.estimate.step_time import GPUS

    parser = argparse.ArgumentParser(prog="harness check", description=__doc__.split("\n\n")[1])
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) of the job (default 1)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes the ranks spread over (default: 8 per node)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU model: memory, peak FLOPs, fabric")
    parser.add_argument("--device-gb", type=float, default=None, help="GPU memory per rank in GiB (default: the --gpu's)")
    parser.add_argument("--host-gb", type=float, default=None,
                        help="host memory per node in GiB (default: slurm.mem, else the partition's nodes as sinfo "
                             "reports them; unchecked when neither says)")
    parser.add_argument("--signal-seconds", type=int, default=None,
                        help="how long before the time limit the stop signal comes (default: slurm.signal_seconds)")
    return parser.parse_intermixed_args(argv)


class Findings:
    """One line per problem; a check that fails does not stop the others."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def run(self, check: Callable[[], object]) -> object:
        try:
            return check()
        except HarnessError as exc:
            self.lines.append(str(exc))
            return None

    def add(self, line: str) -> None:
        self.lines.append(line)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config_for_world(args.config, args.overrides, args.world_size)
        lines, summary = preflight(cfg, args)
    except HarnessError as exc:
        print(f"harness: check: {exc}", file=sys.stderr)
        return exc.exit_code
    for line in lines:
        print(f"harness: check: {line}", file=sys.stderr)
    if lines:
        print(f"harness: check: {len(lines)} problem(s) in {args.config}; nothing was started", file=sys.stderr)
        return 2
    print(f"check ok: {args.config} on {args.world_size} rank(s): {summary}")
    return 0


def preflight(cfg, args: argparse.Namespace) -> tuple[list[str], str]:
    """(findings, a one-line summary of what fits)."""
    from harness.parallel.preflight import check_backend_file
    from harness.runtime.process import quiet_imports_without_gpus

    quiet_imports_without_gpus()
    # An unreachable hub is retried with a warning per try; the finding says it in one line.
    from huggingface_hub import logging as hub_logging

    hub_logging.set_verbosity_error()
    found = Findings()
    tokenizer = found.run(lambda: _tokenizer(cfg))
    spec = found.run(lambda: _model(cfg, tokenizer))
    data_note = found.run(lambda: _data(cfg, args.world_size, tokenizer, found)) or ""
    found.run(lambda: _resume(cfg))
    found.run(lambda: check_backend_file(cfg, args.world_size))
    summary = ""
    if spec is not None and tokenizer is not None:
        summary = found.run(lambda: _fits(cfg, args, found)) or ""
    return found.lines, ", ".join(part for part in (summary, data_note) if part)


def _tokenizer(cfg):
    from harness.data import load_tokenizer

    return load_tokenizer(cfg.data.tokenizer)


def _model(cfg, tokenizer):
    """The model's config (its checks: the path or hub id, seq_len against its positions), and the
    tokenizer against it."""
    from harness.model.build import check_tokenizer_fits, model_spec, special_token_ids

    if cfg.model.pretrained:
        spec = model_spec(cfg.model, 0, cfg.train.seq_len, locate_weights=False)
        if tokenizer is not None:
            check_tokenizer_fits(spec.hf_config, tokenizer, cfg.data.tokenizer, cfg.model.pretrained)
        return spec
    vocab = len(tokenizer) if tokenizer is not None else 0
    return model_spec(cfg.model, vocab, cfg.train.seq_len, special_token_ids(tokenizer) if tokenizer else None)


def _data(cfg, world_size: int, tokenizer, found: Findings) -> str:
    """Every source resolves (a hub name through the hub, or its local cache), every instruction row
    is one training can read (all of local files, the first HUB_SAMPLE_ROWS of a hub dataset: each
    bad row a finding), and the data holds at least one global batch: tokens for text (about 4
    bytes each), examples for instruction rows (rows are counted; packed rows are estimated from
    their bytes). Returns what the run reads of it, for the summary ("" where the size is unknown
    until the job prepares it)."""
    from harness.data.instruct import INSTRUCTION_FORMATS, instruction_source
    from harness.data.sources import find_source
    from harness.data.stream import open_token_file

    d = cfg.data
    read_note, rows_read = "", None
    if d.format in INSTRUCTION_FORMATS:
        sources = [instruction_source(d)]
        if tokenizer is not None:
            read_note, rows_read = _check_instruction_rows(cfg, tokenizer, found)
    elif d.format == "tokens":
        if not Path(d.path).expanduser().is_file():
            raise HarnessError(f"data.path {d.path!r} does not exist; point it at the token file (data.format=tokens)")
        open_token_file(d.path, d.token_dtype, 2**32)
        return ""
    else:
        paths = [(s.path, s.format, s.text_field or d.text_field) for s in d.sources] or [(d.path, d.format, d.text_field)]
        sources = [find_source(d, path, fmt, field) for path, fmt, field in paths]
    hub_rows = [_hub_rows(s) for s in sources if not s.is_local]
    local = [s for s in sources if s.is_local]
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    run_rows = cfg.train.steps * global_batch
    if d.format in INSTRUCTION_FORMATS and not d.pack:
        counts = [rows_read] if rows_read is not None else [_local_rows(s) for s in local] + hub_rows
        if None in counts:
            return ""
        examples = sum(counts) * (1 - d.val_fraction)
        if examples < global_batch:
            raise HarnessError(f"data.path {d.path!r} holds {examples:,.0f} training examples, fewer than one global "
                               f"batch of {global_batch} unpacked rows; add data, set data.pack=true, or lower "
                               "train.micro_batch_size")
        return f"data {examples:,.0f} examples, {run_rows / examples:,.1f} epoch(s){read_note}"
    if hub_rows:
        return read_note.lstrip("; ")  # a hub dataset's tokens are known once the job prepares it
    tokens = sum(s.total_bytes() for s in local) / 4 * (1 - d.val_fraction)
    needed = global_batch * (cfg.train.seq_len + 1)
    if tokens < needed:
        raise HarnessError(f"data.path {d.path!r} holds about {tokens:,.0f} training tokens, fewer than one global batch "
                           f"({global_batch} x {cfg.train.seq_len + 1} = {needed:,}); add data or lower "
                           "train.micro_batch_size / train.seq_len")
    return f"data ~{tokens:,.0f} tokens, ~{run_rows * (cfg.train.seq_len + 1) / tokens:,.1f} epoch(s){read_note}"


HUB_SAMPLE_ROWS = 1000
"""Rows of a hub dataset harness check reads (streamed); local files are read whole."""


def _check_instruction_rows(cfg, tokenizer, found: Findings) -> tuple[str, Optional[int]]:
    """Every row as training prepares it; each bad row a finding. Returns the summary's note and
    the rows of the data (None when only a sample was read)."""
    from harness.data.instruct import check_rows, with_instruction_template

    checked = check_rows(cfg.data, with_instruction_template(tokenizer, cfg.data), cfg.train.seq_len, HUB_SAMPLE_ROWS)
    for problem in checked.problems:
        found.add(problem)
    read = f"the first {checked.rows:,} rows (a hub dataset: a sample)" if checked.sampled else f"all {checked.rows:,} rows"
    return f"; {read} read as training reads them", None if checked.sampled else checked.rows


def _local_rows(source) -> int | None:
    """Rows of local JSONL or parquet files (JSON arrays are counted when prepared)."""
    rows = 0
    for name in source.files:
        if name.endswith(".jsonl"):
            with open(name, "rb") as handle:
                rows += sum(1 for line in handle if line.strip())
        elif source.builder == "parquet":
            import pyarrow.parquet as pq

            rows += pq.ParquetFile(name).metadata.num_rows
        else:
            return None
    return rows


def _hub_rows(source) -> int | None:
    """The hub dataset's rows in its split, from its metadata (no data is downloaded); a name
    the hub (or, offline, the local cache) does not know is a finding."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(source.builder, source.hub_name)
    except Exception as exc:  # datasets raises many kinds for an unknown or unreachable name
        reason = " ".join(str(exc).split())[:160]
        raise HarnessError(f"data.path {source.path!r} is no local file and the hub (or its cache) has no such dataset "
                           f"({reason}); check the name, log in for a gated dataset, or point data.path at local "
                           "files") from None
    splits = builder.info.splits or {}
    if splits and source.split not in splits:
        raise HarnessError(f"data.split {source.split!r} is not a split of {source.path!r} (it has "
                           f"{', '.join(sorted(splits))}); set data.split")
    split = splits.get(source.split) if splits else None
    return split.num_examples if split is not None and split.num_examples else None


def _resume(cfg) -> None:
    """The resume folder verifies, and the run folder's history allows this start (history.py)."""
    from harness.checkpoint import verify
    from harness.checkpoint.history import refuse_never, survey

    path = cfg.resume.path
    if cfg.resume.never and not cfg.run.fresh:
        refuse_never(survey(Path(cfg.run.dir), Path(cfg.checkpoint.dir)), f"resume={path}")
    if cfg.resume.checkpoint is None:
        return
    if not Path(path).expanduser().is_dir():
        raise HarnessError(f"resume={path} does not exist; point it at a step-<N> checkpoint folder, or use resume=auto")
    problem = verify(Path(path).expanduser())
    if problem:
        raise HarnessError(f"resume={path}: the checkpoint is damaged ({problem}); use resume=auto to take the newest "
                           "intact one")


def _fits(cfg, args: argparse.Namespace, found: Findings) -> str:
    """Device and host memory, and the stop signal's lead over a logging interval plus a save."""
    import dataclasses

    from harness.cli.estimate import DEFAULT_MFU, GPUS_PER_NODE
    from harness.estimate.memory import estimate, host_per_node, meta_model
    from harness.estimate.step import predict_step
    from harness.estimate.step_time import GPUS, Cluster

    world = args.world_size
    nodes = args.nodes or max(1, math.ceil(world / GPUS_PER_NODE))
    if world % nodes:
        raise HarnessError(f"--nodes {nodes} does not divide --world-size {world}: every node runs the same number of ranks")
    gpu = GPUS[args.gpu]
    memory_gib = args.device_gb or gpu.memory_gib
    cluster = Cluster(world, nodes, dataclasses.replace(gpu, memory_gib=memory_gib), gpu.intra_gbps, gpu.inter_gbps,
                      DEFAULT_MFU, memory_gib)
    model = meta_model(cfg)
    result = estimate(cfg, world, model)
    need = result["backends"][result["configured"]]
    gib = 2**30
    if need["device"] > memory_gib * gib:
        found.add(f"the estimate needs {need['device'] / gib:,.1f} GiB per GPU ({result['configured']}, "
                  f"micro_batch_size {cfg.train.micro_batch_size} x seq_len {cfg.train.seq_len}); a {gpu.name} has "
                  f"{memory_gib:,.1f}: lower train.micro_batch_size, turn on model.activation_checkpointing, "
                  "or shard over more GPUs (harness estimate shows the parts)")
    per_node = world // nodes
    host_node = host_per_node(need, per_node)
    host_gb, host_source = _host_memory(cfg, args)
    if host_gb is not None and host_node > host_gb * gib:
        found.add(f"the estimate needs {host_node / gib:,.1f} GiB of host memory per node ({per_node} ranks: "
                  f"offloaded state and setup), more than the {host_gb:,.1f} GiB of {host_source}; raise slurm.mem, "
                  "offload less, or use more nodes")
    signal_s = args.signal_seconds or cfg.slurm.signal_seconds
    step_s = predict_step(cfg, cluster, model, result).step_s
    state_bytes = 3 * need["master"]  # fp32 masters and AdamW's two moments, as a checkpoint holds them
    save_s = per_node * state_bytes / (SAVE_GBYTES_S_PER_NODE * 1e9)
    lead_needed = cfg.log.every * step_s + save_s
    if lead_needed > signal_s:
        found.add(f"the stop signal comes {signal_s} s before the time limit, but the ranks act on it only "
                  f"every log.every={cfg.log.every} steps ({cfg.log.every} x {step_s:,.1f} s estimated) and the save "
                  f"then takes ~{save_s:,.0f} s ({per_node * state_bytes / 1e9:,.0f} GB per node at "
                  f"{SAVE_GBYTES_S_PER_NODE:g} GB/s): {lead_needed:,.0f} s; lower log.every or submit with "
                  f"slurm.signal_seconds={math.ceil(lead_needed * 1.5)}")
    return (f"{need['device'] / gib:,.1f} of {memory_gib:,.1f} GiB per {gpu.name} ({result['configured']}), "
            f"{host_node / gib:,.1f} GiB host per node" + (f" of {host_gb:,.1f}" if host_gb is not None else " (host memory unknown)")
            + f", ~{step_s:,.2f} s a step, stop signal lead {signal_s} s >= {lead_needed:,.0f} s needed")


def _host_memory(cfg, args: argparse.Namespace) -> tuple[float | None, str]:
    """Host GiB per node to check against, and where the number comes from."""
    from harness.cli.site import node_memory_gib
    from harness.config.slurm import mem_gib

    if args.host_gb is not None:
        return args.host_gb, "--host-gb"
    if mem_gib(cfg.slurm.mem) is not None:
        return mem_gib(cfg.slurm.mem), f"slurm.mem={cfg.slurm.mem}"
    node = node_memory_gib(cfg.slurm.partition)
    return node, "a node (sinfo)"


if __name__ == "__main__":
    from harness.runtime.process import exit_process

    exit_process(main())
