"""Which wheels the H200 image lacks: dqar's runtime needs and diffusers' needs, resolved from each wheel's METADATA.

Used by benchmarks/gpu_wheels.sh: `todo DIR` prints the pip requirements still to download into DIR (one a line),
`prune DIR` deletes every older version of a package in DIR (two versions stop the install).
"""
from __future__ import annotations

import email.parser
import importlib.metadata
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

HERE = Path(__file__).resolve().parent
IMAGE = HERE / "gpu_image_packages.txt"
PYPROJECT = HERE.parent / "pyproject.toml"
# the H200 machine's interpreter and platform, for requirement markers
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
              "platform_machine": "x86_64", "os_name": "posix", "extra": ""}


def read_image(text: str) -> set[str]:
    """The normalized package names of an image list (one a line; blank lines and `#` comments ignored)."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return {canonicalize_name(line) for line in lines if line}


def needed(requirements: list[str], env: dict | None = None) -> list[Requirement]:
    """The requirements that apply on the target (markers evaluated there; any that needs an extra is skipped)."""
    env = {**TARGET_ENV, **(env or {})}
    reqs = [Requirement(r) for r in requirements]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def requires_dist(metadata: str) -> list[str]:
    """The Requires-Dist lines of a METADATA text."""
    return email.parser.Parser().parsestr(metadata, headersonly=True).get_all("Requires-Dist") or []


def missing(metadata: str, image: set[str], env: dict | None = None) -> list[Requirement]:
    """The requirements in a METADATA text that apply on the target and that the image has no package for."""
    return [r for r in needed(requires_dist(metadata), env) if canonicalize_name(r.name) not in image]


def wheel_metadata(path: Path) -> str:
    """The METADATA text inside a wheel."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        return z.read(name).decode()


def wheels(folder: Path) -> dict[str, list]:
    """Normalized name -> versions of the wheels in a folder, as (version, path) pairs."""
    found: dict[str, list] = {}
    for path in sorted(Path(folder).glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        found.setdefault(name, []).append((version, path))
    return found


def older(folder: Path) -> list[Path]:
    """The wheels to delete so that one version (the newest) of each package stays."""
    return [p for versions in wheels(folder).values() for _, p in sorted(versions)[:-1]]


def pin(req: Requirement) -> str:
    """`name==version` for the version installed here when it satisfies req (what the tests ran with), else req."""
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return str(Requirement(f"{req.name}{req.specifier}"))
    ok = req.specifier.contains(version, prereleases=True)
    return f"{req.name}=={version}" if ok else f"{req.name}{req.specifier}"


def roots() -> list[Requirement]:
    """dqar's own runtime dependencies (pyproject.toml) and diffusers at the version installed here."""
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return needed(deps) + [Requirement(f"diffusers=={importlib.metadata.version('diffusers')}")]


def todo(folder: Path, image: set[str]) -> list[str]:
    """The pip requirements still to download: roots and every present wheel's needs the image and folder lack."""
    have = wheels(folder)
    reqs = [r for r in roots() if canonicalize_name(r.name) not in image]
    for versions in have.values():
        reqs += missing(wheel_metadata(max(versions)[1]), image)
    out = []
    for r in reqs:
        ok = any(r.specifier.contains(v, prereleases=True) for v, _ in have.get(canonicalize_name(r.name), []))
        spec = pin(r)
        if not ok and spec not in out:
            out.append(spec)
    return out


def main(argv: list[str]) -> int:
    """CLI: `todo DIR` or `prune DIR`."""
    command, folder = argv
    if command == "todo":
        print("\n".join(todo(Path(folder), read_image(IMAGE.read_text()))))
    else:
        for path in older(Path(folder)):
            path.unlink()
            print(f"deleted older {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
