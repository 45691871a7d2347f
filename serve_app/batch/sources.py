"""Readers: a folder of images, Parquet or WebDataset tars (local or object storage) -> rows for `embed_dataset`.

Each reader is Ray Data's own (`read_binary_files`, `read_parquet`, `read_webdataset`, which stream and read `s3://`
and `gs://` natively) followed by one task that gives every row a string `id`; Ray fuses it into the read. What each
source gives:

- folder: every image file under it, recursively (by extension: the formats the service decodes); `id` is the path
  relative to the folder; no metadata.
- Parquet: the image column (bytes, or strings: file paths, relative ones under the Parquet source's directory, or
  http(s) URLs under the URL policy) and/or the text column; `id` from `id_column`, else a column `id`, else the
  image path/URL, else a hash of the file path and the row's position in it (stable across runs). Every other
  column is carried to the output unchanged.
- WebDataset: samples of `.tar` shards; the image is the sample's first member with an image extension, the text
  its `.txt`, `.caption` or `.text`; `id` is the sample key. Text-like members (those, `.json`, `.cls`) are carried
  as strings, the shard as `shard`; other binary members are not carried. Which members exist is read from the
  first shard's first entries, so that every output file has the same columns.
"""

import os
import re
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from serve_app.batch.dataset import EMBEDDING, ERROR, ID, IO_CPUS, Kind, resolve_path
from serve_app.imaging import ALLOWED_FORMATS

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

Format = Literal["auto", "folder", "parquet", "webdataset"]
KindChoice = Literal["images", "texts", "auto"]

# Image files by extension: the formats the service decodes (ALLOWED_FORMATS; Ray's match ignores case).
IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "gif", "webp", "bmp"]
assert {"JPEG", "PNG", "GIF", "WEBP", "BMP"} == set(ALLOWED_FORMATS)
TEXT_MEMBERS = ("txt", "caption", "text")
# WebDataset members carried to the output as strings (UTF-8, bad bytes replaced); other members are binary.
TEXT_LIKE = (*TEXT_MEMBERS, "json", "cls", "cls2")
IMAGE = "image"
SHARD = "shard"
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # Ray's (and webdataset's) split of a name into key, suffix
_PEEK_ENTRIES = 256


class SourceError(ValueError):
    """The source cannot be embedded as asked (missing column, wrong kind): a fatal error, said before any work."""


@dataclass(frozen=True)
class Source:
    """A source read: its rows (`id` + what to embed + metadata) and how `embed_dataset` should take them."""

    dataset: "ray.data.Dataset"
    format: Format
    kind: Kind
    column: str
    path_base: str | None = None  # where relative image paths are resolved (Parquet of paths)


def _strip_scheme(path: str) -> str:
    """A source as Ray Data writes its file paths: `bucket/key` for URIs, absolute for local paths."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return ("/" + rest.lstrip("/")) if scheme == "file" else rest
    return os.path.abspath(path)


def _listing(source: str) -> tuple[bool, list[str]]:
    """(is a directory, the names directly in it)."""
    from pyarrow import fs

    filesystem, where = resolve_path(source)
    info = filesystem.get_file_info(where)
    if info.type == fs.FileType.NotFound:
        raise SourceError(f"{source}: no such file or directory")
    if info.type != fs.FileType.Directory:
        return False, [where]
    return True, [i.path for i in filesystem.get_file_info(fs.FileSelector(where, recursive=False))]


def detect_format(source: str) -> Format:
    """By the source's name, or for a directory by what it holds directly: `.parquet` files, `.tar` shards, else
    a folder of images."""
    is_dir, names = _listing(source)
    suffixes = {n.rsplit(".", 1)[-1].lower() for n in names if "." in n.rsplit("/", 1)[-1]}
    if "parquet" in suffixes:
        return "parquet"
    if "tar" in suffixes:
        return "webdataset"
    if not is_dir:
        raise SourceError(f"{source}: not a .parquet or .tar file, nor a folder of images")
    return "folder"


def read_source(
    source: str, format: Format = "auto", kind: KindChoice = "auto", image_column: str | None = None,
    text_column: str | None = None, id_column: str | None = None,
) -> Source:
    fmt = detect_format(source) if format == "auto" else format
    if fmt == "folder":
        if kind == "texts" or text_column or id_column:
            raise SourceError("a folder of images has images only: no text or id column")
        return Source(read_image_folder(source), "folder", "images", IMAGE)
    if fmt == "parquet":
        return read_parquet_source(source, kind, image_column, text_column, id_column)
    if id_column:
        raise SourceError("a WebDataset's ids are its sample keys: no id column")
    return read_webdataset_source(source, kind, image_column, text_column)


def _pick_kind(kind: KindChoice, image: str | None, text: str | None, names: list[str]) -> tuple[Kind, str]:
    """Auto: images when there is an image column, else texts; the other column is carried as metadata."""
    if kind in ("images", "auto") and image:
        return "images", image
    if kind in ("texts", "auto") and text:
        return "texts", text
    want = {"images": "an image column (--image-column)", "texts": "a text column (--text-column)",
            "auto": "an image or a text column (--image-column, --text-column)"}[kind]
    raise SourceError(f"the source has no {want}; it has {names}")


# ------------------------------------------------------------------ folder


def read_image_folder(source: str) -> "ray.data.Dataset":
    import ray.data

    ds = ray.data.read_binary_files(source, include_paths=True, file_extensions=IMAGE_EXTENSIONS,
                                     num_cpus=IO_CPUS)
    return ds.map_batches(_folder_rows, fn_kwargs={"root": _strip_scheme(source).rstrip("/")},
                          batch_format="pyarrow", batch_size=None, num_cpus=IO_CPUS)


def _folder_rows(table: "pa.Table", root: str) -> "pa.Table":
    import pyarrow as pa

    cut = len(root) + 1
    ids = [p[cut:] if p.startswith(root + "/") else p for p in table.column("path").to_pylist()]
    return pa.table({ID: pa.array(ids, type=pa.string()), IMAGE: table.column("bytes")})


# ------------------------------------------------------------------ Parquet


def _parquet_schema(source: str) -> "pa.Schema":
    import pyarrow.dataset as pads

    filesystem, where = resolve_path(source)
    return pads.dataset(where, filesystem=filesystem, format="parquet").schema


def read_parquet_source(
    source: str, kind: KindChoice = "auto", image_column: str | None = None, text_column: str | None = None,
    id_column: str | None = None,
) -> Source:
    import pyarrow as pa
    import ray.data

    schema = _parquet_schema(source)
    names = schema.names
    for name in (image_column, text_column, id_column):
        if name and name not in names:
            raise SourceError(f"the Parquet source has no column {name!r}; it has {names}")
    clash = {EMBEDDING, ERROR} & set(names)
    if clash:
        raise SourceError(f"the Parquet source's columns {sorted(clash)} clash with the output's; rename them")
    image = image_column or (IMAGE if IMAGE in names else None)
    text = text_column or next((t for t in ("text", "caption") if t in names), None)
    chosen, column = _pick_kind(kind, image, text, names)
    type_ = schema.field(column).type
    if chosen == "images" and not (pa.types.is_binary(type_) or pa.types.is_large_binary(type_)
                                   or pa.types.is_string(type_) or pa.types.is_large_string(type_)):
        raise SourceError(f"image column {column!r} is {type_}: it must hold bytes, paths or URLs")
    if id_column and id_column != ID and ID in names:
        raise SourceError(f"the source has a column {ID!r} and --id-column names {id_column!r}: rename one")
    if id_column or ID in names:
        id_from = id_column or ID
    elif chosen == "images" and not pa.types.is_binary(type_) and not pa.types.is_large_binary(type_):
        id_from = column  # the image's path or URL
    else:
        id_from = None  # a hash of the file path and the row's position
    ds = ray.data.read_parquet(source, include_row_hash=id_from is None, num_cpus=IO_CPUS)
    ds = ds.map_batches(_parquet_ids, fn_kwargs={"id_from": id_from}, batch_format="pyarrow", batch_size=None,
                        num_cpus=IO_CPUS)
    base = source if _listing(source)[0] else source.rsplit("/", 1)[0] if "/" in source else "."
    return Source(ds, "parquet", chosen, column, path_base=base)


def _parquet_ids(table: "pa.Table", id_from: str | None) -> "pa.Table":
    import pyarrow as pa
    import pyarrow.compute as pc

    if id_from is None:
        ids = pa.array([f"{h:016x}" for h in table.column("row_hash").to_pylist()], type=pa.string())
        table = table.drop_columns(["row_hash"])
    else:
        ids = pc.cast(table.column(id_from), pa.string())
    if ID in table.column_names:
        return table.set_column(table.column_names.index(ID), ID, ids)
    return table.add_column(0, ID, ids)


# ------------------------------------------------------------------ WebDataset


def _shards(source: str) -> list[str]:
    from pyarrow import fs

    filesystem, where = resolve_path(source)
    if filesystem.get_file_info(where).type != fs.FileType.Directory:
        return [where]
    infos = filesystem.get_file_info(fs.FileSelector(where, recursive=True))
    return sorted(i.path for i in infos if i.type == fs.FileType.File and i.path.lower().endswith(".tar"))


def webdataset_members(source: str) -> list[str]:
    """The member suffixes (`jpg`, `txt`, `json`, ...) of the first shard's first entries, in order of appearance."""
    shards = _shards(source)
    if not shards:
        raise SourceError(f"{source}: no .tar shards")
    filesystem, _ = resolve_path(source)
    found: list[str] = []
    with filesystem.open_input_stream(shards[0]) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for n, entry in enumerate(tar):
            if n >= _PEEK_ENTRIES:
                break
            match = _MEMBER.match(entry.name)
            if entry.isreg() and match and match.group(2) not in found:
                found.append(match.group(2))
    return found


def read_webdataset_source(
    source: str, kind: KindChoice = "auto", image_column: str | None = None, text_column: str | None = None,
) -> Source:
    import ray.data

    members = webdataset_members(source)
    for name in (image_column, text_column):
        if name and name not in members:
            raise SourceError(f"the WebDataset has no member .{name}; its first samples have {members}")
    images = [image_column] if image_column else [m for m in members if m.lower() in IMAGE_EXTENSIONS]
    text = text_column or next((m for m in members if m.lower() in TEXT_MEMBERS), None)
    chosen, column = _pick_kind(kind, IMAGE if images else None, text, members)
    strings = [m for m in members if m == text or m.rsplit(".", 1)[-1].lower() in TEXT_LIKE]
    clash = {ID, EMBEDDING, ERROR, IMAGE, SHARD} & set(strings)
    if clash:
        raise SourceError(f"the WebDataset's members {sorted(clash)} clash with the output's columns")
    ds = ray.data.read_webdataset(source, decoder=None, file_extensions=["tar"], num_cpus=IO_CPUS)
    ds = ds.map_batches(_webdataset_rows, fn_kwargs={"images": images if chosen == "images" else [],
                                                     "strings": strings},
                        batch_format="pyarrow", batch_size=None, num_cpus=IO_CPUS)
    return Source(ds, "webdataset", chosen, column)


def _webdataset_rows(table: "pa.Table", images: list[str], strings: list[str]) -> "pa.Table":
    """One row per sample with the same columns in every block: `id`, `image` (the first image member present),
    the text-like members as strings (null where a sample lacks one) and `shard`."""
    import pyarrow as pa

    def column(name: str) -> list[Any]:
        return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows

    out: dict[str, Any] = {ID: pa.array(column("__key__"), type=pa.string())}
    if images:
        found = [column(m) for m in images]
        out[IMAGE] = pa.array([next((v for v in row if v is not None), None) for row in zip(*found)],
                              type=pa.binary())
    for name in strings:
        out[name] = pa.array([_text(v) for v in column(name)], type=pa.string())
    out[SHARD] = pa.array(column("__url__"), type=pa.string())
    return pa.table(out)


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return bytes(value).decode("utf-8", errors="replace")
