"""`clip-keys`: make a customer's key, or hash an existing secret, for the keys file.

    clip-keys new --id key_acme --name "ACME" --credit-usd 5 --requests-per-minute 600 >> keys.yaml-entry
    echo -n "$SECRET" | clip-keys hash

`new` prints the secret once, on stderr (hand it to the customer), and the keys file entry (the secret's hash
only) on stdout; `--add FILE` appends the entry to a keys file instead, which every ingress replica then
reloads. Nothing here sends a secret anywhere.
"""

import argparse
import sys
from pathlib import Path

import yaml

from serve_app.tenancy.keys import KEY_ID, hash_secret, new_secret, parse_keys_file


def _entry(args: argparse.Namespace, secret: str) -> dict:
    entry: dict = {"id": args.id}
    if args.name:
        entry["name"] = args.name
    entry["secrets"] = [hash_secret(secret)]
    for name in ("requests_per_minute", "tokens_per_minute", "images_per_minute", "credit_usd"):
        value = getattr(args, name)
        if value is not None:
            entry[name] = value
    return entry


def _add(path: Path, entry: dict, admin: bool) -> None:
    """Adds the entry under `keys` (or `admin_keys`) and checks the whole file still loads before writing it."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
    data = data or {}
    data.setdefault("admin_keys" if admin else "keys", []).append(entry)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    parse_keys_file(text, str(path))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # one rename: a replica never reads half a file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clip-keys", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="a new key: the secret on stderr, the keys-file entry on stdout")
    new.add_argument("--id", required=True, help="key_… : what logs, metrics and usage show")
    new.add_argument("--name")
    new.add_argument("--admin", action="store_true", help="an admin key (the /v1/organization/* routes only)")
    new.add_argument("--requests-per-minute", type=int)
    new.add_argument("--tokens-per-minute", type=int)
    new.add_argument("--images-per-minute", type=int)
    new.add_argument("--credit-usd", type=float, help="free credit; omit for no credit limit")
    new.add_argument("--add", type=Path, metavar="KEYS_FILE", help="append the entry to this keys file")
    sub.add_parser("hash", help="the `sha256:` form of a secret read from stdin")
    args = parser.parse_args(argv)
    if args.command == "hash":
        secret = sys.stdin.read().strip()
        if not secret:
            parser.error("no secret on stdin")
        print(hash_secret(secret))
        return 0
    if not KEY_ID.match(args.id):
        parser.error("--id is `key_` and 1 to 64 letters, digits, `_` or `-`")
    secret = new_secret()
    entry = _entry(args, secret)
    if args.add:
        try:
            _add(args.add, entry, args.admin)
        except ValueError as exc:
            parser.error(str(exc))
        print(f"added {args.id} to {args.add}", file=sys.stderr)
    else:
        print(yaml.safe_dump({"admin_keys" if args.admin else "keys": [entry]}, sort_keys=False), end="")
    print(f"secret of {args.id} (shown once): {secret}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
