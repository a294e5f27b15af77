"""Generate Python code from .proto files, the way offload needs it: `python -m offload.protogen`.

    python -m offload.protogen protos --out .                       # offload's own (make protos)
    python -m offload.protogen ~/countops/protos --out ~/countops   # yours, anywhere

Each argument is a proto root (every .proto under it is compiled, imports resolve from it) or
one .proto file inside a root given with -I. offload's own protos and googleapis are always on
the include path, and so is "buf/validate/validate.proto" (protovalidate's constraints, taken
from the pinned protovalidate package), so your files can import those too. Output: `*_pb2.py`, `*_pb2.pyi`, `*_pb2_grpc.py` (pinned
grpcio-tools, matching the protobuf runtime) and, per file, `<name>.comments.json`: the
proto comments by full name, which the gateway turns into OpenAPI descriptions (the generated
Python keeps no comments).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

OFFLOAD_PROTOS = Path(__file__).resolve().parents[1] / "protos"

# Field numbers in descriptor.proto: where each kind of definition sits in SourceCodeInfo paths.
_FILE_MESSAGES, _FILE_ENUMS, _FILE_SERVICES = 4, 5, 6
_MESSAGE_FIELDS, _MESSAGE_NESTED, _MESSAGE_ENUMS, _MESSAGE_ONEOFS = 2, 3, 4, 8
_ENUM_VALUES = 2
_SERVICE_METHODS = 2

# Directories under a root that hold someone else's protos (a venv, vendored packages).
_SKIPPED = {".venv", "venv", "site-packages", "node_modules", "__pycache__", ".git"}


def include_paths() -> list[Path]:
    """offload's protos, googleapis' (google/api/...), and the well-known types of grpcio-tools."""
    import google.api.annotations_pb2 as annotations
    import grpc_tools

    return [OFFLOAD_PROTOS, Path(annotations.__file__).parents[2], Path(grpc_tools.__file__).parent / "_proto"]


def validate_descriptor_set(path: Path) -> None:
    """Write buf/validate/validate.proto, with its imports, as a FileDescriptorSet for protoc.

    The protovalidate package ships the file compiled, not as source: its descriptor is the
    contract its validator enforces, so protoc reads exactly that one (--descriptor_set_in).
    """
    from google.protobuf import descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2
    from protovalidate._gen.buf.validate import validate_pb  # the compiled file; no public accessor

    files = descriptor_pb2.FileDescriptorSet()
    for module in (descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2):
        module.DESCRIPTOR.CopyToProto(files.file.add())
    files.file.add().MergeFromString(validate_pb._DESC.proto.to_binary())
    path.write_bytes(files.SerializeToString())


def generate(sources: list[Path], out: Path, includes: list[Path] = ()) -> list[Path]:  # type: ignore[assignment]
    """Compile; returns the .proto files compiled (relative to their root).

    Compiling offload's own protos also generates `buf/validate/validate_pb2.py` (what the
    generated code of any annotated file imports) into `out`.
    """
    from grpc_tools import protoc

    roots, files = [], []
    for source in sources:
        source = source.resolve()
        if source.is_dir():
            roots.append(source)
            files += sorted(p for p in source.rglob("*.proto") if not _SKIPPED.intersection(p.relative_to(source).parts[:-1]))
        else:
            files.append(source)
    search = [*dict.fromkeys([*roots, *(p.resolve() for p in includes), *include_paths()])]
    if not files:
        raise SystemExit("offload.protogen: no .proto files in " + ", ".join(map(str, sources)))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        descriptor_set = Path(tmp) / "set.binpb"
        validate_set = Path(tmp) / "validate.binpb"
        validate_descriptor_set(validate_set)
        own = OFFLOAD_PROTOS.resolve() in roots
        args = [
            "protoc",
            f"--descriptor_set_in={validate_set}",
            *(f"-I{p}" for p in search),
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            f"--descriptor_set_out={descriptor_set}",
            "--include_source_info",
            *(["buf/validate/validate.proto"] if own else []),
            *map(str, files),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("offload.protogen: protoc failed (its message is above)")
        fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    compiled = [f for f in fds.file if f.name != "buf/validate/validate.proto"]
    for file in compiled:
        if file.package and str(Path(file.name).parent) != file.package.replace(".", "/"):
            module = file.name.removesuffix(".proto").replace("/", ".") + "_pb2"
            print(
                f"offload.protogen: warning: {file.name} declares package {file.package}, but its module will be {module}: "
                f"put it at {file.package.replace('.', '/')}/ under the root (give the root, e.g. .../protos)",
                file=sys.stderr,
            )
        target = out / comments_file_name(file.name)
        target.write_text(json.dumps(comments(file), indent=1, sort_keys=True) + "\n")
    return [Path(f.name) for f in compiled]


def comments_file_name(proto_name: str) -> str:
    """'offload/v1/compute.proto' -> 'offload/v1/compute.comments.json' (next to compute_pb2.py)."""
    return proto_name.removesuffix(".proto").replace("-", "_") + ".comments.json"


def comments(file: descriptor_pb2.FileDescriptorProto) -> dict[str, str]:
    """Full name -> comment (leading, else trailing) of every commented definition in the file."""
    by_path = {}
    for location in file.source_code_info.location:
        text = location.leading_comments or location.trailing_comments
        if text.strip():
            by_path[tuple(location.path)] = _clean(text)
    names = dict(_names(file))
    return {names[path]: text for path, text in by_path.items() if path in names}


def _names(file: descriptor_pb2.FileDescriptorProto):
    """(SourceCodeInfo path, full name) of every definition in the file."""
    package = f"{file.package}." if file.package else ""
    for i, message in enumerate(file.message_type):
        yield from _message_names(message, (_FILE_MESSAGES, i), package)
    for i, enum in enumerate(file.enum_type):
        yield from _enum_names(enum, (_FILE_ENUMS, i), package)
    for i, service in enumerate(file.service):
        name = f"{package}{service.name}"
        yield (_FILE_SERVICES, i), name
        for j, method in enumerate(service.method):
            yield (_FILE_SERVICES, i, _SERVICE_METHODS, j), f"{name}.{method.name}"


def _message_names(message: descriptor_pb2.DescriptorProto, path: tuple[int, ...], prefix: str):
    name = f"{prefix}{message.name}"
    yield path, name
    for i, field in enumerate(message.field):
        yield (*path, _MESSAGE_FIELDS, i), f"{name}.{field.name}"
    for i, oneof in enumerate(message.oneof_decl):
        yield (*path, _MESSAGE_ONEOFS, i), f"{name}.{oneof.name}"
    for i, nested in enumerate(message.nested_type):
        yield from _message_names(nested, (*path, _MESSAGE_NESTED, i), f"{name}.")
    for i, enum in enumerate(message.enum_type):
        yield from _enum_names(enum, (*path, _MESSAGE_ENUMS, i), f"{name}.")


def _enum_names(enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], prefix: str):
    name = f"{prefix}{enum.name}"
    yield path, name
    for i, value in enumerate(enum.value):
        yield (*path, _ENUM_VALUES, i), f"{name}.{value.name}"  # keyed under the enum, for lookups


def _clean(text: str) -> str:
    """Comment lines -> paragraphs: lines joined by spaces, blank lines kept as paragraph breaks."""
    paragraphs, current = [], []
    for line in text.strip("\n").splitlines():
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offload.protogen", description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", type=Path, help="proto roots (directories) or .proto files")
    parser.add_argument("--out", type=Path, required=True, help="where the generated package tree goes")
    parser.add_argument("-I", dest="includes", action="append", type=Path, default=[], help="another import root")
    args = parser.parse_args(argv)
    compiled = generate(args.sources, args.out, args.includes)
    print(f"offload.protogen: {len(compiled)} file(s) -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
