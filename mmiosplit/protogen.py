"""Generate the gRPC stubs in ``mmiosplit/v1`` from ``proto/`` (``--check`` fails when they are stale).

The stubs are committed so that an install needs no code generator; CI runs the check so a .proto
change without regenerated stubs cannot land.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_PACKAGE = Path("mmiosplit") / "v1"


def _generate(out_dir: Path) -> list[Path]:
    protos = sorted((PROTO_ROOT / OUT_PACKAGE).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / OUT_PACKAGE}")
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", f"--mypy_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT)
    generated = sorted((out_dir / OUT_PACKAGE).glob("*_pb2*.py*"))
    return [p.relative_to(out_dir / OUT_PACKAGE) for p in generated]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args(argv)
    target = ROOT / OUT_PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        names = _generate(tmp_path)
        stale = [
            str(OUT_PACKAGE / n)
            for n in names
            if not (target / n).exists() or not filecmp.cmp(tmp_path / OUT_PACKAGE / n, target / n, shallow=False)
        ]
        if args.check:
            if stale:
                print("stale generated stubs (run: python -m mmiosplit.protogen):", *stale, sep="\n  ")
                return 1
            print(f"stubs up to date ({len(names)} files)")
            return 0
        target.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copyfile(tmp_path / OUT_PACKAGE / n, target / n)
        (target / "__init__.py").touch()
        print(f"wrote {len(names)} files to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
