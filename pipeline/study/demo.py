"""`make demo`: the degradation problem and its cure on real handwritten digits, in a few minutes on a CPU.

Runs ``configs/study/digits_degradation.toml`` (plain-20, plain-56, ResNet-20, ResNet-56, two at a time, each
on its own core) as a study: a parent MLflow run with one child run per network, in the embedded store
``sqlite:///mlflow.db`` unless tracking.uri or $MLFLOW_TRACKING_URI says otherwise. Then it writes the report
(the Table 6 and Figure 6 layouts) and prints, first, the one sentence the run supports ("plain-56 ends at X%
training error, plain-20 at Y%: ..."; it says so plainly when a run does not show it), then the table and
where everything is. Running it again skips the finished networks; ``--fresh`` starts a new study.

No data is needed: scikit-learn's bundled digits are written as 32x32 JPEGs in the ImageFolder layout
and go through the full path (DALI, DeepSpeed, checkpoints). ``--data DIR`` uses any ImageFolder
dataset instead. Other arguments (--section.key=value, --seed=N) override every network's config.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.study.runner import member_config, read_study, run_report, run_study, summary
from pipeline.tracking import resolve_uri

ROOT = Path(__file__).resolve().parents[2]  # the repository
STUDY = ROOT / "configs/study/digits_degradation.toml"


def _store_and_ui(uri: str) -> tuple[str, str]:
    """Where the runs are, and the one command that opens the MLflow UI on them."""
    mlflow = Path(sys.executable).with_name("mlflow")
    exe = str(mlflow) if mlflow.exists() else "mlflow"
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///")).resolve()
        return (
            str(db),
            f"{exe} ui --backend-store-uri sqlite:///{db} --port 5000   # then open http://127.0.0.1:5000/#/?workflowType=machine_learning",
        )
    if uri.startswith(("http://", "https://")):
        return uri, f"open {uri} in a browser (the server is already running)"
    return uri, f"{exe} ui --backend-store-uri {uri} --port 5000"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="an ImageFolder dataset (DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg)")
    p.add_argument("--num-classes", type=int, help="class count of --data (default: counted from DIR/train)")
    p.add_argument("--fresh", action="store_true", help="start a new study instead of continuing the last one")
    args, rest = p.parse_known_args(argv)
    overrides = list(rest)
    study = read_study(STUDY)
    if args.data:
        n = args.num_classes or sum(1 for d in Path(args.data, "train").iterdir() if d.is_dir())
        overrides += ["--data.source=folder", f"--data.root={args.data}", f"--model.num_classes={n}"]
        study.name = f"{study.name}_{Path(args.data).resolve().name}"
    if args.fresh:
        study.name = f"{study.name}_{time.strftime('%Y%m%d-%H%M%S')}"

    try:
        first = member_config(study, study.members[0], overrides=overrides)
        uri = resolve_uri(first.tracking)
        print(
            f"== depth study {study.name}: {', '.join(m.name for m in study.members)} on "
            f"{args.data or 'the embedded digits'}",
            flush=True,
        )
        outcomes = run_study(study, overrides=overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [o for o in outcomes if o.state not in ("finished", "skipped")]
    if failed and len(failed) == len(outcomes):
        print("\n" + summary(outcomes))
        print("error: no network finished; nothing to report", file=sys.stderr)
        return 1

    done = run_report(
        study.name, tracking_uri=uri, args=("--out", str(Path("runs/reports") / study.name), "--json"), capture=True
    )
    if done.returncode != 0:
        return done.returncode  # the report said why on stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # The result leads with what it shows, in words; the numbers and where they are follow.
    print("\n== result")
    if report.get("finding"):
        print(report["finding"])
    print("\n" + report["table"])
    print("\n" + summary(outcomes))
    store, ui = _store_and_ui(uri)
    print(f"\nMLflow store: {store} (experiment {first.tracking.experiment!r}, parent run {report['parent_run_id']})")
    print(f"MLflow UI:    {ui}")
    print(f"report:       {report['page']}")
    if report.get("html"):
        print(f"report page:  {report['html']}   (figures inline; also on the parent run in MLflow)")
    for figure in report.get("figures", []):
        print(f"figure:       {figure}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
