"""Run every numbered notebook headless, in order, and print what they produced (`make run`).

Executed copies go to data/<preset>/executed/, never over the committed notebooks. The preset
comes from $WORKBOOK_PRESET (default "full"), which each notebook's parameters cell reads.
`--commit-outputs` then copies the executed outputs into notebooks/ (what the repository shows),
without progress bars, widget state or this machine's absolute paths (`make outputs`).

    python -m medusa_lib.run_all [--commit-outputs]
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import nbformat
from nbclient import NotebookClient

from medusa_lib.config import get_config, repo_root
from medusa_lib.files import atomic_path, write_json

PROGRESS_BAR = re.compile(r"\d+%\|.*\| *[\d.]+\w?/[\d.]+\w? \[|\d+it \[\d+:\d+")  # tqdm's text, e.g.
# "caching:  40%|####  | 4/10 [" or, without a total, "tokenising: 0it [00:00, ?it/s]"


def run_notebooks(preset: str | None = None) -> dict:
    cfg = get_config(preset)
    os.environ["WORKBOOK_PRESET"] = cfg.name
    out_dir = cfg.data_dir / "executed"
    timings = {}
    for path in sorted((repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        print(f"--- {path.name} ({cfg.name} preset) ...", flush=True)
        nb = nbformat.read(path, as_version=4)
        t = time.time()
        try:
            NotebookClient(nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
        finally:
            timings[path.name] = round(time.time() - t, 1)
            with atomic_path(out_dir / path.name) as tmp:
                nbformat.write(nb, str(tmp))
        print(f"    done in {timings[path.name]:.0f} s -> {out_dir / path.name}", flush=True)
    write_json(out_dir / "timings.json", timings)
    return {"cfg": cfg, "timings": timings, "out_dir": out_dir}


def clean_outputs(nb, root: str) -> None:
    """Outputs fit to commit: progress bars and warnings (stderr) dropped (a bar's saved text is
    a stale state such as "0%"), other widgets shown by their text, absolute paths made relative to
    the repository. Cleaning a cleaned notebook changes nothing."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                continue
            data = out.get("data")
            if data is not None:
                if PROGRESS_BAR.search("".join(data.get("text/plain", ""))):
                    continue
                data.pop("application/vnd.jupyter.widget-view+json", None)
                if not data:
                    continue
            kept.append(out)
        text = nbformat.writes(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=kept)]))
        cell.outputs = nbformat.reads(text.replace(root + "/", "").replace(root, "."), as_version=4).cells[0].outputs
    nb.metadata.pop("widgets", None)


def commit_outputs(out_dir) -> None:
    root = str(repo_root())
    for path in sorted(out_dir.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        clean_outputs(nb, root)
        with atomic_path(repo_root() / "notebooks" / path.name) as tmp:
            nbformat.write(nb, str(tmp))
        print(f"outputs committed: notebooks/{path.name}")


def summary(cfg, timings: dict) -> None:
    print("\n=== Workbook run:", cfg.name, "preset ===")
    for name, secs in timings.items():
        print(f"  {name:34s} {secs / 60:6.1f} min")
    print(f"  {'total':34s} {sum(timings.values()) / 60:6.1f} min")
    print("\nFiles under", cfg.data_dir)
    for path in sorted(cfg.data_dir.rglob("*")):
        if path.is_file() and "hidden_cache" not in path.parts and not path.name.startswith("."):
            print(f"  {path.relative_to(cfg.data_dir)}  ({path.stat().st_size / 1e6:.1f} MB)")
    results = cfg.data_dir / "bench" / "results.json"
    if results.is_file():
        from medusa_lib.bench import results_table
        print("\nBenchmark (decode tokens/s, greedy):")
        print(results_table(json.loads(results.read_text())).to_string(float_format=lambda x: f"{x:.2f}"))


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    run = run_notebooks(args[0] if args else None)
    summary(run["cfg"], run["timings"])
    if "--commit-outputs" in sys.argv:
        commit_outputs(run["out_dir"])


if __name__ == "__main__":
    main()
