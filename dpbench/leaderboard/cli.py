"""``dpbench-leaderboard``: verified runs as a leaderboard, and leaderboard submissions.

    dpbench-leaderboard DIR|SUBMISSION.json [--format table|markdown|csv|html] [-o FILE] [--plots DIR] [--strict]
    dpbench-leaderboard submit DIR -o FILE [--name NAME]
    dpbench-leaderboard validate FILE [--min-seeds N]
    dpbench-leaderboard merge FILE... --into DIR [--min-seeds N]

Every ``results.json`` under DIR is checked against the results contract and its ε is recomputed from the
logged stages; rejected runs are listed with the reason, never in the table (``--strict``: exit 1 if any).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpbench.errors import ConfigError
from dpbench.results.io import RESULTS_FILE

FORMATS = ("table", "markdown", "csv", "html")
SUBCOMMANDS = ("submit", "validate", "merge")


def _fail(msg: str) -> None:
    print(f"dpbench-leaderboard: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _verdicts(path: Path) -> list:
    """Every run record under ``path`` (or in the submission file ``path``), verified; a one-line error when
    there is none."""
    from dpbench.leaderboard.verify import load_verdicts

    if path.is_file() and path.suffix == ".json":
        from dpbench.leaderboard.submission import read_submission, validate

        review = validate(read_submission(path), min_seeds=1)
        if not review.runs:  # not a submission at all; a bad run inside one is listed as rejected
            _fail(f"'{path}' is not a valid submission ({'; '.join(review.reasons)}); make it with `submit`")
        return review.runs
    if not path.is_dir():
        _fail(f"'{path}' is not a folder; pass the folder of your runs (e.g. outputs/) or a submission file")
    verdicts = load_verdicts(path)
    if not verdicts:
        _fail(f"no {RESULTS_FILE} under '{path}'; run `dpbench` first")
    return verdicts


def board(args: argparse.Namespace) -> int:
    from dpbench.leaderboard.aggregate import aggregate
    from dpbench.leaderboard.baselines import join, load_baselines
    from dpbench.leaderboard import render

    verdicts = _verdicts(args.dir)
    ok = [v for v in verdicts if v.ok]
    rejected = [v for v in verdicts if not v.ok]
    rows = aggregate((v.record, v.epsilon_recomputed) for v in ok)
    try:
        unjoined = join(rows, load_baselines(args.baselines or ()))
    except ConfigError as e:
        _fail(str(e))
    fmt = args.format or ("html" if args.output and args.output.suffix == ".html" else "table")
    plot_dir = args.plots or (args.output.with_suffix("").with_name(args.output.stem + "_plots")
                              if fmt == "html" and args.output else None)
    plots = []
    if plot_dir is not None:
        from dpbench.leaderboard.plots import all_plots

        plots = all_plots(rows, plot_dir)
    if fmt == "table":
        from rich.console import Console

        console = Console(file=args.output.open("w", encoding="utf-8") if args.output else None)
        render.terminal(rows, rejected, console if console.is_terminal or args.output else Console(width=200))
    else:
        text = {"markdown": lambda: render.markdown(rows, rejected), "csv": lambda: render.csv_text(rows),
                "html": lambda: render.page(rows, rejected, unjoined, plots)}[fmt]()
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
    if args.output:
        print(f"wrote {args.output} ({len(rows)} rows, {len(rejected)} rejected"
              + (f", plots in {plot_dir}" if plots else "") + ")", file=sys.stderr)
    for v in rejected if fmt != "table" else ():
        print(f"rejected {v.source}: {'; '.join(v.reasons)}", file=sys.stderr)
    return 1 if args.strict and rejected else 0


def submit(args: argparse.Namespace) -> int:
    from dpbench.leaderboard.submission import pack
    from dpbench.results.io import write_json_atomic

    sub, rejected = pack(args.dir, _verdicts(args.dir), args.name or args.dir.resolve().name)
    for v in rejected:
        print(f"left out {v.source}: {'; '.join(v.reasons)}", file=sys.stderr)
    if not sub["runs"]:
        _fail(f"no verified run under '{args.dir}' to submit")
    write_json_atomic(args.output, sub)
    print(f"wrote {args.output}: {len(sub['runs'])} verified runs ({len(rejected)} left out)")
    return 0


def _review(path: Path, min_seeds: int):
    from dpbench.leaderboard.submission import read_submission, validate

    sub = read_submission(path)
    if isinstance(sub, dict) and "_error" in sub:
        _fail(f"cannot read submission '{path}' ({sub['_error']}); pass a file made by `submit`")
    review = validate(sub, min_seeds)
    verdict = "accept" if review.accepted else "reject"
    print(f"{verdict} {path}: {sum(v.ok for v in review.runs)}/{len(review.runs)} runs verified")
    for why in review.reasons:
        print(f"  - {why}")
    return sub, review


def validate_cmd(args: argparse.Namespace) -> int:
    return 0 if _review(args.file, args.min_seeds)[1].accepted else 1


def merge_cmd(args: argparse.Namespace) -> int:
    from dpbench.leaderboard.submission import merge

    status = 0
    for path in args.files:
        sub, review = _review(path, args.min_seeds)
        if review.accepted:
            print(f"  merged {len(merge(sub, args.into))} runs into {args.into}")
        else:
            status = 1
    return status


def _parser(sub: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpbench-leaderboard" + (f" {sub}" if sub else ""), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if sub is None:
        p.add_argument("dir", type=Path, help="folder holding run folders (searched recursively), or a "
                       "submission file made by `submit`")
        p.add_argument("--format", choices=FORMATS, help="output format (default: table, or html for -o *.html)")
        p.add_argument("-o", "--output", type=Path, help="write to this file instead of the terminal")
        p.add_argument("--plots", type=Path, help="write PNG plots here (html embeds them; default beside -o)")
        p.add_argument("--baselines", type=Path, action="append", help="extra paper-baselines YAML (repeatable)")
        p.add_argument("--strict", action="store_true", help="exit 1 if any run is rejected")
    elif sub == "submit":
        p.add_argument("dir", type=Path)
        p.add_argument("-o", "--output", type=Path, required=True, help="submission JSON to write")
        p.add_argument("--name", help="submission name (default: the folder's name)")
    elif sub == "validate":
        p.add_argument("file", type=Path)
        p.add_argument("--min-seeds", type=int, default=3, help="seeds needed per configuration (default 3)")
    else:
        p.add_argument("files", type=Path, nargs="+")
        p.add_argument("--into", type=Path, required=True, help="leaderboard folder to add accepted runs to")
        p.add_argument("--min-seeds", type=int, default=3)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = _parser(sub).parse_args(argv[1:] if sub else argv)
    run = {None: board, "submit": submit, "validate": validate_cmd, "merge": merge_cmd}[sub]
    raise SystemExit(run(args))


if __name__ == "__main__":
    main()
