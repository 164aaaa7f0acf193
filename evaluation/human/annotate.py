"""`crs-rlhf eval annotate`: serve the ranking page, or move annotations in and out.

    crs-rlhf eval annotate --dir DIR --models A,B,C [--prompts-split human] [--groups 3]
                           [--host 127.0.0.1] [--port 8090] [--api-key KEY] [--seed 0]
    crs-rlhf eval annotate export --dir DIR --out annotations.csv
    crs-rlhf eval annotate import --dir DIR FILE.csv
    crs-rlhf eval annotate import-argilla --dir DIR FILE.json --question ranking
                           [--prompt-id-field id] [--group argilla | --group-field F] [--option-map a=A,b=B]

Imports append to DIR/annotations.jsonl, so rows made elsewhere count in `eval rank` like
rows made on the page (and a later row for the same prompt/group/annotator wins).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.common.settings import settings_or_exit
from evaluation.human.ranking import RankingError, validate_ranking
from evaluation.human.settings import AnnotateSettings
from evaluation.human.store import AnnotationRow, AnnotationStore, import_argilla, read_csv, read_jsonl, write_csv

PROG = "crs-rlhf eval annotate"


def _one_server_per_folder(directory: Path):
    """Hold an exclusive lock on DIR/.annotate.lock for the server's lifetime.

    Each server keeps the rows in memory; two on one folder would both append to the file but
    each page would only know its own server's answers. The OS drops the lock when we exit.
    """
    import fcntl

    f = open(directory / ".annotate.lock", "w")  # noqa: SIM115 - must stay open
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ValueError(
            f"another 'eval annotate' server already serves {directory}; use that one (or stop it)"
        ) from None
    return f


def serve(argv: list[str]) -> int:
    import uvicorn

    from evaluation.human.app import build_app
    from evaluation.human.engine import AnnotationEngine
    from evaluation.human.tasks import load_prompts

    s = settings_or_exit(AnnotateSettings, argv, prog=PROG)
    try:
        models, groups = s.model_list(), s.group_list()
        prompts = load_prompts(s.dir, models, s.prompts_split)
        lock = _one_server_per_folder(Path(s.dir))  # noqa: F841 - held until the process exits
        store = AnnotationStore(Path(s.dir) / "annotations.jsonl")
        engine = AnnotationEngine(prompts, models, groups, store, seed=s.seed)
        app = build_app(
            engine,
            title=s.title,
            api_key=s.api_key,
            max_body_bytes=s.max_body_bytes,
            body_read_timeout_s=getattr(s, "body_read_timeout_s", None),
        )
    except (OSError, ValueError, RuntimeError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    print(
        f"annotation page: http://{s.host}:{s.port}/  ({len(prompts)} prompts x {len(models)} responses, "
        f"groups {', '.join(groups)}; {len(store.rows)} rows already in {store.path})",
        flush=True,
    )
    from services.common.serving import uvicorn_config

    uvicorn.Server(uvicorn_config(app, s)).run()
    return 0


def _check(rows: list[AnnotationRow], models: list[str] | None) -> None:
    for i, row in enumerate(rows, 1):
        expected = models or sorted(row.ranking)
        try:
            validate_ranking(row.ranking, expected)
        except RankingError as e:
            raise ValueError(f"row {i} (prompt {row.prompt_id}, annotator {row.annotator}): {e}") from None


def transfer(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=f"{PROG} {argv[0]}")
    ap.add_argument("--dir", required=True, help="evaluation folder holding annotations.jsonl")
    if argv[0] == "export":
        ap.add_argument("--out", required=True, help="CSV file to write")
    else:
        ap.add_argument("file", help="file to import")
        ap.add_argument("--models", help="comma-separated models every ranking must cover (default: its own keys)")
    if argv[0] == "import-argilla":
        ap.add_argument("--question", required=True, help="name of the Argilla RankingQuestion")
        ap.add_argument("--prompt-id-field", default="id", help="metadata/field key holding the prompt id")
        ap.add_argument("--group", default="argilla", help="group of every imported row")
        ap.add_argument("--group-field", help="metadata/field key holding the group (overrides --group)")
        ap.add_argument("--option-map", default="", help="ranking option -> model, e.g. response-1=abs,response-2=crs")
    args = ap.parse_args(argv[1:])
    path = Path(args.dir) / "annotations.jsonl"
    try:
        if argv[0] == "export":
            rows = read_jsonl(path) if path.exists() else []
            write_csv(rows, args.out)
            print(f"wrote {len(rows)} rows to {args.out}")
            return 0
        if argv[0] == "import":
            rows = read_csv(args.file)
        else:
            pairs = [p.split("=", 1) for p in args.option_map.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("--option-map takes option=model pairs separated by commas")
            rows = import_argilla(
                args.file,
                question=args.question,
                prompt_id_field=args.prompt_id_field,
                group=args.group,
                group_field=args.group_field,
                option_map=dict(pairs),
            )
        _check(rows, [m.strip() for m in args.models.split(",")] if args.models else None)
    except (OSError, ValueError) as e:
        print(f"{PROG} {argv[0]}: {e}", file=sys.stderr)
        return 2
    store = AnnotationStore(path)
    store.append(*rows)
    print(f"appended {len(rows)} rows to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("export", "import", "import-argilla"):
        return transfer(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
