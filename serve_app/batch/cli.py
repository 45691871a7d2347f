"""`clip-embed`: embed a dataset on Ray Data into Parquet, with the online service's preprocessing and encoder.

    clip-embed photos/ out/ --model ViT-B-32 --pretrained laion2b_s34b_b79k
    clip-embed s3://bucket/catalog.parquet s3://bucket/vectors/ --model hf-hub:laion/CLIP-ViT-g-14-laion2B-s34B-b88K \\
        --image-column photo --num-gpus 1 --concurrency 4 --batch-size 128
    clip-embed shards/ out/ --model local-dir:/models/tiny --kind texts

SOURCE is a folder of images, a Parquet file or folder, or WebDataset `.tar` shards (serve_app/batch/sources.py);
OUT a folder of Parquet files with `id`, `embedding`, the source's metadata columns and `error` (null, or why the
row failed: serve_app/batch/dataset.py). Ray: `ray.init()` (RAY_ADDRESS, as a RayJob sets it, else a new local
instance), `--address auto` for the cluster running on this machine, `--address local` for a new local one.

Bad rows are reported (the summary, the `error` column), never fatal: the exit status is 0 when the job ran, 1 on a
fatal error (the source, the model, the cluster), 2 on bad arguments.
"""

import argparse
import json
import math
import sys
import time
from collections import Counter
from typing import Any

from serve_app.batch.dataset import ERROR, ID, IO_CPUS, EmbedSettings, embed_dataset, resolve_path
from serve_app.batch.sources import SourceError, read_source
from serve_app.config import ImageLimits, ModelSpec

FIRST_FAILURES = 5  # failed rows listed by id in the summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-embed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder of images, Parquet file/folder, or WebDataset .tar file/folder")
    parser.add_argument("out", help="output folder of Parquet files (local, s3://, gs://)")
    model = parser.add_argument_group("model (as the service's `args`)")
    model.add_argument("--model", required=True, help="open_clip id: hf-hub:org/repo, local-dir:/path or a name")
    model.add_argument("--pretrained", default=None, help="pretrained tag of a built-in name (`random`: benchmarks)")
    model.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    model.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                       help="auto: fp32 on the CPU, bf16 on a GPU, as the service")
    model.add_argument("--image-decode", default="exact", choices=["exact", "fast"])
    source = parser.add_argument_group("source")
    source.add_argument("--format", default="auto", choices=["auto", "folder", "parquet", "webdataset"])
    source.add_argument("--kind", default="auto", choices=["images", "texts", "auto"],
                        help="what to embed; auto: images when the source has them, else texts")
    source.add_argument("--image-column", default=None,
                        help="Parquet: column of image bytes, paths or URLs (default `image`); WebDataset: member")
    source.add_argument("--text-column", default=None,
                        help="Parquet: text column (default `text`, else `caption`); WebDataset: member")
    source.add_argument("--id-column", default=None, help="Parquet: the ids (default `id`; see sources.py)")
    source.add_argument("--image-url-policy", default="off",
                        help="image URLs: off (such rows fail), public, or comma-separated allowed hosts")
    source.add_argument("--max-image-pixels", type=int, default=ImageLimits().max_image_pixels)
    source.add_argument("--max-image-bytes", type=int, default=ImageLimits().max_image_bytes)
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=64, help="rows per encoder forward pass")
    run.add_argument("--concurrency", type=int, default=1, help="encoder actors")
    run.add_argument("--num-gpus", type=float, default=0, help="GPUs per encoder actor")
    run.add_argument("--encoder-cpus", type=float, default=1,
                     help="CPUs per encoder actor (on the CPU: its torch threads)")
    run.add_argument("--preprocess-concurrency", type=int, default=None,
                     help="preprocessing actors (default: autoscaling up to the spare CPUs)")
    run.add_argument("--address", default=None,
                     help="Ray: none (RAY_ADDRESS, else a new local instance), auto, local, or ray://host:10001")
    run.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray instance")
    run.add_argument("--overwrite", action="store_true", help="replace OUT's files (default: OUT must be empty)")
    run.add_argument("--summary-json", default=None, help="also write the summary to this JSON file")
    return parser


def _settings(args: argparse.Namespace, path_base: str | None) -> EmbedSettings:
    policy: Any = args.image_url_policy
    if policy not in ("off", "public"):
        policy = [h for h in policy.split(",") if h.strip()]
    return EmbedSettings(
        batch_size=args.batch_size, concurrency=args.concurrency, num_gpus=args.num_gpus,
        encoder_cpus=args.encoder_cpus, preprocess_concurrency=args.preprocess_concurrency,
        image_limits=ImageLimits(max_image_pixels=args.max_image_pixels, max_image_bytes=args.max_image_bytes),
        image_url_policy=policy, allow_paths=True, path_base=path_base,
    )


def _spec(args: argparse.Namespace) -> ModelSpec:
    device = "cuda" if args.num_gpus and args.device == "auto" else args.device
    return ModelSpec(model=args.model, pretrained=args.pretrained, device=device, precision=args.precision,
                     image_decode=args.image_decode)


def _init_ray(args: argparse.Namespace) -> bool:
    """Connects or starts Ray; True when this call started (and must stop) it. A caller's Ray is used as it is."""
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"configure_logging": False}
    if args.address:
        options["address"] = args.address
    if args.num_cpus is not None:
        options["num_cpus"] = args.num_cpus
    ray.init(**options)
    return True


def _check_out(out: str, overwrite: bool) -> None:
    from pyarrow import fs

    filesystem, where = resolve_path(out)
    info = filesystem.get_file_info(where)
    if info.type == fs.FileType.File:
        raise SourceError(f"{out} is a file; OUT is a folder")
    if info.type == fs.FileType.Directory and not overwrite and \
            filesystem.get_file_info(fs.FileSelector(where, recursive=True)):
        raise SourceError(f"{out} is not empty; pass --overwrite to replace its files")


def summarize(out: str, seconds: float) -> dict[str, Any]:
    """What the job did, read back from OUT's `error` column (streamed from the files, never the vectors)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    filesystem, where = resolve_path(out)
    written = pads.dataset(where, filesystem=filesystem, format="parquet")
    rows = written.count_rows()
    failed = written.to_table(columns=[ID, ERROR], filter=pc.field(ERROR).is_valid())
    reasons = Counter(failed.column(ERROR).to_pylist())
    first = failed.slice(0, FIRST_FAILURES).to_pylist()
    return {
        "out": out, "rows": rows, "embedded": rows - failed.num_rows, "failed": failed.num_rows,
        "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 2) if seconds > 0 else None,
        "failed_by_reason": dict(reasons.most_common()),
        "first_failed": [{"id": r[ID], "error": r[ERROR]} for r in first],
    }


def print_summary(summary: dict[str, Any], file: Any = sys.stdout) -> None:
    print(f"clip-embed: {summary['rows']} rows in {summary['seconds']} s ({summary['rows_per_s']} rows/s): "
          f"{summary['embedded']} embedded, {summary['failed']} failed -> {summary['out']}", file=file)
    if summary["failed"]:
        print("failed rows by reason:", file=file)
        for reason, count in summary["failed_by_reason"].items():
            print(f"  {count:>8}  {reason}", file=file)
        print(f"first failed rows (all in the `{ERROR}` column):", file=file)
        for row in summary["first_failed"]:
            print(f"  {row['id']}: {row['error']}", file=file)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Reads SOURCE, embeds it and writes OUT, streaming; returns the summary."""
    from ray.data import SaveMode

    source = read_source(args.source, args.format, args.kind, args.image_column, args.text_column, args.id_column)
    _check_out(args.out, args.overwrite)
    embedded = embed_dataset(source.dataset, _spec(args), source.kind, source.column,
                             _settings(args, source.path_base))
    started = time.perf_counter()
    embedded.write_parquet(args.out, mode=SaveMode.OVERWRITE if args.overwrite else SaveMode.APPEND,
                           ray_remote_args={"num_cpus": IO_CPUS})
    summary = summarize(args.out, time.perf_counter() - started)
    summary.update(source=args.source, format=source.format, kind=source.kind, column=source.column,
                   model=args.model)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.concurrency < 1 or args.num_gpus < 0 or not math.isfinite(args.num_gpus):
        print("clip-embed: error: --batch-size and --concurrency must be >= 1, --num-gpus >= 0", file=sys.stderr)
        return 2
    if args.device == "cuda" and not args.num_gpus:  # Ray would give the encoder actors no GPU
        print("clip-embed: error: --device cuda needs --num-gpus (GPUs per encoder actor)", file=sys.stderr)
        return 2
    started_ray = False
    try:
        started_ray = _init_ray(args)
        summary = run(args)
    except Exception as exc:  # fatal: a message for a person, the traceback in Ray's logs
        print(f"clip-embed: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    print_summary(summary)
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
