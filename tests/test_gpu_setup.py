"""The GPU machine's set-up (benchmarks/gpu_wheels.py, gpu_install.sh), offline: the install runs in a fresh venv that
sees only what the H200 image would have (this venv's distributions named in gpu_image_packages.txt, with their own
installed needs), from wheels repacked here from this venv's files for exactly what gpu_wheels says the image lacks."""
import base64
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_wheels  # noqa: E402

HERE_ENV = {"python_version": f"{sys.version_info[0]}.{sys.version_info[1]}", "python_full_version": sys.version.split()[0]}
IMAGE = gpu_wheels.read_image(gpu_wheels.IMAGE.read_text())


def test_markers_and_extras():
    meta = ("Metadata-Version: 2.1\nName: x\nRequires-Dist: torch\nRequires-Dist: newpkg>=1\n"
            "Requires-Dist: pytest; extra == \"test\"\nRequires-Dist: ruff; sys_platform != \"cygwin\" and extra == \"check\"\n"
            "Requires-Dist: tomli; python_version < \"3.11\"\nRequires-Dist: winpkg; sys_platform == \"win32\"\n"
            "Requires-Dist: Lazy_Importer>=0.1; python_version < \"3.15\"\n\n")
    assert [str(r) for r in gpu_wheels.missing(meta, {"torch"})] == ["newpkg>=1", 'Lazy_Importer>=0.1; python_version < "3.15"']
    assert [r.name for r in gpu_wheels.missing(meta, {"torch", "lazy-importer"})] == ["newpkg"]
    assert "tomli" in [r.name for r in gpu_wheels.missing(meta, set(), {"python_version": "3.10"})]


def test_image_list_is_normalized():
    assert gpu_wheels.read_image("# c\nTyping_Extensions\n\nhf.xet  # x\n") == {"typing-extensions", "hf-xet"}
    assert {"torch", "numpy", "huggingface-hub", "typing-extensions"} <= IMAGE and "diffusers" not in IMAGE


def test_one_version_rule(tmp_path):
    for name in ("a_b-1.0-py3-none-any.whl", "a_b-1.10-py3-none-any.whl", "a_b-1.9-py3-none-any.whl", "c-2.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    assert sorted(p.name for p in gpu_wheels.older(tmp_path)) == ["a_b-1.0-py3-none-any.whl", "a_b-1.9-py3-none-any.whl"]


def lacking():
    """What the image lacks, as gpu_wheels.sh resolves it, read from this venv's installed METADATA."""
    todo = [r.name for r in gpu_wheels.roots() if canonicalize_name(r.name) not in IMAGE]
    seen = set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name not in seen:
            seen.add(name)
            todo += [r.name for r in gpu_wheels.missing(importlib.metadata.distribution(name).read_text("METADATA"), IMAGE, HERE_ENV)]
    return seen


def repack(name, folder):
    """A wheel of an installed pure-Python distribution, from its installed files (RECORD rewritten)."""
    dist = importlib.metadata.distribution(name)
    info = f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}.dist-info"
    path = folder / f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for f in dist.files:
            rel = str(f)
            if rel.startswith("..") or "__pycache__" in rel or rel.split("/")[-1] in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                continue
            data = f.locate().read_bytes()
            z.writestr(rel, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{rel},sha256={digest},{len(data)}")
        z.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")
    return path


def image_closure():
    """This venv's distributions named in the image list, with their installed needs, recursively."""
    todo, seen = [n for n in IMAGE], set()
    while todo:
        name = canonicalize_name(todo.pop())
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if name not in seen:
            seen.add(name)
            todo += [r.name for r in gpu_wheels.needed(dist.requires or [], HERE_ENV)]
    return seen


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(python of a fresh venv seeing only the simulated image, folder of wheels for what it lacks)."""
    base = tmp_path_factory.mktemp("gpu")
    lack, image = lacking(), image_closure()
    assert {"diffusers", "importlib-metadata"} <= lack and not lack & image and "dqar" not in image | lack
    links = base / "image"
    links.mkdir()
    for name in image:
        for top in {str(f).split("/")[0] for f in importlib.metadata.distribution(name).files or []}:
            src = importlib.metadata.distribution(name).locate_file(top)
            if top != ".." and src.exists() and not (links / top).exists():
                (links / top).symlink_to(src)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base / "venv")], check=True)
    site = next((base / "venv" / "lib").glob("python3*/site-packages"))
    (site / "image.pth").write_text(f"{links}\n")
    wheels = base / "whl"
    wheels.mkdir()
    for name in lack:
        repack(name, wheels)
    return base / "venv" / "bin" / "python", wheels


def install(py, wheels, target, require_cuda, then="true"):
    """Source gpu_install.sh in bash (from outside the checkout), then run `then`; the completed process."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PY=str(py), WHEELS=str(wheels), REQUIRE_CUDA=require_cuda, PATH=f"{py.parent}:{env['PATH']}")
    script = f'source "{ROOT}/benchmarks/gpu_install.sh" "$1" && {then}'
    return subprocess.run(["bash", "-c", script, "_", str(target)], env=env, cwd="/", capture_output=True, text=True, timeout=120)


def test_fresh_venv_lacks_diffusers(fresh):
    py, _ = fresh
    r = subprocess.run([str(py), "-c", "import torch, numpy; import diffusers"], capture_output=True, text=True, cwd="/")
    assert r.returncode != 0 and "No module named 'diffusers'" in r.stderr


def test_install_then_imports(fresh, tmp_path):
    py, wheels = fresh
    r = install(py, wheels, tmp_path / "site", "0", 'python3 -c "import torch, diffusers, dqar; print(dqar.__file__)"')
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip().splitlines()[-1]).resolve() == ROOT / "dqar" / "__init__.py"
    assert (tmp_path / "site" / "diffusers").is_dir()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA failure")
def test_require_cuda_fails_in_one_line(fresh, tmp_path):
    py, wheels = fresh
    r = install(py, wheels, tmp_path / "site", "1")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "torch.cuda.is_available()" in r.stderr, r.stderr


def test_no_wheels_one_line(fresh, tmp_path):
    py, _ = fresh
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "absent"):
        r = install(py, folder, tmp_path / "site", "0")
        assert r.returncode != 0 and r.stderr.count("\n") == 1
        assert r.stderr.startswith(f"no wheels in {folder}/: run benchmarks/gpu_wheels.sh on a machine with PyPI")
