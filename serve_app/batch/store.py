"""Where files' bytes live: a local directory, or object storage (`s3://bucket/prefix`, `gs://...`) through pyarrow's
filesystems, the ones Ray Data reads natively. Names inside the store are the service's own (`files/<file id>`),
never a client's filename.
"""

import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator

ENV_STORAGE = "CLIP_BATCH_STORAGE"
CHUNK = 1 << 20


class LineTooLong(ValueError):
    def __init__(self, line: int, limit: int) -> None:
        super().__init__(f"line {line} is longer than {limit} bytes")
        self.line = line


def default_storage() -> str:
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "clip-serve" / "files"
    return str(base)


class FileStore:
    """Objects by name under one root. `uri`: a local path, or a URI pyarrow's `FileSystem.from_uri` reads (its
    query options included: `s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http`)."""

    def __init__(self, uri: str | None) -> None:
        from pyarrow import fs

        self.uri = uri or os.environ.get(ENV_STORAGE) or default_storage()
        if "://" in self.uri:
            self.filesystem, root = fs.FileSystem.from_uri(self.uri)
        else:
            Path(self.uri).mkdir(parents=True, exist_ok=True)
            self.filesystem, root = fs.LocalFileSystem(), str(Path(self.uri).resolve())
        self.root = root.rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def write(self, name: str, source: BinaryIO) -> int:
        """Copies `source` into the object `name` in chunks; returns the bytes written."""
        written = 0
        with self.open_output(name) as out:
            while chunk := source.read(CHUNK):
                out.write(chunk)
                written += len(chunk)
        return written

    def open_output(self, name: str) -> Any:
        """A writable stream (object storage: a multipart upload, complete when closed)."""
        path = self.path(name)
        if self.filesystem.type_name == "local":
            self.filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return self.filesystem.open_output_stream(path)

    def open_input(self, name: str) -> Any:
        return self.filesystem.open_input_stream(self.path(name))

    def chunks(self, name: str) -> Iterator[bytes]:
        with self.open_input(name) as stream:
            while chunk := stream.read(CHUNK):
                yield chunk

    def lines(self, name: str, max_line_bytes: int) -> Iterator[bytes]:
        """The object's lines, streamed, each without its line break; LineTooLong (naming it, from 1) past
        `max_line_bytes`. Pieces are joined once per line: a long line costs its length, not its length squared."""
        pieces: list[bytes] = []
        held = 0
        number = 0
        for chunk in self.chunks(name):
            start = 0
            while (end := chunk.find(b"\n", start)) != -1:
                number += 1
                if held + end - start > max_line_bytes:
                    raise LineTooLong(number, max_line_bytes)
                pieces.append(chunk[start:end])
                yield b"".join(pieces)
                pieces, held, start = [], 0, end + 1
            if start < len(chunk):
                pieces.append(chunk[start:])
                held += len(chunk) - start
                if held > max_line_bytes:
                    raise LineTooLong(number + 1, max_line_bytes)
        if pieces:
            yield b"".join(pieces)

    def size(self, name: str) -> int:
        return int(self.filesystem.get_file_info(self.path(name)).size or 0)

    def delete(self, name: str) -> None:
        from pyarrow import fs

        info = self.filesystem.get_file_info(self.path(name))
        if info.type == fs.FileType.File:
            self.filesystem.delete_file(self.path(name))
