"""Prepare ImageNet (ILSVRC-2012) from its official archives as an ImageFolder tree, locally or on S3.

    python -m pipeline.tools.prepare imagenet \\
        --train-tar /archives/ILSVRC2012_img_train.tar --val-tar /archives/ILSVRC2012_img_val.tar \\
        --devkit /archives/ILSVRC2012_devkit_t12.tar.gz --out /datasets/imagenet     # or s3://bucket/imagenet
    python -m pipeline.tools.prepare imagenet --out /datasets/imagenet --verify     # re-check a prepared tree
    python -m pipeline.tools.prepare mean-image /datasets/imagenet                  # (re)compute the mean image
    python -m pipeline.tools.prepare shards /datasets/imagenet s3://bucket/imagenet-shards   # any ImageFolder tree
    python -m pipeline.tools.prepare imagenet ... --out /datasets/imagenet --format shards \\
        --shards-out s3://bucket/imagenet-shards         # the tree, then its splits as shards (--shard-bytes)

The tree it writes (the archives may be local files or URLs too)::

    train/<wnid>/<wnid>_NNNN.JPEG          1,281,167 images in 1,000 classes
    val/<wnid>/ILSVRC2012_val_NNNNNNNN.JPEG    50,000 images
    .manifest/<split>/<wnid>.json          per class: every file's size and sha256
    mean_image.npy                         per-pixel mean (224 x 224 x 3, 0-255) for data.mean_image
    manifest.json                          per class: file count, bytes, sha256 of its file list; written last

Each archive is read once, as a stream (one image in memory at a time); images are written by a
pool of threads. A class becomes visible only when complete: locally it is written under
``.partial/`` and renamed into place; on S3 (no rename) objects are written in place and the class
counts as done once its ``.manifest`` entry exists, written after its files were listed back and
matched. An interrupted run is resumed by running the same command: classes whose entry matches
what is stored are skipped. The sizes are always checked against the manifest; ``--verify``
re-reads every file and checks its sha256 too.

Sharded splits (``shards``, or ``imagenet --format shards``): every split folder of an ImageFolder tree
(``train/``, ``val/``, ``test/``: local or s3://) becomes ``OUT/<split>/`` in the layout of
:mod:`pipeline.data.shard_format`: WebDataset tars of about ``--shard-bytes`` (256 MB by default) holding
``<key>.jpg`` + ``<key>.cls`` per sample, each with its DALI index, and the split's ``manifest.json``
(samples, bytes and sha256 per shard, the class names), written last. The samples are shuffled once
(``--seed``) before they are cut into shards, so that a contiguous read of one shard is class-mixed. The
member is named ``.jpg`` whatever the image's format (DALI decodes by content). Re-running rewrites the split.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.core.storage import Storage, StorageError
from pipeline.data import shard_format
from pipeline.data.errors import DataError
from pipeline.tools.imagenet_tree import DATASET_MANIFEST, PARTS, prepare_imagenet, read_dataset_manifest, verify_tree
from pipeline.tools.mean_image import MEAN_IMAGE, write_mean_image
from pipeline.tools.shard_writer import prepare_shards


def _write_shards(args: argparse.Namespace, root: str, out: str, splits: list[str] | None) -> None:
    written = prepare_shards(
        root,
        out,
        splits=splits,
        shard_bytes=args.shard_bytes,
        seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
    )
    for split, manifest in written.items():
        info = shard_format.describe(manifest)
        print(
            f"{Storage(out).url(split)}: {info['samples']} samples of {info['classes']} classes in {info['shards']} "
            f"shards; train with --data.format=shards --data.root={out}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.tools.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    im = sub.add_parser("imagenet", help="ILSVRC-2012 archives -> ImageFolder tree (or --verify a tree)")
    im.add_argument("--out", required=True, help="tree root: a local folder or s3://bucket/prefix")
    im.add_argument("--train-tar", default="", help="ILSVRC2012_img_train.tar (path or URL)")
    im.add_argument("--val-tar", default="", help="ILSVRC2012_img_val.tar (path or URL)")
    im.add_argument("--devkit", default="", help="ILSVRC2012_devkit_t12.tar.gz: validation labels")
    im.add_argument("--val-labels", default="", help="LOC_val_solution.csv: validation labels (instead of --devkit)")
    im.add_argument("--workers", type=int, default=8, help="parallel writes (default 8; more for S3)")
    im.add_argument(
        "--mean-samples",
        type=int,
        default=10000,
        help="training images averaged into mean_image.npy (default 10000; 0 skips it)",
    )
    im.add_argument("--verify", action="store_true", help="re-read every file and check it against the manifest")
    im.add_argument("--no-progress", action="store_true")
    im.add_argument(
        "--format",
        choices=("folder", "shards"),
        default="folder",
        help="shards: after the tree at --out, write its splits as shards to --shards-out (see `shards`)",
    )
    im.add_argument("--shards-out", default="", help="--format shards: where the sharded splits go (local or s3://)")
    sh = sub.add_parser("shards", help="ImageFolder tree -> WebDataset tar shards + DALI indexes + manifest per split")
    sh.add_argument("root", help="ImageFolder tree: ROOT/<split>/<class>/<image> (local or s3://)")
    sh.add_argument("out", help="OUT/<split>/shard-NNNNNN.{tar,idx} + manifest.json (local or s3://)")
    sh.add_argument("--splits", default="", help="comma-separated split folders (default: every one under ROOT)")
    sh.add_argument("--no-progress", action="store_true")
    for parser in (im, sh):
        parser.add_argument(
            "--shard-bytes",
            type=int,
            default=shard_format.DEFAULT_SHARD_BYTES,
            help=f"target tar size (default {shard_format.DEFAULT_SHARD_BYTES >> 20} MB)",
        )
        parser.add_argument("--seed", type=int, default=0, help="the once-only shuffle of the samples into shards")
    sh.add_argument("--workers", type=int, default=8, help="parallel reads of the source images (default 8)")
    mi = sub.add_parser("mean-image", help="(re)compute ROOT/mean_image.npy from the training split")
    mi.add_argument("root")
    mi.add_argument("--size", type=int, default=224, help="crop size = data.image_size (default 224)")
    mi.add_argument("--resize", type=int, default=256, help="shorter side before the centre crop (default 256)")
    mi.add_argument("--samples", type=int, default=10000)
    mi.add_argument("--workers", type=int, default=8)
    mi.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.command == "imagenet" and args.format == "shards" and not args.shards_out:
        p.error("--format shards needs --shards-out (a local folder or s3://bucket/prefix for the shards)")
    try:
        if args.command == "shards":
            splits = [s for s in args.splits.split(",") if s] or None
            _write_shards(args, args.root, args.out, splits)
            return 0
        if args.command == "mean-image":
            info = write_mean_image(
                args.root,
                size=args.size,
                resize=args.resize,
                samples=args.samples,
                workers=args.workers,
                progress=not args.no_progress,
            )
            try:
                manifest = read_dataset_manifest(args.root)
                manifest["mean_image"] = info
                Storage(args.root).write_text(DATASET_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            except DataError:
                pass  # a tree not written by prepare: the .npy alone is what training reads
            print(
                f"wrote {args.root.rstrip('/')}/{MEAN_IMAGE} from {info['samples']} images "
                f"(per-channel mean {info['channel_mean']}); use --data.mean_image={MEAN_IMAGE}"
            )
            return 0
        if args.train_tar or args.val_tar:
            manifest = prepare_imagenet(
                args.out,
                train_tar=args.train_tar,
                val_tar=args.val_tar,
                devkit=args.devkit,
                val_labels=args.val_labels,
                workers=args.workers,
                mean_samples=args.mean_samples,
                progress=not args.no_progress,
            )
            for split, info in manifest["splits"].items():
                print(
                    f"{split}: {info['files']} images in {len(info['classes'])} classes, "
                    f"{info['bytes'] / 2**30:.2f} GiB"
                )
        elif not args.verify and args.format != "shards":
            p.error(
                "give --train-tar and/or --val-tar to prepare, --verify to check an existing tree, or --format shards "
                "to shard it"
            )
        if args.verify:
            problems = verify_tree(args.out, workers=args.workers, progress=not args.no_progress)
            for line in problems:
                print(f"BAD {line}")
            if problems:
                print(
                    f"{args.out}: {len(problems)} problem(s); run the prepare command again to rewrite the "
                    f"classes concerned (delete their {PARTS}/<split>/<class>.json first)",
                    file=sys.stderr,
                )
                return 1
            print(f"{args.out}: every file matches {DATASET_MANIFEST}")
        if args.format == "shards":
            _write_shards(args, args.out, args.shards_out, None)
    except (DataError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
